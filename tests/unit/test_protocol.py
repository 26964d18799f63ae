from __future__ import annotations

import msgspec
import pytest

from common import protocol as p
from common.errors import ErrorBody


@pytest.mark.parametrize(
    "msg",
    [
        p.Accepted(seq=0, worker="w", model="m", request_id="r", queued_ms=1.5),
        p.Delta(seq=1, choices=[p.ChoiceDelta(index=0, content="hi")]),
        p.Delta(seq=2, choices=[p.ChoiceDelta(index=1, content="", finish_reason="stop")]),
        p.Embedding(seq=1, index=0, embedding=[0.5, -0.25]),
        p.Embedding(seq=1, index=0, embedding="AAAAPw=="),
        p.Done(seq=3, usage=p.Usage(1, 2, 3)),
        p.Error(seq=0, status=400, error=ErrorBody(message="bad", param="x")),
    ],
)
def test_round_trip(msg: msgspec.Struct) -> None:
    assert p.decode_reply(p.encode(msg)) == msg


def test_wire_shape_is_tagged_json() -> None:
    raw = p.encode(p.Done(seq=3, usage=p.Usage(1, 2, 3)))
    assert msgspec.json.decode(raw) == {
        "type": "done",
        "seq": 3,
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


def test_unknown_fields_are_ignored_for_schema_evolution() -> None:
    raw = b'{"type":"delta","seq":4,"choices":[{"index":0,"content":"x","future":1}],"new":1}'
    msg = p.decode_reply(raw)
    assert msg == p.Delta(seq=4, choices=[p.ChoiceDelta(index=0, content="x")])


def test_unknown_message_types_are_recognised_for_skipping() -> None:
    assert p.is_unknown_type(b'{"type":"progress","seq":3}')
    assert not p.is_unknown_type(b'{"type":"delta","seq":"x"}')  # known type, bad body
    assert not p.is_unknown_type(b"not json")


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        p.decode_reply(b'{"type":"mystery","seq":0}')


def test_control_and_announce() -> None:
    assert p.decode_control(p.encode(p.Cancel(request_id="r"))) == p.Cancel(request_id="r")
    assert p.decode_control(b'{"type":"ping"}') == p.Ping()
    with pytest.raises(msgspec.ValidationError):  # drain has its own subject (an endpoint)
        p.decode_control(b'{"type":"drain"}')
    a = p.WorkerAnnounce(
        worker="w",
        host="h",
        version="1",
        state="ready",
        ttl_s=3.0,
        started_at=1.0,
        models=[p.ModelStatus(id="m", engine="sim", max_concurrency=2)],
    )
    assert p.decode_announce(p.encode(a)) == a
