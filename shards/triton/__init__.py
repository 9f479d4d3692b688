"""Triton kernels for the CUDA path: paged attention (attention.py), fused MoE (moe.py), RMSNorm
(norm.py), rotary + KV write (rotary.py).

The kernels run compiled on CUDA tensors and, through Triton's interpreter, on CPU tensors: CI
checks them that way against the torch references. Triton picks the interpreter when
`triton.language` is first imported with TRITON_INTERPRET=1 set, so the variable must be in the
environment before anything imports triton; tests/conftest.py sets it for the test session.
"""
