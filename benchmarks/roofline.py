"""`mixserve bench roofline`: what this machine could do at best with this model.

Measured with torch (fp32): memory bandwidth (read and copy of a tensor as large as the model's
weights, the set that successive steps stream through, so a model that fits the caches gets the
caches' speed; the read is the fastest of torch's sum and a C loop reading several streams at once,
benchmarks/read_bandwidth.py) and matmul FLOP/s (square fp32 matmul), on one thread and on every core; the
ceilings take the better of the two for each. From the checkpoint's config, the bytes and FLOPs
of a step:

- decode, batch B: every weight a step touches is read once: attention (q, k, v, o), router
  gate, norms, lm_head, B embedding rows, and per layer the experts the batch routes to
  (top-k of E for one sequence; E·(1 - (1 - k/E)^B) expected for B sequences routed uniformly);
  plus the KV cache of every sequence's context. Ceiling = B / max(bytes / bandwidth,
  FLOPs / FLOP/s).
- prefill of P tokens: every expert is read (P tokens reach them all), FLOPs are 2 per active
  parameter per token plus attention; ceiling = P / max(bytes / bandwidth, FLOPs / FLOP/s).
- serving at concurrency C with P-token prompts and N output tokens: C prefills then N decode
  steps of batch C; ceiling = C·N / (C·prefill time + N·decode step time).
"""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("mixserve.bench")

# Smallest tensor the bandwidth is measured on, so that timer resolution does not matter.
MIN_BANDWIDTH_BYTES = 16 << 20
MATMUL_SIZE = 1024


@dataclass(slots=True, frozen=True)
class MachinePeaks:
    """Best-of-repeats throughput of torch on this machine with `threads` threads."""

    threads: int
    read_bytes_s: float
    copy_bytes_s: float
    matmul_flop_s: float


def best_seconds(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure_peaks(threads: int, bandwidth_bytes: int, repeats: int = 5) -> MachinePeaks:
    """Read bandwidth (the fastest of a tensor sum and the C read of several streams: read_bandwidth.py),
    copy bandwidth (bytes read + written) and fp32 matmul FLOP/s."""
    import torch

    from mixserve.benchmarks.read_bandwidth import read_seconds

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        source = torch.ones(bandwidth_bytes // 4, dtype=torch.float32)
        target = torch.empty_like(source)
        read_s = min(read_seconds(source, threads) for _ in range(repeats + 1))
        copy_s = best_seconds(lambda: target.copy_(source), repeats)
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
        b = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
        matmul_s = best_seconds(lambda: torch.mm(a, b), repeats)
    finally:
        torch.set_num_threads(previous)
    return MachinePeaks(threads, bandwidth_bytes / read_s, 2 * bandwidth_bytes / copy_s, 2 * MATMUL_SIZE**3 / matmul_s)


@dataclass(slots=True, frozen=True)
class ModelFootprint:
    """The sizes of a Mixtral checkpoint that set its bytes and FLOPs per step."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    dtype_bytes: int = 4

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype_bytes: int = 4) -> "ModelFootprint":
        """Read `<model_dir>/config.json`."""
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        heads = raw["num_attention_heads"]
        return cls(
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            num_experts=raw["num_local_experts"],
            experts_per_token=raw["num_experts_per_tok"],
            vocab_size=raw["vocab_size"],
            dtype_bytes=dtype_bytes,
        )

    @property
    def attention_params(self) -> int:
        """q, k, v, o of one layer."""
        h, d = self.hidden_size, self.head_dim
        return 2 * h * self.num_heads * d + 2 * h * self.num_kv_heads * d

    @property
    def expert_params(self) -> int:
        """w1, w2, w3 of one expert."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def dense_layer_params(self) -> int:
        """What every token of a layer reads besides its experts: attention, gate, two norms."""
        return self.attention_params + self.num_experts * self.hidden_size + 2 * self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one position over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def experts_touched(self, batch: int) -> float:
        """Expected distinct experts per layer that `batch` tokens route to (uniform routing)."""
        e, k = self.num_experts, self.experts_per_token
        return e * (1 - (1 - k / e) ** batch)

    def decode_bytes(self, batch: int, context: int) -> float:
        """Bytes one decode step of `batch` sequences of `context` cached tokens reads."""
        per_layer = self.dense_layer_params + self.experts_touched(batch) * self.expert_params
        head = self.vocab_size * self.hidden_size + self.hidden_size + batch * self.hidden_size
        weights = (self.num_layers * per_layer + head) * self.dtype_bytes
        return weights + batch * (context + 1) * self.kv_bytes_per_token

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs of one token attending to `context` earlier ones."""
        active = self.dense_layer_params + self.experts_per_token * self.expert_params
        attention = 4 * self.num_heads * self.head_dim * (context + 1)
        return 2 * (self.num_layers * active + self.vocab_size * self.hidden_size) + self.num_layers * attention

    def prefill_bytes(self) -> float:
        """Bytes a prefill reads: every weight but the embedding table (a prompt reaches every expert)."""
        per_layer = self.dense_layer_params + self.num_experts * self.expert_params
        head = self.vocab_size * self.hidden_size + self.hidden_size
        return (self.num_layers * per_layer + head) * self.dtype_bytes


def decode_step_seconds(peaks: MachinePeaks, model: ModelFootprint, batch: int, context: int) -> float:
    """Least time one decode step can take: memory- or compute-bound, whichever is slower."""
    return max(
        model.decode_bytes(batch, context) / peaks.read_bytes_s,
        batch * model.flops_per_token(context) / peaks.matmul_flop_s,
    )


def prefill_seconds(peaks: MachinePeaks, model: ModelFootprint, prompt_len: int) -> float:
    """Least time one prompt's prefill can take."""
    flops = sum(model.flops_per_token(position) for position in range(prompt_len))
    return max(model.prefill_bytes() / peaks.read_bytes_s, flops / peaks.matmul_flop_s)


def ceilings(
    peaks: MachinePeaks, model: ModelFootprint, concurrency: int, input_len: int, output_len: int
) -> dict[str, float]:
    """Decode, prefill and serving ceilings (tokens/s) for a workload at one concurrency."""
    context = input_len + output_len // 2
    step = decode_step_seconds(peaks, model, concurrency, context)
    prefill = prefill_seconds(peaks, model, input_len)
    return {
        "decode_tok_s": concurrency / step,
        "prefill_tok_s": input_len / prefill,
        "serving_output_tok_s": concurrency * output_len / (concurrency * prefill + output_len * step),
    }


def roofline(model_dir: str, concurrency: list[int], input_len: int, output_len: int) -> dict:
    """Measure the machine (one thread, then every core) and compute the model's ceilings on it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    model = ModelFootprint.from_pretrained(model_dir)
    size = max(int(model.prefill_bytes()), MIN_BANDWIDTH_BYTES)
    one, every = measure_peaks(1, size), measure_peaks(cores, size)
    best = MachinePeaks(
        every.threads,
        max(one.read_bytes_s, every.read_bytes_s),
        max(one.copy_bytes_s, every.copy_bytes_s),
        max(one.matmul_flop_s, every.matmul_flop_s),
    )
    return {
        "model": model_dir,
        "footprint": asdict(model),
        "bandwidth_tensor_mb": round(size / 1e6, 1),
        "decode_bytes_batch1_mb": round(model.decode_bytes(1, input_len) / 1e6, 3),
        "peaks": {"one_thread": asdict(one), "all_cores": asdict(every), "best": asdict(best)},
        "ceilings": {str(c): ceilings(best, model, c, input_len, output_len) for c in concurrency},
        "workload": {"input_len": input_len, "output_len": output_len},
    }


def roofline_markdown(result: dict) -> str:
    """The peaks and the ceilings as Markdown."""
    lines = [
        f"Bandwidth measured on a {result['bandwidth_tensor_mb']} MB tensor (the model's weights).",
        "",
        "| threads | read GB/s | copy GB/s | matmul GFLOP/s |",
        "|---|---|---|---|",
    ]
    for name, peaks in result["peaks"].items():
        lines.append(
            f"| {peaks['threads'] if name != 'best' else 'best of both'} | {peaks['read_bytes_s'] / 1e9:.1f}"
            f" | {peaks['copy_bytes_s'] / 1e9:.1f}"
            f" | {peaks['matmul_flop_s'] / 1e9:.1f} |"
        )
    w = result["workload"]
    lines += [
        "",
        f"Bytes read per decode step at batch 1: {result['decode_bytes_batch1_mb']} MB."
        f" Ceilings for {w['input_len']}-token prompts and {w['output_len']} output tokens:",
        "",
        "| concurrency | decode tok/s | prefill tok/s | serving output tok/s |",
        "|---|---|---|---|",
    ]
    for c, ceiling in result["ceilings"].items():
        lines.append(
            f"| {c} | {ceiling['decode_tok_s']:.0f} | {ceiling['prefill_tok_s']:.0f}"
            f" | {ceiling['serving_output_tok_s']:.0f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the demo checkpoint)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write roofline.json and roofline.md into this directory")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    model_dir = args.model
    if model_dir is None:
        from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

        model_dir = str(ensure_demo_checkpoint())
    result = roofline(model_dir, args.concurrency, args.input_len, args.output_len)
    table = roofline_markdown(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "roofline.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "roofline.md").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    return 0
