"""Publish one chat request to an llmfleet fleet over NATS JetStream (no HTTP, no llmfleet
imports) and print its reply stream until the terminal message.

    pip install nats-py
    python docs/examples/produce.py [--nats nats://127.0.0.1:4222] [--model sim-model]
        [--name demo] [TEXT]

With the accounts of deploy/nats/accounts.conf, log in as a batch producer and use its
name: `--nats nats://batch-etl:<password>@host:4222 --name etl`. The producer's inbox
prefix and reply subjects are under `_LLMFLEET.batch.<name>`, the only prefix it may read.

It follows the reader's rules of docs/protocol.md: skip unknown message types, check `seq`
(and `heartbeat.last_seq`), accept a second `accepted` before any content (a redelivery),
and treat a silent worker as gone (ping it; hand the request back with -NAK if it died
before its first output).
"""

import argparse
import asyncio
import json
import sys
import time
import uuid

import nats
import nats.errors

SAFE = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
KNOWN = {"accepted", "delta", "embedding", "heartbeat", "done", "error"}
SILENCE_S = 3.0  # a live worker sends something at least every ~1.5 s once it accepted


def escape_model(model_id: str) -> str:
    """Model id -> one subject token: keep [A-Za-z0-9_-], every other UTF-8 byte -> =XX."""
    return "".join(chr(b) if b in SAFE else f"={b:02X}" for b in model_id.encode())


def header_bytes(headers: dict[str, str]) -> int:
    """Size of the NATS header block, which counts towards the server's max_payload."""
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


async def alive(nc: nats.NATS, worker: str) -> bool:
    """Ping the worker's control subject: no responders (or no answer) means it is gone."""
    try:
        await nc.request(f"llmfleet.ctl.{worker}", b'{"type":"ping"}', timeout=1.0)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    return True


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--model", default="sim-model")
    ap.add_argument("--name", default="demo", help="producer name: inbox _LLMFLEET.batch.<name>")
    ap.add_argument("--queue-wait", type=float, default=600.0, help="seconds to wait in the queue")
    ap.add_argument("text", nargs="?", default="Hello")
    args = ap.parse_args()

    # Our own inbox prefix: PubAcks and pongs arrive under the prefix our permissions allow.
    servers = args.nats.split(",")  # one URL, or every node of a cluster
    nc = await nats.connect(
        servers, name=f"produce-{args.name}", inbox_prefix=f"_LLMFLEET.batch.{args.name}"
    )
    try:
        return await produce(nc, args)
    finally:
        await nc.close()


async def produce(nc: nats.NATS, args: argparse.Namespace) -> int:
    js = nc.jetstream()

    # 1. Subscribe to a reply subject of our own BEFORE publishing the request, and stay
    #    subscribed until the terminal message (unsubscribing early cancels the request).
    request_id = uuid.uuid4().hex
    reply_subject = f"_LLMFLEET.batch.{args.name}.r.{request_id}"
    sub = await nc.subscribe(reply_subject)
    await nc.flush()

    # 2. Publish the OpenAI body to the model's request subject, through JetStream.
    body = json.dumps(
        {
            "model": args.model,
            "messages": [{"role": "user", "content": args.text}],
            "max_tokens": 16,
        }
    ).encode()
    now_ms = int(time.time() * 1000)
    headers = {
        "Llmfleet-Version": "1",
        "Llmfleet-Op": "chat",
        "Llmfleet-Request-Id": request_id,
        "Nats-Msg-Id": request_id,  # a re-publish within 2 minutes is deduplicated
        "Llmfleet-Reply": reply_subject,
        "Llmfleet-Start-By": str(now_ms + int(args.queue_wait * 1000)),  # else dropped unrun
        "Llmfleet-Deadline": str(now_ms + 15 * 60_000),  # cut generation off at 15 min
    }
    if len(body) + header_bytes(headers) > nc.max_payload:
        # Over max_payload the server would close the connection: pass the body by
        # reference instead (object store LLMFLEET_BODIES, see docs/protocol.md).
        print("body too large for one message", file=sys.stderr)
        return 2
    ack = await js.publish(f"llmfleet.req.{escape_model(args.model)}", body, headers=headers)
    print(f"queued: stream {ack.stream} seq {ack.seq}")

    # 3. Read the reply stream until exactly one terminal message (done or error).
    worker, ack_subject, expect, started = None, "", 0, False
    while True:
        timeout = args.queue_wait if worker is None else SILENCE_S
        try:
            msg = await sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            if worker is None:
                print("no worker took the request in time", file=sys.stderr)
                return 1
            if await alive(nc, worker):
                continue  # alive but slow to say so: keep waiting
            if started:
                print(f"worker {worker} died mid-stream", file=sys.stderr)
                return 1
            # Died before its first output: hand the request back for another worker.
            await nc.publish(ack_subject, b"-NAK")
            worker = None
            continue
        reply = json.loads(msg.data)
        kind = reply.get("type")
        if kind not in KNOWN:
            continue  # a message type from a newer protocol revision
        print(json.dumps(reply))
        if kind == "heartbeat":
            if worker is not None and reply["last_seq"] != expect - 1:
                print("a reply message was lost", file=sys.stderr)
                return 1
            continue
        if kind == "accepted":
            if started:
                print("restarted after content: giving up", file=sys.stderr)
                return 1
            worker, ack_subject, expect = reply["worker"], reply.get("ack_subject", ""), 1
            continue
        if kind == "error" and reply["seq"] == 0:
            return 1  # refused outright (unreadable, expired, too many deliveries)
        if reply["seq"] != expect:
            print(f"gap: expected seq {expect}, got {reply['seq']}", file=sys.stderr)
            return 1
        expect += 1
        if kind in ("done", "error"):
            break
        started = True
    return 0 if kind == "done" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
