"""`bench gpu` part (c): the tokens the server generates on the device against transformers' Mixtral.

A small Mixtral with one Mixtral-8x7B rank's attention shape (8 query heads, 2 KV heads, head dim 128;
8 experts, top 2; 2 layers; random weights) is written on the machine and served at TP 1 with the
default kernels (on a GPU: the Triton kernels and the decode CUDA graphs), once per dtype. Prompts of
several lengths go in at once (a batched prefill, then decode steps padded to a graph bucket), greedy.

transformers' `MixtralForCausalLM` in fp32 on the same device (TF32 off) then reads each prompt and its
generated tokens teacher-forced: a position agrees when the served token is the reference's top-1.
Where it is not, the reference's logit gap between its top-1 and the served token (in units of the
row's logit spread) says whether that was a near tie (dtype rounding) or a wrong token. Random weights
make near ties common in bf16, so a run agrees when its top-1 agreement is >= 99 % per position
(issue 20's bar), when every miss is within the dtype's gap, or when it misses no more positions than
transformers itself in that dtype does on the same sequences (its own top-1 against its fp32 top-1):
on the first H200 run, served bf16 missed 4 of 144 and transformers' bf16 7.
"""

import asyncio
import logging
import time
from pathlib import Path

from mixserve.benchmarks.processes import PYTHON, ServerProcess, child_env, free_port
from mixserve.shards.demo.checkpoint import TINY

log = logging.getLogger("mixserve.bench")

# One Mixtral-8x7B rank of four's attention (32 / 4 query heads, 8 / 4 KV heads, head dim 128).
GPU_MODEL = dict(
    hidden_size=1024,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1024,
    num_local_experts=8,
    max_position_embeddings=2048,
)
# The dry run's: the tiny demo, which starts on a CPU in seconds.
CPU_MODEL = TINY
PROMPTS = (
    "The river",
    "Once upon a time there was a small boat on a quiet lake",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12",
    "A long prompt spans several KV blocks. " * 12,
    "Mixture of experts",
    "Tensor parallel shards talk to each other over NCCL, " * 5,
)
NEW_TOKENS = 24
# A miss whose reference logit gap (top-1's logit less the served token's, over the row's standard
# deviation) is at most this is a near tie in that dtype.
# fp32's covers summation order: kernels, cuBLAS and transformers add in different orders.
TIE_GAP = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 2e-2}
MIN_TOP1 = 0.99


def write_model(out_dir: Path, on_gpu: bool) -> Path:
    from mixserve.shards.demo.checkpoint import DemoConfig, write_demo_checkpoint

    return write_demo_checkpoint(out_dir, DemoConfig(**(GPU_MODEL if on_gpu else CPU_MODEL)))


async def _served(url: str, timeout_s: float) -> list[dict]:
    """Each prompt's prompt ids and generated ids (TGI /generate with details), the prompts sent at once."""
    import aiohttp

    async def generate(session, prompt: str) -> dict:
        body = {
            "inputs": prompt,
            "parameters": {"max_new_tokens": NEW_TOKENS, "details": True, "decoder_input_details": True},
        }
        async with session.post(f"{url}/generate", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"/generate answered {response.status}: {(await response.text())[:300]}")
            details = (await response.json())["details"]
            return {"prompt": [t["id"] for t in details["prefill"]], "generated": [t["id"] for t in details["tokens"]]}

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(generate(session, p) for p in PROMPTS)))


def serve_greedy(model_dir: Path, device: str, dtype: str, log_path: Path, budget_s: float) -> dict:
    """Start one shard on `model_dir` in `dtype`, send the prompts at once, stop it."""
    port = free_port()
    cmd = [
        *(PYTHON, "-m", "mixserve.cli", "launch", "--model", str(model_dir), "--num-shard", "1"),
        *("--device", device, "--dtype", dtype, "--port", str(port)),
        *("--max-batch-size", str(len(PROMPTS)), "--max-total-tokens", "1024"),
    ]
    env = child_env()
    env.pop("TRITON_INTERPRET", None)
    started = time.monotonic()
    server = ServerProcess(f"mixserve-{dtype}", cmd, log_path, env)
    record: dict = {"dtype": dtype, "command": " ".join(["mixserve", *cmd[3:]]), "log": log_path.name}
    try:
        record["startup_s"] = round(server.wait_http_ready(f"http://127.0.0.1:{port}/health", budget_s * 0.8), 1)
        remaining = max(10.0, budget_s - (time.monotonic() - started))
        record["sequences"] = asyncio.run(_served(f"http://127.0.0.1:{port}", remaining))
        record["ops"] = _ops_line(log_path)
    except (RuntimeError, TimeoutError, OSError) as error:
        record["error"] = str(error).splitlines()[0][:300]
        log.warning("event=agree_server_failed dtype=%s error=%s", dtype, record["error"])
    finally:
        server.stop()
    return record


def _ops_line(log_path: Path) -> str | None:
    """The shard's start-up choice of implementations, grouped by backend, and its decode graph line."""
    parts = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "event=ops " in line:
            by_backend: dict[str, list[str]] = {}
            for field in line.split("event=ops ", 1)[1].split():
                name, _, backend = field.partition("=")
                if backend in ("torch", "native", "triton"):
                    by_backend.setdefault(backend, []).append(name)
            parts.append("; ".join(f"{backend}: {', '.join(names)}" for backend, names in by_backend.items()))
        elif "event=decode_graphs" in line:
            parts.append(line.split("event=", 1)[1])
    return " | ".join(parts) or None


def score(model, sequences: list[dict], device, tie_gap: float, baseline_misses: int | None = None) -> dict:
    """Teacher-forced top-1 agreement of the served tokens with `model` (fp32), with the misses' gaps;
    `baseline_misses`: what transformers in the served dtype misses on the same sequences."""
    import torch

    positions = agree = exact_prefix = 0
    misses = []
    for index, seq in enumerate(sequences):
        ids = seq["prompt"] + seq["generated"]
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0].float()
        rows = logits[len(seq["prompt"]) - 1 : len(ids) - 1]
        top1 = rows.argmax(-1).tolist()
        served = seq["generated"]
        prefix = next((i for i, (a, b) in enumerate(zip(top1, served, strict=True)) if a != b), len(served))
        exact_prefix += prefix
        for pos, (ref, got) in enumerate(zip(top1, served, strict=True)):
            positions += 1
            if ref == got:
                agree += 1
                continue
            # In units of the row's logit spread: a random model's logits are close together.
            gap = float((rows[pos, ref] - rows[pos, got]) / rows[pos].std())
            misses.append({"prompt": index, "position": pos, "reference": ref, "served": got, "gap": round(gap, 5)})
    rate = agree / positions if positions else 0.0
    ties_only = all(m["gap"] <= tie_gap for m in misses)
    return {
        "positions": positions,
        "top1_agree": agree,
        "top1_rate": round(rate, 4),
        "greedy_prefix_tokens": exact_prefix,
        "misses": misses[:20],
        "max_gap": max((m["gap"] for m in misses), default=0.0),
        "tie_gap": tie_gap,
        "baseline_misses": baseline_misses,
        "agrees": bool(positions)
        and (rate >= MIN_TOP1 or ties_only or (baseline_misses is not None and len(misses) <= baseline_misses)),
    }


def dtype_misses(model, low_model, sequences: list[dict], device) -> int:
    """Positions of the served sequences where `low_model`'s top-1 is not `model`'s (fp32) top-1."""
    import torch

    misses = 0
    for seq in sequences:
        ids = torch.tensor([seq["prompt"] + seq["generated"]], device=device)
        rows = slice(len(seq["prompt"]) - 1, ids.shape[1] - 1)
        with torch.no_grad():
            reference = model(ids).logits[0, rows].argmax(-1)
            low = low_model(ids).logits[0, rows].argmax(-1)
        misses += int((reference != low).sum())
    return misses


def reference_model(model_dir: Path, device):
    import torch
    from transformers import MixtralForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.to(device).eval()


def run_agreement(out_dir: Path, device, dtypes: list[str], budget_s: float, scratch: Path) -> dict:
    """Serve the model in each dtype (within budget_s in all), then score every served run."""
    started = time.monotonic()
    model_dir = write_model(scratch / "agree-model", device.type == "cuda")
    runs = []
    for dtype in dtypes:
        left = budget_s - (time.monotonic() - started)
        if left < 30:
            runs.append({"dtype": dtype, "skipped": f"{left:.0f} s of the agreement budget left"})
            continue
        runs.append(serve_greedy(model_dir, device.type, dtype, out_dir / f"agree-{dtype}.log", left))
    served = [run for run in runs if "sequences" in run]
    if served:
        import torch

        model = reference_model(model_dir, device)
        for run in served:
            baseline = None
            if run["dtype"] != "float32":
                low = reference_model(model_dir, device).to(getattr(torch, run["dtype"]))
                baseline = dtype_misses(model, low, run["sequences"], device)
                del low
            run["score"] = score(model, run["sequences"], device, TIE_GAP.get(run["dtype"], 1e-3), baseline)
            log.info(
                "event=agreement dtype=%s top1=%d/%d greedy_prefix=%d max_gap=%.4f transformers_misses=%s agrees=%s",
                run["dtype"],
                run["score"]["top1_agree"],
                run["score"]["positions"],
                run["score"]["greedy_prefix_tokens"],
                run["score"]["max_gap"],
                baseline,
                run["score"]["agrees"],
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "model": GPU_MODEL if device.type == "cuda" else CPU_MODEL,
        "prompts": len(PROMPTS),
        "new_tokens": NEW_TOKENS,
        "runs": runs,
        "seconds": round(time.monotonic() - started, 1),
    }
