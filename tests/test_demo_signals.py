"""`geotrain demo` stopped by a SIGTERM to the parent (a supervisor, `timeout`, a container stop)
stops its coordinator and workers too, instead of leaving them training as orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_to_the_demo_stops_its_children(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    demo = subprocess.Popen(
        [sys.executable, "-c", "from geotrain.cli import main; main()", "demo", "--workers", "2",
         "--steps", "100000", "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    kids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(kids) < 3:  # the coordinator and 2 workers
            assert demo.poll() is None, "the demo exited before its workers started"
            kids |= _children(demo.pid)
            time.sleep(0.2)
        assert len(kids) >= 3, kids
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 128 + signal.SIGTERM
        time.sleep(0.5)
        assert not [k for k in kids if _alive(k)], "children left running after the demo's SIGTERM"
    finally:
        for k in kids | (_children(demo.pid) if demo.poll() is None else set()):
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        if demo.poll() is None:
            demo.kill()
