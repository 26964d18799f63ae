"""Publish one chat request to an llmfleet fleet over NATS JetStream (no HTTP, no llmfleet
imports) and print its reply stream until the terminal message.

    pip install nats-py
    python docs/examples/produce.py [--nats nats://127.0.0.1:4222] [--model sim-model]
        [--name demo] [TEXT]

With the accounts of deploy/nats/accounts.conf, log in as a batch producer and use its
NATS user name as the producer name: `--nats nats://batch-etl:<password>@host:4222 --name
batch-etl`. Requests go to `llmfleet.req.<model>.<name>` (the only name its permissions
allow), and its inbox prefix and reply subjects are under `_LLMFLEET.r.<name>`, the only
space workers answer it in and the only one it may read.

It follows the reader's rules of docs/protocol.md (protocol 2): skip unknown message
types, follow one `delivery` and check its `seq` (and `heartbeat.last_seq`), take a second
`accepted` of another delivery before any content (a redelivery), and ignore messages of
deliveries it left behind. A worker silent for 3 s (a live one sends a heartbeat every
second) is taken as lost: before its first output the broker redelivers the request after
its ack wait (5 s); batch producers may not ping workers.
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


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--model", default="sim-model")
    ap.add_argument("--name", default="demo", help="producer name (its NATS user name)")
    ap.add_argument("--queue-wait", type=float, default=600.0, help="seconds to wait in the queue")
    ap.add_argument("text", nargs="?", default="Hello")
    args = ap.parse_args()

    # Our own inbox prefix: PubAcks and pongs arrive under the prefix our permissions allow.
    servers = args.nats.split(",")  # one URL, or every node of a cluster
    nc = await nats.connect(
        servers, name=f"produce-{args.name}", inbox_prefix=f"_LLMFLEET.r.{args.name}"
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
    reply_subject = f"_LLMFLEET.r.{args.name}.replies.{request_id}"
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
    headers = {
        "Llmfleet-Version": "2",
        "Llmfleet-Op": "chat",
        "Llmfleet-Request-Id": request_id,
        "Nats-Msg-Id": request_id,  # a re-publish within 2 minutes is deduplicated
        "Llmfleet-Reply": reply_subject,
        # Both in ms after the broker stored it (the broker's clock, not ours):
        "Llmfleet-Queue-Timeout": str(int(args.queue_wait * 1000)),  # else dropped unrun
        "Llmfleet-Timeout": str(15 * 60_000),  # cut generation off at 15 min
    }
    if len(body) + header_bytes(headers) > nc.max_payload:
        # Over max_payload the server would close the connection: pass the body by
        # reference instead (object store LLMFLEET_BODIES_<name>, see docs/protocol.md).
        print("body too large for one message", file=sys.stderr)
        return 2
    subject = f"llmfleet.req.{escape_model(args.model)}.{args.name}"
    ack = await js.publish(subject, body, headers=headers)
    print(f"queued: stream {ack.stream} seq {ack.seq}")

    # 3. Read the reply stream until exactly one terminal message (done or error).
    worker, delivery, left, expect, started = None, None, set(), 0, False
    lost_at = None  # when the worker stopped answering (the broker redelivers after ~5 s)
    while True:
        timeout = args.queue_wait if worker is None and lost_at is None else SILENCE_S
        try:
            msg = await sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            if worker is None:
                if lost_at is not None and time.monotonic() - lost_at < 15.0:
                    continue  # waiting for the redelivery
                print("no worker took the request in time", file=sys.stderr)
                return 1
            if started:
                print(f"worker {worker} died mid-stream", file=sys.stderr)
                return 1
            # Gone before its first output: the broker hands the request to another worker
            # once the ack wait passes. Leave this delivery behind (cancel it in case the
            # worker comes back, and ignore anything it still sends).
            left.add(delivery)
            cancel = json.dumps({"type": "cancel", "request_id": request_id, "delivery": delivery})
            await nc.publish(f"llmfleet.cancel.{worker}.{args.name}", cancel.encode())
            worker, lost_at = None, time.monotonic()
            continue
        reply = json.loads(msg.data)
        kind = reply.get("type")
        if kind not in KNOWN or reply.get("delivery") in left:
            continue  # a newer protocol revision's type, or a delivery we left behind
        print(json.dumps(reply))
        if kind == "accepted":
            if started:  # another delivery after content: stop it, keep ours
                cancel = {"type": "cancel", "request_id": request_id, "delivery": reply["delivery"]}
                left.add(reply["delivery"])
                await nc.publish(f"llmfleet.cancel.{reply['worker']}.{args.name}",
                                 json.dumps(cancel).encode())  # fmt: skip
                continue
            worker, delivery, expect, lost_at = reply["worker"], reply["delivery"], 1, None
            continue
        if reply.get("delivery") != delivery and not (kind == "error" and reply["seq"] == 0):
            continue  # not the delivery we follow
        if kind == "heartbeat":
            if reply["last_seq"] != expect - 1:
                print("a reply message was lost", file=sys.stderr)
                return 1
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
