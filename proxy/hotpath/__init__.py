"""The fast path: decode only what the estimator needs, keep the rest of the body as bytes; read the upstream
with a lean HTTP/1.1 client (:mod:`proxy.hotpath.h1`); cap the monitors' text work (:mod:`proxy.hotpath.textbudget`).

See :mod:`proxy.hotpath.splice`. Anything it does not recognise returns None and the service takes the careful
path (parse everything, annotate the objects, serialise them again), which gives the same annotation.
"""

import os

from .splice import annotate_body_bytes, annotate_chunk_bytes

__all__ = ["annotate_body_bytes", "annotate_chunk_bytes", "switched_off"]


def switched_off(variable: str) -> bool:
    """Whether an A/B switch of the fast path (``ENTROPY_PROXY_HOTPATH``, ``ENTROPY_PROXY_LEAN_UPSTREAM``) is off."""
    return os.environ.get(variable, "on").lower() in ("off", "0", "false")

