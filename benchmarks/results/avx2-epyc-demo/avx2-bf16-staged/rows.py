"""Time the C kernels' bf16 and int8 products at several row counts: linear_rows (the trained demo's LM
head slice at 2 ranks) and moe_experts (its experts, one of 2 ranks); the results are saved to the file
given, for comparing two builds' bits. `python rows.py OUT.pt [bf16|int8]`, with PYTHONPATH at the tree."""

import json
import sys

import torch

from mixserve.benchmarks.roofline import best_seconds
from mixserve.shards.kernels import linear, moe
from mixserve.shards.quant.int8_weight import Int8Weight

HIDDEN, INTER, EXPERTS, VOCAB = 512, 1024, 8, 4096  # per rank of 2: w13 rows 1024, w2 columns 512


def best(fn, n: int = 15) -> float:
    return best_seconds(fn, n)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kind = sys.argv[2] if len(sys.argv) > 2 else "bf16"
    head = torch.randn(VOCAB, HIDDEN) * 0.05
    w13 = torch.randn(EXPERTS, INTER, HIDDEN) * 0.05
    w2 = torch.randn(EXPERTS, HIDDEN, INTER // 2) * 0.05
    if kind == "bf16":
        head, w13, w2 = head.bfloat16(), w13.bfloat16(), w2.bfloat16()
    else:
        head, w13, w2 = Int8Weight.quantize(head), Int8Weight.quantize(w13), Int8Weight.quantize(w2)
    out = {}
    for rows in (1, 2, 3, 4, 8, 16, 64, 128):
        x = torch.randn(rows, HIDDEN)
        weights, experts = torch.rand(rows, 2), torch.randint(0, EXPERTS, (rows, 2))
        experts[:, 1] = (experts[:, 0] + 1) % EXPERTS

        def head_rows(x=x):
            return linear.linear_rows(x, head)

        def moe_rows(x=x, weights=weights, experts=experts):
            return moe.moe_experts(x, w13, w2, weights, experts)

        out[f"head R={rows}"] = (best(head_rows) * 1e3, head_rows())
        out[f"moe T={rows}"] = (best(moe_rows) * 1e3, moe_rows())
    torch.save({k: v[1] for k, v in out.items()}, sys.argv[1])
    print(json.dumps({k: round(v[0], 3) for k, v in out.items()}))


if __name__ == "__main__":
    main()
