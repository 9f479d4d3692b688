"""The demo checkpoint: a deterministic random-weight Mixtral in the Hugging Face hub layout.

With `train_steps`, the random weights are then trained briefly on the shipped corpus
(shards.demo.train), so the logits look like a language model's.

Files written (as a hub Mixtral repository has them):
    config.json, generation_config.json,
    model-0000k-of-0000N.safetensors (N >= 2) + model.safetensors.index.json,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json

Tensor names and shapes (H hidden, I intermediate, E experts, V vocab, D head_dim):
    model.embed_tokens.weight                                  [V, H]
    model.layers.{i}.input_layernorm.weight                    [H]
    model.layers.{i}.self_attn.{q,o}_proj.weight               [heads*D, H], [H, heads*D]
    model.layers.{i}.self_attn.{k,v}_proj.weight               [kv_heads*D, H]
    model.layers.{i}.post_attention_layernorm.weight           [H]
    model.layers.{i}.block_sparse_moe.gate.weight              [E, H]
    model.layers.{i}.block_sparse_moe.experts.{e}.w1/w3.weight [I, H]
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight    [H, I]
    model.norm.weight                                          [H]
    lm_head.weight                                             [V, H]

The same DemoConfig always gives the same bytes, so a checkpoint can be cached by a hash of it.
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mixserve.shards.cache_dir import cache_root
from mixserve.shards.demo.tokenizer import BOS_TOKEN, CORPUS_PATH, EOS_TOKEN, SPECIAL_TOKENS, write_tokenizer_files

if TYPE_CHECKING:
    import torch

    from mixserve.shards.demo.train import Training

logger = logging.getLogger(__name__)

# Bump when the files written for a given DemoConfig change, so cached checkpoints are rebuilt.
FORMAT_VERSION = 1
INIT_STD = 0.02
BOS_TOKEN_ID, EOS_TOKEN_ID = SPECIAL_TOKENS.index(BOS_TOKEN), SPECIAL_TOKENS.index(EOS_TOKEN)


@dataclasses.dataclass(slots=True, frozen=True)
class DemoConfig:
    """Sizes and seed of the demo Mixtral; the defaults are the CPU demo (about 18M parameters)."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int = 512
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    vocab_size: int = 8192
    max_position_embeddings: int = 4096
    seed: int = 0
    num_weight_files: int = 2
    # Steps of next-token training on the shipped corpus (shards.demo.train); 0: random weights.
    train_steps: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{field.name} must be an int, got {value!r}")
            if value < 0 or (value == 0 and field.name not in ("seed", "train_steps")):
                raise ValueError(f"{field.name} must be positive, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_local_experts {self.num_local_experts}"
            )
        # The hub layout needs an index over at least two files; more files than layers could leave
        # one empty.
        if not 2 <= self.num_weight_files <= self.num_hidden_layers + 1:
            raise ValueError(
                f"num_weight_files must be between 2 and num_hidden_layers + 1, got {self.num_weight_files}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


# The smallest demo every kernel accepts (2 layers, hidden 64, head dim 16, 2 KV heads, 4 experts of
# 64): Triton's interpreter in the tests and the GPU benchmark's dry run start it in seconds.
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    num_local_experts=4,
    max_position_embeddings=512,
)


def model_config(config: DemoConfig) -> dict:
    """config.json, written the way transformers 5 writes a MixtralConfig."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_TOKEN_ID,
        "dtype": "float32",
        "eos_token_id": EOS_TOKEN_ID,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "mixtral",
        "num_attention_heads": config.num_attention_heads,
        "num_experts_per_tok": config.num_experts_per_tok,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "num_local_experts": config.num_local_experts,
        "output_router_logits": False,
        "pad_token_id": None,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def generation_config() -> dict:
    """generation_config.json: the sampling defaults a client gets when it sets none."""
    return {
        "bos_token_id": BOS_TOKEN_ID,
        "do_sample": True,
        "eos_token_id": EOS_TOKEN_ID,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 0.95,
    }


def demo_state_dict(config: DemoConfig) -> "dict[str, torch.Tensor]":
    """The checkpoint's tensors under their hub names, in model order, from a generator seeded by config.seed.

    Matrices are N(0, 0.02²); norm weights are 1 + N(0, 0.02²) so a loader that drops them shows.
    """
    # torch is imported here, not at module level, because the launcher (router side, which never
    # imports torch) resolves the cached demo checkpoint through this module.
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32).mul_(INIT_STD)

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(hidden)

    tensors = {"model.embed_tokens.weight": normal(config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        tensors[f"{layer}.input_layernorm.weight"] = norm_weight()
        tensors[f"{layer}.self_attn.q_proj.weight"] = normal(config.num_attention_heads * head_dim, hidden)
        tensors[f"{layer}.self_attn.k_proj.weight"] = normal(config.num_key_value_heads * head_dim, hidden)
        tensors[f"{layer}.self_attn.v_proj.weight"] = normal(config.num_key_value_heads * head_dim, hidden)
        tensors[f"{layer}.self_attn.o_proj.weight"] = normal(hidden, config.num_attention_heads * head_dim)
        tensors[f"{layer}.post_attention_layernorm.weight"] = norm_weight()
        tensors[f"{layer}.block_sparse_moe.gate.weight"] = normal(config.num_local_experts, hidden)
        for e in range(config.num_local_experts):
            expert = f"{layer}.block_sparse_moe.experts.{e}"
            tensors[f"{expert}.w1.weight"] = normal(inter, hidden)
            tensors[f"{expert}.w2.weight"] = normal(hidden, inter)
            tensors[f"{expert}.w3.weight"] = normal(inter, hidden)
    tensors["model.norm.weight"] = norm_weight()
    tensors["lm_head.weight"] = normal(config.vocab_size, hidden)
    return tensors


def split_into_files(tensors: "dict[str, torch.Tensor]", num_files: int) -> list[list[str]]:
    """Cut the names, in order, into `num_files` runs of about equal bytes (a layer may straddle two files)."""
    total = sum(t.nbytes for t in tensors.values())
    files: list[list[str]] = [[] for _ in range(num_files)]
    index, done = 0, 0
    for name, tensor in tensors.items():
        # Move on by at most one file per tensor so a large tensor cannot leave a file empty.
        index = min(done * num_files // total, index + 1)
        files[index].append(name)
        done += tensor.nbytes
    if not all(files):
        raise ValueError(f"cannot spread {len(tensors)} tensors over {num_files} non-empty files")
    return files


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_demo_checkpoint(out_dir: Path, config: DemoConfig | None = None, training: "Training | None" = None) -> Path:
    """Write the demo checkpoint for `config` into `out_dir` (created if needed) and return `out_dir`.

    The bytes depend only on `config` (and the shipped corpus), never on the run; a trained one's
    also on the machine's float kernels, and on `training` where it is not the CPU default.
    """
    config = config or DemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = demo_state_dict(config)
    if config.train_steps:
        from mixserve.shards.demo.train import train_checkpoint

        with tempfile.TemporaryDirectory(prefix="mixserve-untrained-") as tmp:
            write_checkpoint(Path(tmp), config, tensors)
            trained = train_checkpoint(Path(tmp), config.train_steps, config.seed, training)
        if trained.keys() != tensors.keys():
            raise RuntimeError(f"training changed the tensor names: {sorted(trained.keys() ^ tensors.keys())[:5]}")
        tensors = {name: trained[name] for name in tensors}
    write_checkpoint(out_dir, config, tensors)
    return out_dir


def write_checkpoint(out_dir: Path, config: DemoConfig, tensors: "dict[str, torch.Tensor]") -> None:
    """The weights in hub layout (split files + index), config, generation config and tokenizer."""
    from safetensors.torch import save_file

    files = split_into_files(tensors, config.num_weight_files)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(files, start=1):
        filename = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        save_file({name: tensors[name] for name in names}, out_dir / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    total_size = sum(t.nbytes for t in tensors.values())
    total_parameters = sum(t.numel() for t in tensors.values())
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out_dir / "model.safetensors.index.json", index)
    _write_json(out_dir / "config.json", model_config(config))
    _write_json(out_dir / "generation_config.json", generation_config())
    write_tokenizer_files(out_dir, config.vocab_size, config.max_position_embeddings)
    logger.info(
        "demo checkpoint written path=%s parameters=%d files=%d vocab_size=%d",
        out_dir,
        total_parameters,
        len(files),
        config.vocab_size,
    )


def demo_checkpoint_dir(config: DemoConfig | None = None) -> Path:
    """Where the cached demo checkpoint for `config` lives: $MIXSERVE_CACHE/demo-<hash>.

    MIXSERVE_CACHE defaults to ~/.cache/mixserve. The hash covers the config, FORMAT_VERSION and
    the corpus, so any change that alters the files gets a new directory.
    """
    config = config or DemoConfig()
    cache = cache_root()
    key = {
        "config": dataclasses.asdict(config),
        "corpus_sha256": hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest(),
        "format_version": FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"demo-{digest}"


def ensure_demo_checkpoint(config: DemoConfig | None = None) -> Path:
    """Return the cached demo checkpoint for `config`, writing it first if it is not there yet.

    The checkpoint is written to a temporary directory beside the cache entry and renamed into
    place, so readers never see half a checkpoint and processes that race all end up using the
    one that was renamed first.
    """
    target = demo_checkpoint_dir(config)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_demo_checkpoint(staging, config)
        os.rename(staging, target)
    except OSError:
        # rename fails when another process put the directory in place first; that one is as good.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# DemoConfig field → command-line flag; every field has one.
FLAGS = {
    "hidden_size": "--hidden-size",
    "num_hidden_layers": "--num-layers",
    "num_attention_heads": "--num-heads",
    "num_key_value_heads": "--num-kv-heads",
    "intermediate_size": "--intermediate-size",
    "num_local_experts": "--num-experts",
    "num_experts_per_tok": "--experts-per-token",
    "vocab_size": "--vocab-size",
    "max_position_embeddings": "--max-position-embeddings",
    "seed": "--seed",
    "num_weight_files": "--num-weight-files",
    "train_steps": "--train-steps",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `mixserve demo-model` arguments: the output directory and one flag per DemoConfig field."""
    parser.add_argument("dir", type=Path, help="directory to write the checkpoint into")
    defaults = DemoConfig()
    for field in dataclasses.fields(DemoConfig):
        default = getattr(defaults, field.name)
        parser.add_argument(
            FLAGS[field.name],
            dest=field.name,
            type=int,
            default=default,
            metavar="N",
            help=f"{field.name} (default {default})",
        )


def run(args: argparse.Namespace) -> int:
    """Write the demo checkpoint described by the parsed arguments into args.dir."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = DemoConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(DemoConfig)})
    write_demo_checkpoint(args.dir, config)
    return 0
