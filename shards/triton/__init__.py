"""Triton kernels for the CUDA path: paged attention (attention.py), MoE routing (routing.py), fused
MoE (moe.py), RMSNorm (norm.py), rotary + KV write (rotary.py), exported as shards.ops ops by ops.py (each falls back to
the torch reference for arguments its kernel does not take).

The kernels run compiled on CUDA tensors and, through Triton's interpreter, on CPU tensors: CI
checks them that way against the torch references, and through the whole server with
`--kernels triton` on CPU. Triton picks the interpreter when `triton.language` is first imported
with TRITON_INTERPRET=1 set, so the variable must be in the environment before anything imports
triton; tests/conftest.py sets it for the test session, shards.ops.select for a CPU shard.
"""

from mixserve.shards.triton.attention import interpreted
from mixserve.shards.triton.ops import (
    fused_moe,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rotary_write_kv,
    topk_softmax,
)

__all__ = [
    "fused_moe",
    "interpreted",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_write_kv",
    "topk_softmax",
]
