"""The fast path of the annotation: decode only what the estimator needs, keep the rest of the body as bytes.

See :mod:`proxy.hotpath.splice`. Anything it does not recognise returns None and the service takes the careful
path (parse everything, annotate the objects, serialise them again), which gives the same annotation.
"""

from .splice import annotate_body_bytes, annotate_chunk_bytes

__all__ = ["annotate_body_bytes", "annotate_chunk_bytes"]
