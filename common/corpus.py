"""The embedded default corpus, the data cache, and resolving a run's data directory.

With no inputs, the corpus is the text of the running Python's standard library ``.py`` files (no
site-packages, test/, tests/, idlelib, lib2to3), sorted by path and capped at
``DEFAULT_CORPUS_BYTES`` (8 MiB) of text. ``default_data_dir()`` prepares it once (byte tokenizer)
into ``$GEOTRAIN_CACHE`` (default ``~/.cache/geotrain``) and reuses it; nothing is downloaded.
``resolve_data_dir`` is what the trainer, coordinator and demo call on a ``--data`` value.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from geotrain.common.fsutil import fsync_dir
from geotrain.common.shards import MANIFEST_NAME, MANIFEST_VERSION, SHARD_VERSION, Manifest, read_shard

DEFAULT_CORPUS_BYTES = 8 * 1024 * 1024  # 8 MiB of standard-library source text
_CORPUS_EXCLUDE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """The embedded default corpus: the standard library's ``.py`` files, sorted, capped at max_bytes.

    Skips site-packages, dist-packages, test/, tests/, idlelib, lib2to3 and __pycache__. Files are
    taken in sorted path order; a file that would push the total past ``max_bytes`` (default
    ``DEFAULT_CORPUS_BYTES``, 8 MiB) is skipped and later, smaller files may still fit.
    """
    cap = DEFAULT_CORPUS_BYTES if max_bytes is None else int(max_bytes)
    root = _stdlib_root()
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _CORPUS_EXCLUDE_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                try:
                    size = p.stat().st_size
                except OSError:
                    continue
                found.append((p.relative_to(root).as_posix(), p, size))
    found.sort()
    picked: list[Path] = []
    total = 0
    for _, p, size in found:
        if size == 0 or total + size > cap:
            continue
        picked.append(p)
        total += size
    return picked


def cache_root() -> Path:
    env = os.environ.get("GEOTRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "geotrain"


def _verified(data_dir: Path) -> bool:
    try:
        manifest = Manifest.load(data_dir)
        for s in manifest.shards:
            read_shard(data_dir / s.name, s, verify_sha=True)
    except (ValueError, OSError):
        return False
    return True


def default_data_dir(max_bytes: int | None = None) -> Path:
    """Prepare the embedded default corpus once (byte tokenizer) into the cache and return its path.

    The directory is named by Python version and a hash of the corpus file list. Preparation goes
    into a temporary directory that is renamed into place, so concurrent callers are safe: the loser
    of the race uses the winner's verified directory.
    """
    files = default_corpus_files(max_bytes)
    if not files:
        raise ValueError(f"the default corpus is empty (no .py files under {_stdlib_root()})")
    root = _stdlib_root()
    h = hashlib.sha256(f"geotrain-corpus v{SHARD_VERSION}/{MANIFEST_VERSION} byte\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{h.hexdigest()[:12]}"
    base = cache_root()
    target = base / name
    if _verified(target):
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base))
    try:
        from geotrain.common.prepare import prepare  # here: prepare.py imports this module

        # in-process (workers=1): as fast for 8 MiB, and safe in scripts without a __main__ guard
        prepare(files, tmp, tokenizer="byte", val_fraction=0.1, workers=1, progress=True)
        for _ in range(3):
            try:
                os.rename(tmp, target)
                fsync_dir(base)
                return target
            except OSError:
                if _verified(target):  # another process finished first
                    return target
                if target.exists():  # a broken leftover: move it aside and retry
                    aside = Path(tempfile.mkdtemp(prefix=f".{name}.bad-", dir=base))
                    try:
                        os.rename(target, aside / "old")
                    except OSError:
                        pass
                    shutil.rmtree(aside, ignore_errors=True)
        raise ValueError(f"could not install the default corpus into {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """None or "" -> ``default_data_dir()``; else the path if it holds a manifest or nanoGPT bins."""
    if data_dir is None or str(data_dir) == "":
        return default_data_dir()
    p = Path(data_dir)
    if (p / MANIFEST_NAME).is_file() or (p / "train.bin").is_file():
        return p
    if not p.exists():
        raise ValueError(f"data directory {p} does not exist")
    raise ValueError(f"{p / MANIFEST_NAME} is missing: run `geotrain prepare --out {p} INPUT...` first")
