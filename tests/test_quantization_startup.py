"""bitsandbytes start-up errors: the probe naming what cannot run, and `mixserve launch` refusing an unknown
`--quantize` mode or an impossible device before anything starts."""

import subprocess

import pytest
import torch

from child_processes import PYTHON, REPO, free_port, subprocess_env
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.probe import QuantizationUnavailable, check_supported

CPU = torch.device("cpu")


def test_probe_names_what_cannot_run():
    config = QuantizationConfig("bitsandbytes-nf4")
    with pytest.raises(QuantizationUnavailable, match="float64 on device cpu: bitsandbytes computes only in"):
        check_supported(config, torch.float64, CPU)
    with pytest.raises(QuantizationUnavailable, match="bitsandbytes-nf4 with dtype float32 on device meta"):
        check_supported(config, torch.float32, torch.device("meta"))
    check_supported(config, torch.bfloat16, CPU)


@pytest.mark.slow
def test_unknown_mode_is_refused_before_anything_starts():
    done = subprocess.run(
        [PYTHON, "-m", "mixserve.cli", "launch", "--quantize", "bitsandbytes-int3"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "invalid choice: 'bitsandbytes-int3'" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_impossible_device_is_refused_before_any_shard_starts(demo_dir):
    cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--model", str(demo_dir), "--num-shard", "1"]
    cmd += ["--quantize", "bitsandbytes-nf4", "--device", "cuda", "--port", str(free_port())]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(done.stderr.splitlines()) == 1 and "event=startup_refused error=--device cuda: torch" in done.stderr
