"""Triton kernels for the CUDA path (run on CPU tensors under TRITON_INTERPRET=1 in tests)."""
