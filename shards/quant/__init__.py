"""Quantization of a shard's weights (`--quantize`): bitsandbytes' LLM.int8 and 4-bit nf4/fp4, and
weight-only int8 for the CPU kernels (int8-wo).

Nothing is imported here: the router reads the mode names from `config`, which needs no torch.
"""
