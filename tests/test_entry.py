"""common/entry.py: console scripts exit with main's status even when a thread would block the
interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent(
    """
    import sys, threading
    from geotrain.common.entry import run_then_exit

    def main():
        # a non-daemon thread that never ends: a normal interpreter exit would wait on it forever
        threading.Thread(target=threading.Event().wait, daemon=False).start()
        print("main ran", flush=False)
        how = sys.argv[1]
        if how == "ok":
            sys.exit(0)
        if how == "code":
            sys.exit(3)
        if how == "message":
            sys.exit("error: bad thing")
        if how == "raise":
            raise RuntimeError("boom")
        return None

    run_then_exit(main)
    """
)


def _run(how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM, how], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_exits_with_mains_status_despite_a_blocking_thread():
    for how, code in (("ok", 0), ("none", 0), ("code", 3)):
        done = _run(how)
        assert done.returncode == code, (how, done.returncode, done.stderr)
        assert done.stdout == "main ran\n", how  # buffered stdout was flushed before exiting


def test_string_exit_and_exception_print_and_exit_1():
    done = _run("message")
    assert done.returncode == 1 and "error: bad thing" in done.stderr
    done = _run("raise")
    assert done.returncode == 1 and "RuntimeError: boom" in done.stderr and "Traceback" in done.stderr
