"""Mixtral's sparse mixture-of-experts block with tensor- or expert-parallel experts.

Tensor-parallel (`moe_parallel` tp, the default): every rank holds every expert, split on the
intermediate dimension: w1 and w3 merged as w13 [E_l, 2 I_l, H] and w2 as [E_l, H, I_l] with
E_l = E and I_l = I / n. Expert-parallel (ep): each rank holds E_l = E / n whole experts
(I_l = I), experts [rank E_l, (rank + 1) E_l). Either way the router gate is replicated, every rank
routes every token, computes its partial output (its slice of every expert, or its experts' whole
output on the tokens routed to them, zero elsewhere) and one all-reduce closes the block.

The experts run through the `fused_moe` op (shards.ops: the C kernel for decode-sized fp32 CPU
steps, Triton's fused MoE on CUDA, else sort-by-expert grouped matmuls), or, for steps of at most
`gather_max_tokens` tokens, gather-by-index here: index the chosen experts' weights per token and use
batched matmuls. With `quantization` set before load, every expert's slice is held quantized
(`quantized`) instead of in w13/w2: by bitsandbytes, one weight per expert run by the grouped path,
or (int8-wo) stacked like w13/w2 as int8 codes with row scales, run by `fused_moe`. Under expert
parallelism `fused_moe` runs (it skips the pairs routed to experts held elsewhere; gather-by-index
would need every expert's weights).

Legend: T tokens, H hidden size, E experts, K experts per token, n world size, E_l experts held by
this rank, I_l intermediate size per rank, P (token, expert) pairs routed to the experts held.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.shards import ops
from mixserve.shards.checkpoint import CheckpointReader
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.layers.dense_experts import experts_dense
from mixserve.shards.layers.linear import materialize
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.experts import QuantizedExperts
from mixserve.shards.quant.int8_layers import Int8Experts
from mixserve.shards.quant.int8_weight import Int8Weight
from mixserve.shards.quant.linear import quantize_linear


def route(hidden: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: the router's logits, softmax over experts in fp32, top-k, renormalised (the
    `topk_softmax` op). Returns weights [T, K] (fp32) and expert ids [T, K]."""
    return ops.current().topk_softmax(F.linear(hidden, gate), top_k)


def held_expert_ids(experts: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Expert parallelism: global expert ids [T, K] -> ids among the `count` experts this rank holds
    (from `first` on); experts held elsewhere become `count`, which the grouped paths skip."""
    local = experts - first
    return torch.where((local >= 0) & (local < count), local, count)


def experts_gathered(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """Gather-by-index path: copy each token's chosen experts' weights and batch the matmuls."""
    gate_up = torch.einsum("th,tkih->tki", hidden, w13[experts])  # [T, K, 2 I_l]
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, w2[experts])  # [T, K, H]
    return (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)


class SparseMoE(nn.Module):
    """Gate + tensor- or expert-parallel experts + the closing all-reduce."""

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig,
        group: TensorParallelGroup,
        gather_max_tokens: int = 0,
    ):
        super().__init__()
        self.parallel = parallel
        self.group = group
        self.top_k = config.num_experts_per_tok
        self.gather_max_tokens = gather_max_tokens
        experts, hidden = config.num_local_experts, config.hidden_size
        if parallel.expert_parallel:
            held, inter = experts // parallel.world_size, config.intermediate_size
        else:
            held, inter = experts, config.intermediate_size // parallel.world_size
        self.held_experts = held
        self.first_expert = parallel.rank * held if parallel.expert_parallel else 0
        self.gate = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.w13 = nn.Parameter(torch.empty(held, 2 * inter, hidden), requires_grad=False)  # [E_l, 2 I_l, H]
        self.w2 = nn.Parameter(torch.empty(held, hidden, inter), requires_grad=False)  # [E_l, H, I_l]
        self.quantization: QuantizationConfig | None = None
        self.quantized: QuantizedExperts | None = None
        # Set by the decode graph runner around a decode step: the dense path, which never syncs the host.
        self.sync_free = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, experts = route(hidden, self.gate, self.top_k)
        if self.parallel.expert_parallel:
            experts = held_expert_ids(experts, self.first_expert, self.held_experts)
        if self.quantized is not None:
            return self.group.all_reduce(self.quantized(hidden, weights, experts))
        # Gather-by-index indexes this rank's weights with every chosen id, so it cannot skip experts held elsewhere.
        gather = not self.parallel.expert_parallel and hidden.shape[0] <= self.gather_max_tokens
        fused = ops.current()
        if self.sync_free and fused.backends["fused_moe"] != "triton":
            # A captured decode step may not sync with the host: the torch reference's grouping by
            # expert does (bincount().tolist()), the Triton kernel does not.
            compute = experts_dense
        else:
            compute = experts_gathered if gather else fused.fused_moe
        return self.group.all_reduce(compute(hidden, self.w13, self.w2, weights, experts))

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        """Read `<prefix>.gate.weight` and this rank's part of `<prefix>.experts.{e}.w1/w2/w3`: its slice of
        every expert (tp), or only its own experts, whole (ep)."""
        self.gate = materialize(reader.read(f"{prefix}.gate.weight"), self.gate, reader.device)
        _, two_inter, hidden = self.w13.shape
        held, inter = self.held_experts, two_inter // 2
        start = 0 if self.parallel.expert_parallel else self.parallel.rank * inter
        end = start + inter
        if self.quantization is not None:
            self._load_quantized(reader, prefix, start, end)
            return
        w13 = torch.empty(held, two_inter, hidden, dtype=self.w13.dtype, device=reader.device)
        w2 = torch.empty(held, hidden, inter, dtype=self.w2.dtype, device=reader.device)
        for e in range(held):
            name = f"{prefix}.experts.{self.first_expert + e}"
            w13[e, :inter] = reader.read(f"{name}.w1.weight", dim=0, start=start, end=end)
            w13[e, inter:] = reader.read(f"{name}.w3.weight", dim=0, start=start, end=end)
            w2[e] = reader.read(f"{name}.w2.weight", dim=1, start=start, end=end)
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def _load_quantized(self, reader: CheckpointReader, prefix: str, start: int, end: int) -> None:
        """Quantize expert by expert, so at most one expert's slice is ever held in full precision."""
        dtype, device = self.w13.dtype, reader.device
        int8 = self.quantization.weight_only_int8
        w13, w2 = [], []
        for e in range(self.held_experts):
            name = f"{prefix}.experts.{self.first_expert + e}"
            gate_up = torch.cat(
                [
                    reader.read(f"{name}.w1.weight", dim=0, start=start, end=end),
                    reader.read(f"{name}.w3.weight", dim=0, start=start, end=end),
                ]
            )  # [2 I_l, H]
            down = reader.read(f"{name}.w2.weight", dim=1, start=start, end=end)  # [H, I_l]
            if int8:
                w13.append(Int8Weight.quantize(gate_up.to(device)))
                w2.append(Int8Weight.quantize(down.to(device)))
            else:
                w13.append(quantize_linear(gate_up, self.quantization, dtype, device))
                w2.append(quantize_linear(down, self.quantization, dtype, device))
        self.quantized = Int8Experts.stacked(w13, w2) if int8 else QuantizedExperts(w13, w2)
        self.w13 = None
        self.w2 = None
