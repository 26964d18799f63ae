"""Publish one chat request to an llmfleet fleet over NATS JetStream (no HTTP, no llmfleet
imports) and print its reply stream until the terminal message.

    pip install nats-py
    python docs/examples/produce.py [--nats nats://127.0.0.1:4222] [--model sim-model] [TEXT]

Wire protocol: docs/protocol.md.
"""

import argparse
import asyncio
import json
import time
import uuid

import nats

SAFE = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def escape_model(model_id: str) -> str:
    """Model id -> one subject token: keep [A-Za-z0-9_-], every other UTF-8 byte -> =XX."""
    return "".join(chr(b) if b in SAFE else f"={b:02X}" for b in model_id.encode())


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--model", default="sim-model")
    ap.add_argument("text", nargs="?", default="Hello")
    args = ap.parse_args()

    nc = await nats.connect(args.nats)
    js = nc.jetstream()

    # 1. Subscribe to a reply subject of our own BEFORE publishing the request.
    request_id = uuid.uuid4().hex
    reply_subject = f"_INBOX.produce.{request_id}"
    sub = await nc.subscribe(reply_subject)
    await nc.flush()

    # 2. Publish the OpenAI body to the model's request subject, through JetStream.
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.text}],
        "max_tokens": 16,
    }
    now_ms = int(time.time() * 1000)
    headers = {
        "Llmfleet-Version": "1",
        "Llmfleet-Op": "chat",
        "Llmfleet-Request-Id": request_id,
        "Nats-Msg-Id": request_id,  # a re-publish within 2 minutes is deduplicated
        "Llmfleet-Reply": reply_subject,
        "Llmfleet-Start-By": str(now_ms + 10 * 60_000),  # drop if not started in 10 min
        "Llmfleet-Deadline": str(now_ms + 15 * 60_000),  # cut generation off at 15 min
    }
    ack = await js.publish(
        f"llmfleet.req.{escape_model(args.model)}", json.dumps(body).encode(), headers=headers
    )
    print(f"queued: stream {ack.stream} seq {ack.seq}")

    # 3. Read the reply stream until exactly one terminal message (done or error).
    #    The timeout is ours to choose: a batch producer may wait a long time in the queue.
    while True:
        msg = await sub.next_msg(timeout=600)
        reply = json.loads(msg.data)
        print(json.dumps(reply))
        if reply["type"] in ("done", "error"):
            break

    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
