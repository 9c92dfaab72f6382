"""The SSE decoder: WHATWG line endings only, exact bytes kept, any chunk split gives the same events."""

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import SSEDecoder

FIX = Path(__file__).parent / "fixtures" / "vllm"


def decode_all(chunks):
    d = SSEDecoder()
    events = []
    for c in chunks:
        events.extend(d.decode(c))
    events.extend(d.flush())
    return events, d.pending


def test_recorded_vllm_stream_decodes_to_its_events():
    raw = (FIX / "chat_stream_k20.sse").read_bytes()
    events, pending = decode_all([raw])
    assert not pending
    assert events[-1].data == b"[DONE]"
    assert all(e.data.startswith(b"{") for e in events[:-1])
    assert b"".join(e.raw for e in events) == raw  # framing preserved byte for byte


def test_u2028_inside_a_token_does_not_split_a_line():
    payload = '{"t": "a\u2028b\u0085c\u2029d"}'.encode()
    events, _ = decode_all([b"data: " + payload + b"\n\n"])
    assert [e.data for e in events] == [payload]


def test_crlf_cr_and_lf_all_end_lines():
    events, _ = decode_all([b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"])
    assert [e.data for e in events] == [b"a", b"b", b"c"]


def test_cr_at_chunk_end_followed_by_lf_is_one_line_end():
    events, _ = decode_all([b"data: a\r", b"\n\r", b"\n"])
    assert [e.data for e in events] == [b"a"]
    assert events[0].raw == b"data: a\r\n\r\n"


def test_comments_multi_data_and_event_names():
    events, _ = decode_all([b": keep-alive\n\nevent: x\ndata: 1\ndata: 2\n\n"])
    assert events[0].data is None and events[0].comments == 1 and events[0].raw == b": keep-alive\n\n"
    assert events[1].data == b"1\n2" and events[1].event == b"x"


def test_stream_cut_mid_event_is_pending_and_flushed():
    d = SSEDecoder()
    assert d.decode(b'data: {"a": 1}\n') == []
    assert d.pending
    events = d.flush()
    assert [e.data for e in events] == [b'{"a": 1}']


def test_cut_mid_line_is_pending():
    d = SSEDecoder()
    assert d.decode(b'data: {"a"') == []
    assert d.pending


_line = st.one_of(
    st.builds(
        lambda s: b"data: " + s.encode(),
        st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",))),
    ),
    st.just(b": ping"),
    st.just(b"data: [DONE]"),
)
_eol = st.sampled_from([b"\n", b"\r\n", b"\r"])


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(st.tuples(st.lists(st.tuples(_line, _eol), min_size=1, max_size=3), _eol), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_any_chunk_split_gives_the_same_events(events, cuts):
    raw = b"".join(b"".join(line + eol for line, eol in lines) + end for lines, end in events)
    whole, _ = decode_all([raw])
    points = sorted({c % (len(raw) + 1) for c in cuts})
    chunks = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    split, _ = decode_all(chunks)
    assert [(e.data, e.comments, e.raw) for e in split] == [(e.data, e.comments, e.raw) for e in whole]
