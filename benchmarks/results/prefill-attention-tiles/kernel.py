"""A prompt's chunk (positions P .. P + T - 1 of one sequence) attended three ways on one core, alternating, the
fastest of 9 calls each (the machine is shared and noisy; the kernels are compute-bound with the chunk's context in
cache): the C decode kernel a row at a time (what the decoder-layer kernel did for a chunk's rows before), torch's
flash attention over the gathered context (the reference op, what the per-op CPU path did), and the C prefill
kernel (tiles of 16 positions). Run from the repository root:
python benchmarks/results/prefill-attention-tiles/kernel.py [T]"""

import sys
import time

import torch

from mixserve.shards import ops
from mixserve.shards.kernels import paged_attention, prefill_attention
from mixserve.shards.ops import reference

SHAPES = {  # heads, KV heads, head dim of one shard
    "demo, 2 shards": (4, 2, 32),
    "0.8B, 1 shard": (8, 2, 128),
    "Mixtral 8x7B, 2 shards": (16, 4, 128),
}


def case(T: int, H: int, KV: int, D: int, dtype: torch.dtype, P: int) -> tuple[dict[str, float], float]:
    """ms of each way (fastest of 9) and the largest |difference| of the C ways' outputs to torch's."""
    gen = torch.Generator().manual_seed(P)
    width = -(-(P + T) // 16)
    cache = tuple(torch.randn(width + 4, 16, KV, D, generator=gen).to(dtype) for _ in range(2))
    table = torch.randperm(width + 4, generator=gen)[:width]
    q = torch.randn(T, H, D, generator=gen)
    tables, lens = table.repeat(T, 1), torch.arange(P + 1, P + T + 1)
    starts, begins = torch.tensor([0, T], dtype=torch.int32), torch.tensor([P], dtype=torch.int32)
    ways = {
        "decode": lambda: paged_attention.paged_decode_attention(q, cache, tables, lens, D**-0.5, None),
        "torch": lambda: reference.paged_prefill_attention(
            q, cache, starts, begins, table.unsqueeze(0), D**-0.5, None, [(T, P)]
        ),
        "prefill": lambda: prefill_attention.paged_prefill_attention(q, cache, table, P, D**-0.5, None),
    }
    best, outs = {}, {}
    for r in range(9):
        for way in ways if r % 2 == 0 else reversed(list(ways)):
            start = time.perf_counter()
            outs[way] = ways[way]()
            seconds = time.perf_counter() - start
            best[way] = min(best.get(way, seconds), seconds)
    diff = max((outs[w] - outs["torch"]).abs().max().item() for w in ("decode", "prefill"))
    return {w: s * 1e3 for w, s in best.items()}, diff


def main() -> None:
    torch.set_num_threads(1)
    ops.select("native", torch.device("cpu"), torch.float32)
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    print(f"A chunk of {T} positions, ms (fastest of 9); x: the prefill kernel's speed-up")
    print("| shard's heads (H/KV/D) | KV | context before | decode kernel, row by row | torch flash |", end="")
    print(" prefill kernel | x decode | x torch | max diff to torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (H, KV, D) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for P in (0, 512, 1500, 2750):
                ms, diff = case(T, H, KV, D, dtype, P)
                kind = str(dtype).removeprefix("torch.")
                print(
                    f"| {name} ({H}/{KV}/{D}) | {kind} | {P} | {ms['decode']:.1f} | {ms['torch']:.1f} | "
                    f"{ms['prefill']:.1f} | {ms['decode'] / ms['prefill']:.2f} | {ms['torch'] / ms['prefill']:.2f} | "
                    f"{diff:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
