"""The committed gRPC stubs are exactly what proto/generate_stubs.py makes from the .proto files."""

import importlib.util

from child_processes import REPO


def test_committed_stubs_match_the_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_stubs", REPO / "proto" / "generate_stubs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    fresh = sorted(p.name for p in (tmp_path / "mixserve_pb").iterdir())
    committed = sorted(p.name for p in (REPO / "proto" / "mixserve_pb").glob("*_pb2*"))
    assert fresh == committed
    for name in fresh:
        assert (tmp_path / "mixserve_pb" / name).read_bytes() == (REPO / "proto" / "mixserve_pb" / name).read_bytes(), (
            f"{name} drifted: run python proto/generate_stubs.py"
        )
