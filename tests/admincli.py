"""Running the admin commands (`llmfleet keys`, `usage`, `prices`, `audit`) in tests: in
this process (fast; output read with capsys) or as a real `llmfleet` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, NamedTuple

import pytest

from llmfleet import cli


class Ran(NamedTuple):
    code: int
    out: str
    err: str  # stderr, and the SystemExit message (what the shell would print)

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """`llmfleet ARGS` through `cli.main`, as the console script runs it."""
    code = 0
    message = ""
    try:
        cli.main(list(args))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            code, message = 1, exc.code
        else:
            code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return Ran(code, out, err + message)


def env() -> dict[str, str]:
    """The environment without LLMFLEET_* settings (they would change the defaults)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LLMFLEET_")}


def run_process(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmfleet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        check=False,
    )
