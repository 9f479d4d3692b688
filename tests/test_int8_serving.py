"""Serving weight-only int8 (`--quantize int8-wo`): the host check accepts it on the CPU and refuses it
on a GPU in one line; one shard of the trained demo launched with it answers greedy requests whose
every token is the one the same int8 model, loaded in this process and run through the torch
reference ops (dequantize-on-the-fly matmuls), picks after the same tokens, at >= 99 % of positions
(teacher-forced: the server's tokens fed back one at a time; one shard, so both quantize the same
whole rows)."""

import aiohttp
import pytest
import torch

from mixserve.shards import ops
from mixserve.shards.demo.checkpoint import DemoConfig, ensure_demo_checkpoint
from mixserve.shards.devices import resolve_dtype
from mixserve.shards.preflight import PreflightFailed, plan
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.probe import QuantizationUnavailable, check_supported
from tests.test_bf16_kernels import TRAINED_DEMO_STEPS
from tests.test_bf16_serving import PROMPTS, _greedy
from tests.test_devices import gpus  # noqa: F401 - a fixture
from tests.test_int8_kernels import load_int8_demo, teacher_forced_top1

CPU = torch.device("cpu")
INT8_WO = QuantizationConfig("int8-wo")


def test_the_host_check_takes_int8_wo_on_cpu_and_refuses_it_on_a_gpu(demo_dir, gpus):  # noqa: F811
    found = plan("cpu", "auto", "int8-wo", 1, 1, "tp", str(demo_dir))
    assert (found.device_type, found.dtype) == ("cpu", str(resolve_dtype("auto", CPU)).removeprefix("torch."))
    assert plan("cpu", "float32", "int8-wo", 1, 1, "tp", str(demo_dir)).dtype == "float32"
    assert plan("cpu", "bfloat16", "int8-wo", 1, 1, "tp", str(demo_dir)).dtype == "bfloat16"
    with pytest.raises(PreflightFailed, match="int8-wo computes in float32 or bfloat16"):
        plan("cpu", "float16", "int8-wo", 1, 1, "tp", str(demo_dir))
    gpus(1)
    with pytest.raises(PreflightFailed, match="weight-only int8 for the CPU kernels; on a GPU use --quantize"):
        plan("cuda", "auto", "int8-wo", 1, 1, "tp", str(demo_dir))


def test_the_shards_probe_checks_int8_wo_without_bitsandbytes():
    check_supported(INT8_WO, torch.float32, CPU)
    with pytest.raises(QuantizationUnavailable, match="on device cuda:0: int8-wo is weight-only int8 for the CPU"):
        check_supported(INT8_WO, torch.bfloat16, torch.device("cuda:0"))


@pytest.mark.slow
async def test_an_int8_shard_picks_its_torch_references_greedy_tokens(launch):
    model = load_int8_demo()
    model_dir = ensure_demo_checkpoint(DemoConfig(train_steps=TRAINED_DEMO_STEPS))
    server = launch("--model", str(model_dir), "--num-shard", "1", "--quantize", "int8-wo")
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/info") as response:
        info = await response.json()
    assert info["quantize"] == "int8-wo" and info["model_dtype"] == "float32"
    answers = [await _greedy(server.url, prompt) for prompt in PROMPTS]
    started = server.contract_log("the shard's documented event=ops start-up line names each op's backend")
    assert "quantize=int8-wo" in started and "decoder_layers=native" in started

    ops.select("torch", CPU, torch.float32)
    agree = total = 0
    with torch.inference_mode():
        for prompt_ids, generated in answers:
            sequence = torch.tensor([prompt_ids + generated])
            picks = teacher_forced_top1(model, sequence, sequence.shape[1])[:, 0]  # [L]
            expected = picks[len(prompt_ids) - 1 : -1]  # the picks after the prompt and each generated token
            agree += int((expected == torch.tensor(generated)).sum())
            total += len(generated)
    ops.select("auto", CPU, torch.float32)
    assert agree / total >= 0.99, f"{agree} of {total} greedy tokens are the int8 torch reference's"
