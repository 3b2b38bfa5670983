"""Regenerate the committed gRPC stubs from every protos/*.proto.

Run from anywhere: `python protos/generate.py` (or `make protos`). Needs the dev extra's pinned
grpcio-tools. The protos are copied to `geotrain/protos/` under a temporary include root (the path
they are installed at), so the stubs import each other as `from geotrain.protos import x_pb2`.

`python protos/generate.py --check` regenerates into a temporary directory and exits 1 if any
committed stub differs (tests/test_protos.py runs this).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


INSTALLED_AT = Path("geotrain") / "protos"  # the import path of this folder once installed


def generate(out_root: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for each proto under out_root/geotrain/protos/."""
    from grpc_tools import protoc  # dev extra: grpcio-tools (pinned)
    import grpc_tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit("no .proto files found in protos/")
    include = out_root / "include"
    (include / INSTALLED_AT).mkdir(parents=True, exist_ok=True)
    (out_root / INSTALLED_AT).mkdir(parents=True, exist_ok=True)
    for proto in protos:
        shutil.copyfile(proto, include / INSTALLED_AT / proto.name)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for proto in protos:
        args = [
            "grpc_tools.protoc",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(INSTALLED_AT / proto.name),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto.name}")
    return sorted((out_root / INSTALLED_AT).glob("*_pb2*.py*"))


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = PROTO_DIR / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(path.name)
        if stale:
            print("out of date (run `python protos/generate.py`): " + ", ".join(stale))
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        return check()
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, PROTO_DIR / path.name)
            print(f"wrote protos/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
