"""External tools for tests (promtool, shellcheck, systemd-analyze, check-jsonschema).

A missing tool skips the test locally but fails it in CI (``CI`` set in the environment), so a CI
machine that lacks a tool can never pass by silently skipping.

promtool is taken from, in order: ``PATH``; ``$GEOTRAIN_TOOLS/prometheus/usr/bin/promtool``; the
cache ``${XDG_CACHE_HOME:-~/.cache}/geotrain-tools/prometheus/usr/bin/promtool``, which is filled
once from Debian's ``prometheus`` package (``apt-get download`` + ``dpkg -x``; no root, nothing
installed system-wide).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

IN_CI = bool(os.environ.get("CI"))


def missing_tool(reason: str) -> None:
    """Skip the calling test, or fail it in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: missing tools fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, hint: str = "") -> str:
    """Path of executable `name` on PATH, else skip (fail in CI)."""
    path = shutil.which(name)
    if path is None:
        missing_tool(f"{name} not found on PATH" + (f"; {hint}" if hint else ""))
    return path  # type: ignore[return-value]


def venv_tool(name: str) -> str:
    """An executable installed next to the running interpreter (the venv's bin/), else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return require_tool(name, hint="install the dev extra: pip install -e '.[dev]'")


def tools_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "geotrain-tools"


def _extract_prometheus_deb(dest: Path) -> None:
    """Download Debian's prometheus .deb and unpack it into `dest` (atomically)."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not available to fetch promtool")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".prometheus-") as tmp:
        work = Path(tmp)
        attempt = subprocess.run(
            ["apt-get", "download", "prometheus"], cwd=work, capture_output=True, text=True, timeout=600
        )
        if attempt.returncode != 0:
            # No package lists on this machine (fresh container, not root): keep a private set of
            # lists in the cache instead of touching /var/lib/apt.
            state, cache = work / "apt-state", work / "apt-cache"
            (state / "lists" / "partial").mkdir(parents=True)
            (cache / "archives" / "partial").mkdir(parents=True)
            opts = [
                "-o", f"Dir::State={state}",
                "-o", "Dir::State::status=/var/lib/dpkg/status",
                "-o", f"Dir::Cache={cache}",
                "-o", "Debug::NoLocking=1",
            ]
            update = subprocess.run(["apt-get", *opts, "update"], capture_output=True, text=True, timeout=600)
            attempt = subprocess.run(
                ["apt-get", *opts, "download", "prometheus"], cwd=work, capture_output=True, text=True, timeout=600
            )
            if attempt.returncode != 0:
                raise RuntimeError(
                    "apt-get download prometheus failed:\n" + update.stderr[-2000:] + attempt.stderr[-2000:]
                )
        debs = sorted(work.glob("prometheus_*.deb"))
        if not debs:
            raise RuntimeError("apt-get download produced no prometheus_*.deb")
        unpacked = work / "prometheus"
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True, capture_output=True, timeout=300)
        if not (unpacked / "usr" / "bin" / "promtool").is_file():
            raise RuntimeError("the prometheus package holds no usr/bin/promtool")
        if dest.exists():  # another process won the race
            return
        os.replace(unpacked, dest)


def find_promtool(download: bool = True) -> str | None:
    """Path to promtool, fetching it into the cache once if needed; None if it can't be had."""
    on_path = shutil.which("promtool")
    if on_path:
        return on_path
    candidates = []
    if os.environ.get("GEOTRAIN_TOOLS"):
        candidates.append(Path(os.environ["GEOTRAIN_TOOLS"]) / "prometheus" / "usr" / "bin" / "promtool")
    cached = tools_cache_dir() / "prometheus"
    candidates.append(cached / "usr" / "bin" / "promtool")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    if not download:
        return None
    try:
        _extract_prometheus_deb(cached)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write(f"find_promtool: {exc}\n")
        return None
    promtool = cached / "usr" / "bin" / "promtool"
    return str(promtool) if promtool.is_file() else None


def require_promtool() -> str:
    path = find_promtool()
    if path is None:
        missing_tool("promtool unavailable (not on PATH, not in $GEOTRAIN_TOOLS or the cache, download failed)")
    return path  # type: ignore[return-value]
