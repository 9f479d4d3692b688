"""The paged decode attention kernel alone: one sequence, its context in randomly ordered blocks of 16, best
of 50 calls, one thread; prints the time, the K and V bytes a second and the time a context token, fp32 and
bf16 KV. `H=8 KV=4 D=32 CTX=4000 python kernel.py` (the defaults: the demo at one shard), PYTHONPATH at the
tree."""

import os

import torch

from mixserve.benchmarks.roofline import best_seconds
from mixserve.shards.kernels import native
from mixserve.shards.kernels.paged_attention import paged_decode_attention

BLOCK = 16


def main() -> None:
    torch.set_num_threads(1)
    native.select("auto")
    heads, kv_heads = int(os.environ.get("H", 8)), int(os.environ.get("KV", 4))
    head_dim = int(os.environ.get("D", 32))
    context = int(os.environ.get("CTX", 4000))
    blocks = -(-context // BLOCK)
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(blocks, BLOCK, kv_heads, head_dim).to(dtype)
        v = torch.randn(blocks, BLOCK, kv_heads, head_dim).to(dtype)
        tables, lens = torch.randperm(blocks).unsqueeze(0), torch.tensor([context])
        q = torch.randn(1, heads, head_dim)

        def call(q=q, k=k, v=v, tables=tables, lens=lens) -> None:
            paged_decode_attention(q, (k, v), tables, lens, head_dim**-0.5, None)

        seconds = best_seconds(call, 50)
        read = 2 * context * kv_heads * head_dim * k.element_size()
        print(dtype, f"{seconds * 1e6:.0f} us, {read / seconds / 1e9:.1f} GB/s, {seconds / context * 1e9:.0f} ns/token")


if __name__ == "__main__":
    main()
