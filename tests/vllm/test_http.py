"""emokern.vllm.http without a server: choice indices of derived request ids, server-sent
events (the server tests are in test_serve.py)."""

from emokern.vllm.http import _choice_index, _event_data, _maybe_last


def test_choice_index_of_derived_ids():
    completion = _choice_index("cmpl-1", "completion", n=2)
    assert [completion(r) for r in ("cmpl-1-0", "1_cmpl-1-0", "cmpl-1-1", "1_cmpl-1-1")] == [
        0, 1, 2, 3]
    assert completion("cmpl-10-0") is None and completion("x_cmpl-1-0") is None
    chat = _choice_index("chatcmpl-7", "chat", n=3)
    assert [chat(r) for r in ("chatcmpl-7", "1_chatcmpl-7", "2_chatcmpl-7")] == [0, 1, 2]


def test_events():
    assert _event_data(b"data: [DONE]") == b"[DONE]"
    assert _event_data(b": keep-alive") is None
    assert _event_data(b'data: {"a":\ndata: 1}') == b'{"a":\n1}'
    assert not _maybe_last(b'{"choices": [{"index": 0, "finish_reason": null}]}')
    assert _maybe_last(b'{"choices": [{"index": 0, "finish_reason": "length"}]}')
    assert _maybe_last(b'{"choices": [], "usage": {}}')
    assert not _maybe_last(b"not json")
