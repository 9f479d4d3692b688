"""Building a shard's model: parameters on the meta device until the checkpoint fills them, and a start
that imports neither accelerate nor torch._dynamo (~1 s and ~2.5 s of every shard's start here)."""

import pytest
import torch

from child_processes import fresh_interpreter
from mixserve.shards.loader import parameters_on_meta


class WithBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3, bias=False)
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("table", torch.arange(4, dtype=torch.float32), persistent=False)


def test_parameters_go_to_meta_and_buffers_stay_real():
    with parameters_on_meta():
        module = WithBuffer()
    assert module.proj.weight.is_meta and type(module.proj.weight) is torch.nn.Parameter
    assert module.frozen.is_meta and not module.frozen.requires_grad and module.proj.weight.requires_grad
    assert not module.table.is_meta and module.table.tolist() == [0.0, 1.0, 2.0, 3.0]
    # Outside the context modules are built as usual.
    assert not torch.nn.Linear(2, 2).weight.is_meta


def test_a_bitsandbytes_parameter_keeps_its_class_and_attributes():
    bnb = pytest.importorskip("bitsandbytes")
    with parameters_on_meta():
        layer = bnb.nn.Linear8bitLt(8, 4, bias=False, has_fp16_weights=False)
    weight = layer.weight
    assert weight.is_meta and type(weight) is bnb.nn.Int8Params
    assert weight.has_fp16_weights is False and not weight.requires_grad


@pytest.mark.slow
def test_loading_and_metering_import_neither_accelerate_nor_dynamo(demo_dir):
    """A shard's load and its KV sizing's memory meter (a TorchDispatchMode, which torch would wrap to
    disable dynamo, importing it at the first op) in a fresh interpreter."""
    probe = (
        "import sys, torch\n"
        "from mixserve.shards.config import ParallelConfig\n"
        "from mixserve.shards.distributed import TensorParallelGroup\n"
        "from mixserve.shards.loader import load_model\n"
        "from mixserve.shards.memory import LiveBytes\n"
        "parallel = ParallelConfig()\n"
        f"model = load_model({str(demo_dir)!r}, parallel, TensorParallelGroup(parallel))\n"
        "with LiveBytes() as meter:\n"
        "    model.lm_head.weight.sum()\n"
        "assert meter.peak > 0\n"
        "print(sorted(name for name in ('accelerate', 'torch._dynamo') if name in sys.modules))\n"
    )
    assert fresh_interpreter(probe) == "[]"
