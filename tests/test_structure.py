"""The package's import graph and its installed layout.

The roles never import each other: a worker host needs no coordinator code and the reverse, and
common/ (config, model, codecs) serves both without gRPC. Everything installs under `geotrain.`:
a wheel with a top-level `common` or `worker` would clash with any other project's module of that
name, so no module may import the repository's folder names directly either.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the package it installs as
PACKAGES = {"common": "geotrain.common", "coordinator": "geotrain.coordinator", "worker": "geotrain.worker",
            "protos": "geotrain.protos", "geotrain": "geotrain"}
OLD_TOP_LEVEL = ("common", "coordinator", "worker", "protos")
# importer package -> imported module prefixes it must never reach
FORBIDDEN = {
    "geotrain.worker": ("geotrain.coordinator",),
    "geotrain.coordinator": ("geotrain.worker",),
    "geotrain.common": ("geotrain.worker", "geotrain.coordinator", "geotrain.protos", "grpc", "grpc_health"),
}


def module_name(path: Path) -> str:
    """geotrain module name of a source file of the repository (common/x.py -> geotrain.common.x)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (functions, classes,
    `if TYPE_CHECKING:` blocks); relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from geotrain import worker` imports geotrain.worker
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def source_files() -> list[Path]:
    files = [p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))]
    return [p for p in files if "__pycache__" not in p.parts]


def violations(files: list[Path]) -> list[str]:
    """One line per offending import statement and rule."""
    bad: dict[tuple[str, int, str], str] = {}
    for path in files:
        importer = module_name(path)
        for line, target in imports_of(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if target.split(".")[0] in OLD_TOP_LEVEL:
                bad.setdefault((str(path), line, "old"), f"{where} (the installed name is geotrain.{target})")
                continue
            for owner, banned in FORBIDDEN.items():
                if importer == owner or importer.startswith(owner + "."):
                    for prefix in banned:
                        if target == prefix or target.startswith(prefix + "."):
                            key = (str(path), line, prefix)
                            bad.setdefault(key, f"{where} ({owner} must not import {prefix})")
    return list(bad.values())


def test_import_graph_keeps_the_roles_apart():
    files = source_files()
    assert len(files) > 30, "the walk found too few modules: is ROOT right?"
    assert violations(files) == []


def test_the_walk_sees_function_level_and_old_style_imports(tmp_path, monkeypatch):
    """The checker itself: each kind of forbidden edge, hidden where a top-level scan misses it."""
    fake = tmp_path / "repo"
    for folder in PACKAGES:
        (fake / folder).mkdir(parents=True)
    (fake / "worker" / "bad.py").write_text(
        "def f():\n    from geotrain.coordinator.state import CoordinatorState\n")
    (fake / "coordinator" / "bad.py").write_text("class C:\n    def m(self):\n        from ..worker import runner\n")
    (fake / "common" / "bad.py").write_text("import grpc\nfrom geotrain import protos\n")
    (fake / "common" / "old.py").write_text("from common.config import RunConfig\n")
    (fake / "geotrain" / "ok.py").write_text("from geotrain.worker import cli\nfrom geotrain.coordinator import cli\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    found = violations(source_files())
    assert len(found) == 5, found
    assert any("worker/bad.py:2 imports geotrain.coordinator.state" in v for v in found)
    assert any("coordinator/bad.py:3 imports geotrain.worker" in v for v in found)
    assert any("common/bad.py:1 imports grpc" in v for v in found)
    assert any("common/bad.py:2 imports geotrain.protos" in v for v in found)
    assert any("common/old.py:1 imports common.config" in v for v in found)


def test_wheel_installs_only_the_geotrain_package(tmp_path):
    """The built wheel holds `geotrain/...` and its dist-info, nothing else at the top level.
    Built from a copy of the sources: setuptools leaves build/ behind, whose stale files would
    otherwise enter later wheels (and the repository's own checkout)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("geotrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith((".dist-info", ".data"))} == {"geotrain"}, sorted(top)
    for old in OLD_TOP_LEVEL:
        assert f"{old}/__init__.py" not in names and f"{old}.py" not in names
    for package in ("common", "coordinator", "worker", "protos"):
        assert f"geotrain/{package}/__init__.py" in names
    assert "geotrain/protos/geotrain.proto" in names
