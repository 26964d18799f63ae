"""`llmfleet`: one CLI for the broker, the gateway, workers, the dev stack and the fleet view.

Flags are declared in `llmfleet.flags`; what each command builds comes from
`llmfleet.roots` (imported only by the commands that need it, so `llmfleet status` starts
fast).
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from llmfleet.flags import build_parser
from llmfleet.loop import run_async, run_with_signals


def _setup_logging(level: str, fmt: str = "text") -> None:
    from common.logs import setup_logging  # noqa: PLC0415

    setup_logging(level, fmt)


def cmd_nats(args: argparse.Namespace) -> None:
    from llmfleet.broker import EmbeddedNats  # noqa: PLC0415

    server = EmbeddedNats(
        host=args.host,
        port=args.port,
        store_dir=args.store or None,
        http_port=args.http_port or None,
        quiet=False,
    )
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    # Handlers first: a signal during start-up must still stop the child broker.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        print(f"nats-server listening on {server.url}", file=sys.stderr, flush=True)
        while not stop["now"] and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.2)
    finally:
        server.stop()


def cmd_gateway(args: argparse.Namespace) -> None:
    from llmfleet.roots import build_gateway  # noqa: PLC0415

    try:
        gw = build_gateway(args, args.nats_url)
    except ValueError as exc:  # a flag the parser could not check (an id, a model path)
        raise SystemExit(f"llmfleet gateway: {exc}") from None
    try:
        ok = run_async(run_with_signals(gw.run, gw.request_stop))
    finally:
        gw.telemetry.shutdown()
    if not ok:
        raise SystemExit(1)


def cmd_worker(args: argparse.Namespace) -> None:
    import faulthandler  # noqa: PLC0415

    from llmfleet.roots import build_worker  # noqa: PLC0415
    from llmfleet.supervise import adopt_parent_death_signal  # noqa: PLC0415

    adopt_parent_death_signal()  # a child of `llmfleet dev` dies with it
    faulthandler.enable()  # a crash in native code says where it happened
    try:
        w = build_worker(args, args.nats_url)
    except ValueError as exc:
        raise SystemExit(f"llmfleet worker: {exc}") from None
    try:
        ok = run_async(run_with_signals(w.run, w.request_drain))
    finally:
        w.telemetry.shutdown()
    if not ok or w.failed:
        raise SystemExit(1)


def _nats_tls(args: argparse.Namespace, command: str) -> ssl.SSLContext | None:
    """`--nats-ca`, `--nats-cert`, `--nats-key` as an ssl.SSLContext (None: none given)."""
    from common.natsconn import tls_context  # noqa: PLC0415

    try:
        return tls_context(args.nats_ca, args.nats_cert, args.nats_key)
    except ValueError as exc:
        raise SystemExit(f"llmfleet {command}: {exc}") from None


def cmd_status(args: argparse.Namespace) -> None:
    from llmfleet import status as statuscli  # noqa: PLC0415

    tls = _nats_tls(args, "status")
    try:
        run_async(
            statuscli.status(
                args.nats_url,
                watch=args.watch,
                interval=args.interval,
                as_json=args.json,
                wait=args.wait,
                tls=tls,
            )
        )
    except statuscli.StatusError as exc:
        raise SystemExit(f"llmfleet status: {exc}") from None
    except KeyboardInterrupt:
        pass


def cmd_drain(args: argparse.Namespace) -> None:
    from llmfleet import status as statuscli  # noqa: PLC0415

    tls = _nats_tls(args, "drain")
    try:
        run_async(
            statuscli.drain(
                args.nats_url, args.worker, wait=args.wait, timeout=args.timeout, tls=tls
            )
        )
    except statuscli.StatusError as exc:
        raise SystemExit(f"llmfleet drain: {exc}") from None


def _admin(
    args: argparse.Namespace,
    command: str,
    run: Callable[[argparse.Namespace, Any], Coroutine[Any, Any, None]],
) -> None:
    """Run an admin command (keys, usage, prices, audit): its one-line error, never a
    traceback; Ctrl-C (`audit tail --follow`) ends it quietly."""
    from llmfleet import adminconn  # noqa: PLC0415

    tls = _nats_tls(args, command)
    try:
        run_async(run(args, adminconn.target(args.nats_url, args.creds, tls)))
    except adminconn.AdminError as exc:
        raise SystemExit(f"llmfleet {command}: {exc}") from None
    except KeyboardInterrupt:
        pass


def cmd_keys(args: argparse.Namespace) -> None:
    from llmfleet import keyscli  # noqa: PLC0415

    _admin(args, f"keys {args.keys_command}", keyscli.run_keys)


def cmd_usage(args: argparse.Namespace) -> None:
    from llmfleet import usagecli  # noqa: PLC0415

    _admin(args, "usage", usagecli.run_usage)


def cmd_prices(args: argparse.Namespace) -> None:
    from llmfleet import usagecli  # noqa: PLC0415

    _admin(args, f"prices {args.prices_command}", usagecli.run_prices)


def cmd_audit(args: argparse.Namespace) -> None:
    from llmfleet import auditcli  # noqa: PLC0415

    _admin(args, "audit tail", auditcli.run_audit)


def cmd_routes(args: argparse.Namespace) -> None:
    from llmfleet import routescli  # noqa: PLC0415

    if args.routes_command == "check":  # offline: no broker, no credentials
        from control.routes import RoutesError  # noqa: PLC0415

        try:
            routescli.check(args.file)
        except RoutesError as exc:
            raise SystemExit(f"llmfleet routes check: {exc}") from None
        return
    _admin(args, f"routes {args.routes_command}", routescli.run_routes)


def cmd_dev(args: argparse.Namespace) -> None:
    from llmfleet.dev import run_dev  # noqa: PLC0415

    run_dev(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "nats": cmd_nats,
    "gateway": cmd_gateway,
    "worker": cmd_worker,
    "dev": cmd_dev,
    "status": cmd_status,
    "drain": cmd_drain,
    "keys": cmd_keys,
    "usage": cmd_usage,
    "prices": cmd_prices,
    "audit": cmd_audit,
    "routes": cmd_routes,
}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
