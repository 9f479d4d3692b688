# prefill.py TOKENS ROUNDS: one prompt's prefill (the forward of TOKENS tokens from position 0) through the
# 0.8B shape as one of two tensor-parallel ranks holds it (heads 4 / KV 1, intermediate 1792, vocab 16000,
# 8 layers: a config of those shapes in one process, random weights), one thread: bf16 weights, and
# int8-wo in bf16 under the path choice before this change (int8 MoE steps from 33 tokens and linears
# from 17 rows on the GEMM path; such steps kept off the decoder-layer kernel) and after it (the MoE
# and the decoder-layer kernel up to their cap, linears on the GEMM path from 48 rows). Alternating
# round by round; median and min of ROUNDS after one warm-up round.
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


def before_gemm(x, past_cap, bf16_from=None):  # the MoE from 33 tokens, the linears from 17 rows (their cap + 1)
    return now_gemm(x, past_cap, 33 if bf16_from is None else 17)


def before_fits(halves, hidden, cache, meta):  # int8 experts off the layer kernel where the GEMM path took them
    return now_fits(halves, hidden, cache, meta) and not (
        halves[1].weight_type == ELEMENT_I8 and before_gemm(hidden, False)
    )


variants = {"bf16": (None, now_gemm, now_fits), "int8 before": ("int8-wo", before_gemm, before_fits),
            "int8 now": ("int8-wo", now_gemm, now_fits)}
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
    inputs = step_inputs([step], 16, torch.device("cpu"), chosen.decoder_layers_max_tokens)
    times = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, (quantize, gemm, fits) in variants.items():
            cpu._int8_gemm, cpu._step_fits = gemm, fits
            started = time.perf_counter()
            models[quantize](inputs.token_ids, inputs.positions, cache, inputs.meta, inputs.logits_indices)
            if r:
                times[name].append(time.perf_counter() - started)
for name, t in times.items():
    print(f"{tokens} tokens, {name}: {statistics.median(t) * 1e3:.1f} ms (min {min(t) * 1e3:.1f})", flush=True)
