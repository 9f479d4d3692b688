"""Model and parallelism configuration read from a Hugging Face Mixtral checkpoint."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The facts of a Mixtral checkpoint that the sharded model needs (from its config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Mixtral uses silu)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_local_experts}")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Read a transformers `config.json` dict (Mixtral layout, transformers 4 or 5 style)."""
        if raw.get("model_type") not in (None, "mixtral"):
            raise ValueError(f"model_type {raw.get('model_type')!r} is not a Mixtral checkpoint")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported; only the default RoPE is")
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id", 2)
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            num_local_experts=raw["num_local_experts"],
            num_experts_per_tok=raw["num_experts_per_tok"],
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 1e6)),
            hidden_act=raw.get("hidden_act", "silu"),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            sliding_window=raw.get("sliding_window"),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """Read `<model_dir>/config.json`."""
        return cls.from_dict(json.loads((Path(model_dir) / "config.json").read_text()))


MOE_PARALLEL_MODES = ("tp", "ep")


@dataclass(slots=True, frozen=True)
class ParallelConfig:
    """This process's place in the tensor-parallel group, and how its MoE layers are split.

    `moe_parallel` is `tp` (every rank holds every expert, split on the intermediate dimension) or
    `ep` (expert parallelism: each rank holds num_local_experts / world_size whole experts).
    Attention, embeddings and lm_head are tensor-parallel either way.
    """

    rank: int = 0
    world_size: int = 1
    moe_parallel: str = "tp"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a group of world size {self.world_size}")
        if self.moe_parallel not in MOE_PARALLEL_MODES:
            raise ValueError(f"moe_parallel {self.moe_parallel!r} is not one of {', '.join(MOE_PARALLEL_MODES)}")

    @property
    def expert_parallel(self) -> bool:
        """True when each rank holds whole experts rather than a slice of every one."""
        return self.moe_parallel == "ep"

    def check(self, config: ModelConfig) -> None:
        """Fail with a message that says why when the model cannot be split over this world size."""
        n = self.world_size
        for what, size in (
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.num_key_value_heads),
        ):
            if size % n:
                raise ValueError(
                    f"cannot shard over world size {n}: {what} = {size} is not divisible by {n} "
                    f"(each rank must hold an equal slice of it)"
                )
        if self.expert_parallel and config.num_local_experts % n:
            raise ValueError(
                f"cannot shard over world size {n} with expert parallelism (moe_parallel ep): num_local_experts = "
                f"{config.num_local_experts} is not divisible by {n} (each rank must hold as many whole experts); "
                f"use moe_parallel tp or a world size that divides {config.num_local_experts}"
            )
        if not self.expert_parallel and config.intermediate_size % n:
            raise ValueError(
                f"cannot shard over world size {n}: intermediate_size = {config.intermediate_size} is not divisible "
                f"by {n} (each rank must hold an equal slice of it)"
            )

    def split(self, size: int) -> tuple[int, int]:
        """The [start, end) of this rank's equal slice of a dimension of `size`."""
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part
