"""Random weights of a Mixtral checkpoint's shapes (`--load-format dummy`, as vLLM names it).

`DummyCheckpointReader` answers the same name -> tensor (slice) lookups as CheckpointReader from
config.json alone, so every layer's `load` runs unchanged and builds only its rank's slice. Each
tensor is drawn on the device from a generator seeded by (seed, name): the same seed gives the same
model at any world size (a rank's slice is the slice of the full tensor). Values are normal * 0.02
(Hugging Face's initializer range) and norms are 1, which keeps activations finite through every
layer.
"""

import zlib
from pathlib import Path

import torch

from mixserve.shards.config import ModelConfig

INIT_STD = 0.02


def checkpoint_shapes(config: ModelConfig) -> dict[str, list[int]]:
    """Every tensor name of a Hugging Face Mixtral checkpoint and its full shape."""
    h, d, inter, vocab = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = [vocab, h]
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = [h]
        shapes[f"{layer}.post_attention_layernorm.weight"] = [h]
        shapes[f"{layer}.self_attn.q_proj.weight"] = [config.num_attention_heads * d, h]
        shapes[f"{layer}.self_attn.k_proj.weight"] = [config.num_key_value_heads * d, h]
        shapes[f"{layer}.self_attn.v_proj.weight"] = [config.num_key_value_heads * d, h]
        shapes[f"{layer}.self_attn.o_proj.weight"] = [h, config.num_attention_heads * d]
        shapes[f"{layer}.block_sparse_moe.gate.weight"] = [config.num_local_experts, h]
        for e in range(config.num_local_experts):
            expert = f"{layer}.block_sparse_moe.experts.{e}"
            shapes[f"{expert}.w1.weight"] = [inter, h]
            shapes[f"{expert}.w3.weight"] = [inter, h]
            shapes[f"{expert}.w2.weight"] = [h, inter]
    return shapes


class DummyCheckpointReader:
    """CheckpointReader's interface over random tensors made on `device` in `dtype`; reads no file
    but `<model_dir>/config.json`."""

    def __init__(
        self,
        model_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.shapes = checkpoint_shapes(ModelConfig.from_pretrained(model_dir))
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> list[int]:
        """The full shape of tensor `name` in the checkpoint."""
        if name not in self.shapes:
            raise KeyError(f"tensor {name!r} is not in a Mixtral checkpoint of {self.model_dir}'s config")
        return list(self.shapes[name])

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tensor `name`, or only rows/columns [start, end) of dimension `dim`: the slice of the full
        random tensor, which lives on the device only while it is sliced."""
        shape = self.shape(name)
        if name.endswith("norm.weight"):
            full = torch.ones(shape, dtype=self.dtype, device=self.device)
        else:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
            full = torch.normal(0.0, INIT_STD, shape, generator=generator, dtype=self.dtype, device=self.device)
        if dim is None:
            return full
        return full.narrow(dim, start, (shape[dim] if end is None else end) - start).clone()

    def close(self) -> None:
        """Nothing to release (CheckpointReader's interface)."""
