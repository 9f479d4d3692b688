"""bitsandbytes quantization of a shard's weights (`--quantize`): LLM.int8 and 4-bit nf4/fp4.

Nothing is imported here: the router reads the mode names from `config`, which needs no torch.
"""
