"""The committed stubs must match the .proto files and import as a package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_import_from_package():
    from geotrain.protos import geotrain_pb2, geotrain_pb2_grpc

    header = geotrain_pb2.DeltaHeader(push_id="p1", base_version=3)
    again = geotrain_pb2.DeltaHeader.FromString(header.SerializeToString())
    assert again.push_id == "p1" and again.base_version == 3
    assert hasattr(geotrain_pb2_grpc, "CoordinatorStub")
