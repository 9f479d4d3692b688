"""Regenerate the Python stubs in proto/mixserve_pb from the .proto files beside this script.

Run `python proto/generate_stubs.py` after editing a .proto; tests/test_proto_stubs.py fails
when the committed stubs drift from what this produces.
"""

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE = "mixserve_pb"


def generate(out_dir: Path) -> None:
    """Write `<out_dir>/mixserve_pb/*_pb2*.py` for every .proto in proto/."""
    from grpc_tools import protoc

    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PACKAGE}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(f"{PACKAGE}/{name}" for name in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


if __name__ == "__main__":
    generate(PROTO_DIR if len(sys.argv) < 2 else Path(sys.argv[1]))
