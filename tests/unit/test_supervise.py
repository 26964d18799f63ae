"""The dev stack's restart decisions (llmfleet/supervise.py), without processes."""

from __future__ import annotations

import signal

from llmfleet.supervise import describe_exit, next_backoff


def test_a_crash_is_named_by_its_signal_with_what_it_means() -> None:
    assert describe_exit(-signal.SIGILL).startswith("signal SIGILL (illegal instruction")
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV (a crash in native code)"
    assert describe_exit(-signal.SIGUSR1) == "signal SIGUSR1"
    assert describe_exit(1) == "exit code 1"


def test_restarts_back_off_while_the_child_keeps_dying_and_reset_after_it_ran() -> None:
    delays = [next_backoff(0.0, 0.0)]
    for _ in range(7):
        delays.append(next_backoff(delays[-1], ran_for=2.0))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert next_backoff(30.0, ran_for=61.0) == 1.0  # it had been healthy for a minute
