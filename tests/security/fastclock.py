"""Run the `llmfleet` CLI with this process's wall clock skewed (attack 8, test_clock.py).

    python tests/security/fastclock.py SECONDS llmfleet-args...

`faketime` is not installed on the test machines and the system clock cannot be changed,
so this launcher moves `time.time` and `time.time_ns` SECONDS ahead before anything of
llmfleet is imported, then runs `llmfleet.cli.main`. Monotonic clocks stay true, as they
do on a host whose wall clock is set wrong.
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    skew_s = float(sys.argv[1])
    skew_ns = int(skew_s * 1e9)
    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + skew_s
    time.time_ns = lambda: real_time_ns() + skew_ns

    from llmfleet.cli import main as cli  # noqa: PLC0415 - after the clock is moved

    cli(sys.argv[2:])


if __name__ == "__main__":
    main()
