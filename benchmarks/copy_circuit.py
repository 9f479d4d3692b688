"""`mixserve bench copy-circuit`: a demo-shaped Mixtral whose weights are an induction circuit, written.

Issue 19's copy bar is about the serving system: how much prompt lookup (`--speculate K`) gains on a
workload whose outputs copy from their prompts. A large model copies such text near perfectly; the
demo taught on a CPU (`mixserve bench copy-demo`) keeps ~76 % of the proposals and caps the gain at the
copier rather than at the server. This module writes the copier instead of training it, in the demo's
own shapes (so a step costs what the demo's does) and in the Hugging Face layout, loaded by every
engine the benchmark compares:

- Each token's embedding is a random +-1 code of CODE_DIMS dimensions (subspace A) and a constant.
- Layer 0: six heads attend by position alone (queries and keys read the constant; RoPE's six fastest
  pairs put 99.98 % of a head's weight on one offset) to 1, 2 and 3 tokens back and copy those tokens'
  codes into subspaces B1, B2 and B3.
- Layer 1: four induction heads match (the token, the one before, the one before that) against
  (B1, B2, B3) of every earlier position on RoPE's slowest pairs (pair 7 turns 0.27 rad over 112
  positions), so a position is found by the three tokens before it, and copy that position's own code
  into subspace C.
- The LM head scores each token's code against C; nothing else reaches it.
- Layers 2-3's attention and every layer's experts are random and small: they cost their reads (the
  MoE gates read the codes, so tokens spread over all the experts, more evenly than the trained demo's)
  and add noise two orders of magnitude below the codes.

A served output then continues a passage found in its prompt by its last three tokens; where those three
occur twice in it, by one of the two. It is no language model: on text that repeats nothing its outputs
are the tokens after near matches.
"""

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from mixserve.shards.demo.checkpoint import DemoConfig, model_config, write_checkpoint

if TYPE_CHECKING:
    import torch

# Each token's code has CODE_DIMS dimensions; a position is found by its last MATCHED tokens.
CODE_DIMS, MATCHED = 50, 3
# Residual layout: A (the token), B1..B3 (the tokens 1..3 back), C (the token copied), a constant.
A, B, C = 0, (1, 2, 3), 4
CONSTANT_DIM = -1
CONSTANT = 8.0
# RoPE pairs: the fastest six locate offsets; the slowest nine match content (pair 7 turns 0.27 rad in
# 112 positions, pair 8 0.11).
POSITION_PAIRS, MATCH_PAIRS = range(0, 6), range(7, 16)
# Attention logits: per position pair in layer 0; per matching code dimension in layer 1.
POSITION_SCORE, MATCH_SCORE = 16.0, 3.0
HEAD_SCALE = 0.5
NOISE = 0.02
# Value dimensions carry half a code each.
HALVES = (range(0, CODE_DIMS // 2), range(CODE_DIMS // 2, CODE_DIMS))


def subspace(index: int, dims: range | None = None) -> list[int]:
    """Residual dimensions of subspace `index` (A, B[i], C), or of its code dimensions `dims`."""
    return [index * CODE_DIMS + d for d in (dims if dims is not None else range(CODE_DIMS))]


def circuit_state(config: DemoConfig, seed: int = 0) -> "dict[str, torch.Tensor]":
    """Every weight of a demo of `config`'s shapes, by its Hugging Face name (experts one by one)."""
    import torch

    hidden, head_dim = config.hidden_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if (C + 1) * CODE_DIMS >= hidden or head_dim != 32 or heads != 2 * kv_heads or kv_heads < 4:
        raise ValueError("the circuit needs hidden > 250, head_dim 32 and 4 or more KV heads of 2 query heads")
    generator = torch.Generator().manual_seed(seed)

    def noise(*shape: int, std: float = NOISE) -> "torch.Tensor":
        return torch.randn(*shape, generator=generator) * std

    codes = torch.randint(0, 2, (config.vocab_size, CODE_DIMS), generator=generator).float() * 2 - 1
    theta = model_config(config)["rope_parameters"]["rope_theta"]
    inv_freq = [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    embed = torch.zeros(config.vocab_size, hidden)
    embed[:, subspace(A)] = codes
    embed[:, CONSTANT_DIM] = CONSTANT
    state = {"model.embed_tokens.weight": embed}
    # RMSNorm with unit weights divides a row by its rms; every row of a layer has the same norm.
    for layer in range(config.num_hidden_layers):
        attention = {
            "q_proj": noise(heads * head_dim, hidden),
            "k_proj": noise(kv_heads * head_dim, hidden),
            "v_proj": noise(kv_heads * head_dim, hidden),
            "o_proj": torch.zeros(hidden, heads * head_dim),
        }
        if layer == 0:
            rms = math.sqrt((CODE_DIMS + CONSTANT**2) / hidden)
            _position_heads(attention, head_dim, inv_freq, rms)
        elif layer == 1:
            rms = math.sqrt((len(B) + 1) * CODE_DIMS + CONSTANT**2) / math.sqrt(hidden)
            _induction_heads(attention, head_dim, rms)
        prefix = f"model.layers.{layer}."
        for name, weight in attention.items():
            state[f"{prefix}self_attn.{name}.weight"] = weight
        state[prefix + "input_layernorm.weight"] = torch.ones(hidden)
        state[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden)
        gate = torch.randn(config.num_local_experts, hidden, generator=generator)
        gate[:, CONSTANT_DIM] = 0  # routed by the tokens, not by what every position shares
        state[prefix + "block_sparse_moe.gate.weight"] = gate
        for e in range(config.num_local_experts):
            expert = f"{prefix}block_sparse_moe.experts.{e}."
            state[expert + "w1.weight"] = noise(config.intermediate_size, hidden, std=0.05)
            state[expert + "w3.weight"] = noise(config.intermediate_size, hidden, std=0.05)
            state[expert + "w2.weight"] = noise(hidden, config.intermediate_size, std=NOISE / 10)
    norm = torch.zeros(hidden)
    norm[subspace(C)] = 1.0
    state["model.norm.weight"] = norm
    head = torch.zeros(config.vocab_size, hidden)
    head[:, subspace(C)] = codes * HEAD_SCALE
    state["lm_head.weight"] = head
    return state


def _position_heads(attention: "dict[str, torch.Tensor]", head_dim: int, inv_freq: list[float], rms: float) -> None:
    """Layer 0: for each offset 1..MATCHED, two heads (one a code half) copy the token that far back
    into B[offset]. Keys and queries read the constant alone, so the logits depend on the offset only;
    a query turned back by `offset` steps of each fast pair peaks there."""
    q, k, v, o = (attention[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    amplitude = math.sqrt(POSITION_SCORE * math.sqrt(head_dim))
    # Query head 2g + j reads KV group g: groups 0, 1 serve offsets 1 and 2, groups 2, 3 offset 3.
    plan = [(0, 0, 1), (1, 0, 2), (2, 1, 1), (3, 1, 2), (4, 0, 3), (6, 1, 3)]  # (head, half, offset)
    for kv in range(4):
        _clear(k, kv, head_dim)
        _clear(v, kv, head_dim)
        for i in POSITION_PAIRS:
            k[kv * head_dim + i, CONSTANT_DIM] = amplitude * rms / CONSTANT
        for j, dim in enumerate(subspace(A, HALVES[kv % 2])):
            v[kv * head_dim + j, dim] = rms
    for head, half, offset in plan:
        _clear(q, head, head_dim)
        for i in POSITION_PAIRS:
            angle = offset * inv_freq[i]
            q[head * head_dim + i, CONSTANT_DIM] = amplitude * math.cos(angle) * rms / CONSTANT
            q[head * head_dim + head_dim // 2 + i, CONSTANT_DIM] = -amplitude * math.sin(angle) * rms / CONSTANT
        _write_out(o, head, head_dim, subspace(B[offset - 1], HALVES[half]), 1.0)


def _induction_heads(attention: "dict[str, torch.Tensor]", head_dim: int, rms: float) -> None:
    """Layer 1: KV group g's first head finds the position whose last MATCHED tokens (B1..B3 there)
    are this position's token and the ones before it (A, B1, B2 here), on the slow pairs' dimensions,
    a third of them for each token and code dimensions of their own for each group, and copies that
    position's token (half g % 2 of its code) into C."""
    q, k, v, o = (attention[name] for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gain = math.sqrt(MATCH_SCORE * math.sqrt(head_dim))
    dims = [i for i in MATCH_PAIRS] + [head_dim // 2 + i for i in MATCH_PAIRS]
    per_token = len(dims) // MATCHED
    for kv in range(4):
        head = 2 * kv
        _clear(k, kv, head_dim)
        _clear(v, kv, head_dim)
        _clear(q, head, head_dim)
        for part, (query_space, key_space) in enumerate(zip((A, *B[:-1]), B, strict=True)):
            first = (16 * part + per_token * kv) % CODE_DIMS
            code_dims = [(first + j) % CODE_DIMS for j in range(per_token)]
            for dim, code_dim in zip(dims[part * per_token : (part + 1) * per_token], code_dims, strict=True):
                q[head * head_dim + dim, query_space * CODE_DIMS + code_dim] = gain * rms
                k[kv * head_dim + dim, key_space * CODE_DIMS + code_dim] = gain * rms
        half = HALVES[kv % 2]
        for j, dim in enumerate(subspace(A, half)):
            v[kv * head_dim + j, dim] = rms
        # Two KV groups carry each half of the code: each head writes half of it.
        _write_out(o, head, head_dim, subspace(C, half), 0.5)


def _clear(weight: "torch.Tensor", head: int, head_dim: int) -> None:
    weight[head * head_dim : (head + 1) * head_dim] = 0


def _write_out(o: "torch.Tensor", head: int, head_dim: int, targets: list[int], weight: float) -> None:
    """o_proj takes value dimension j of `head` to residual dimension `targets[j]`."""
    for j, target in enumerate(targets):
        o[target, head * head_dim + j] = weight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="where to write the checkpoint (the demo's shapes and tokenizer)")
    parser.add_argument("--seed", type=int, default=0, help="of the codes and the random weights")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    config = DemoConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(args.out, config, circuit_state(config, args.seed))
    return 0
