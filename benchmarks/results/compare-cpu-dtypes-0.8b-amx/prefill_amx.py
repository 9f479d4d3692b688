# prefill_amx.py TOKENS ROUNDS: one prompt's prefill through the 0.8B shape as one of two ranks holds it
# (int8-gemm-crossover-0.8b/prefill.py's set-up), one thread, on this AMX machine: bf16 through the C
# decoder-layer kernel, bf16 through torch (oneDNN, AMX) as the served bf16 shards chose from 32 tokens
# (warm-up `max_tokens=16`), and int8-wo as served (the MoE in the C kernels up to 256 tokens, linears
# on the dequantize-then-GEMM path from 48 rows), and int8-wo with its MoE steps forced onto the GEMM
# path, and bf16 with its MoE steps over 16 tokens on torch's grouped GEMMs too (moe.fits patched).
# Alternating round by round; median and min of ROUNDS after one warm-up round.
import json, statistics, sys, tempfile, time
from pathlib import Path
from types import SimpleNamespace
import torch
from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernels.checks import ELEMENT_I8
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.loader import load_model
from mixserve.shards.ops import cpu
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.step_inputs import step_inputs

torch.set_num_threads(1)
tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 129
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 1024,
          "intermediate_size": 1792, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 128, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 16000,
          "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "torch_dtype": "bfloat16"}
now_gemm, now_fits = cpu._int8_gemm, cpu._step_fits


def moe_gemm(x, past_cap, bf16_from=None):  # every int8 step on the GEMM path (bf16 matmuls: AMX here)
    return True


def off_layer_kernel(halves, hidden, cache, meta):
    return False


kernel_fits = cpu.moe.fits


def torch_moe_past_16(tokens):  # the MoE kernel only for steps the served bf16 warm-up left it (<= 16)
    return tokens <= 16


variants = {
    "bf16 C kernels": (None, now_gemm, now_fits, None),
    "bf16 torch (as served here)": (None, now_gemm, now_fits, 16),
    "int8 as served": ("int8-wo", now_gemm, now_fits, None),
    "int8 MoE on the GEMM path": ("int8-wo", moe_gemm, off_layer_kernel, None),
    "bf16 torch, MoE too": (None, now_gemm, now_fits, 16),
}
with tempfile.TemporaryDirectory() as d, torch.inference_mode():
    Path(d, "config.json").write_text(json.dumps(config))
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    models = {}
    for quantize in ("int8-wo", None):
        q = QuantizationConfig(quantize) if quantize else None
        models[quantize] = load_model(d, parallel, group, dtype=torch.bfloat16, quantization=q, load_format="dummy")
    chosen = ops.select("auto", torch.device("cpu"), torch.bfloat16)
    cache = KVCache(8, 32, 16, 1, 128, torch.bfloat16, torch.device("cpu"))
    step = SimpleNamespace(token_ids=list(range(1, tokens + 1)), start_position=0, slot_mapping=list(range(tokens)),
                           block_table=list(range(32)), num_proposed=0, prompt_logprobs=False)
    cap = chosen.decoder_layers_max_tokens
    times = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, (quantize, gemm, fits, layer_tokens) in variants.items():
            cpu._int8_gemm, cpu._step_fits = gemm, fits
            cpu.moe.fits = torch_moe_past_16 if name == "bf16 torch, MoE too" else kernel_fits
            ops.set_decoder_layer_tokens(layer_tokens or cap)
            inputs = step_inputs([step], 16, torch.device("cpu"), layer_tokens or cap)
            started = time.perf_counter()
            models[quantize](inputs.token_ids, inputs.positions, cache, inputs.meta, inputs.logits_indices)
            if r:
                times[name].append(time.perf_counter() - started)
for name, t in times.items():
    print(f"{tokens} tokens, {name}: {statistics.median(t) * 1e3:.1f} ms (min {min(t) * 1e3:.1f})", flush=True)
