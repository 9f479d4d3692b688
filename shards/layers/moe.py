"""Mixtral's sparse mixture-of-experts block with tensor-parallel experts.

Every rank holds every expert, split on the intermediate dimension: w1 and w3 merged as
w13 [E, 2 I_l, H] and w2 as [E, H, I_l]; the router gate is replicated. Each rank computes its
partial expert outputs and one all-reduce closes the block.

Two compute paths give the same result:
- grouped: sort (token, expert) pairs by expert and run one matmul pair per expert that has
  tokens; reads each selected expert's weights once (prefill, large batches);
- gather: index the chosen experts' weights per token and use batched matmuls; no Python loop
  over experts (a handful of tokens).
With `quantization` set before load, every expert's slice is held quantized (`quantized`, run by
the grouped path) instead of in w13/w2.

Legend: T tokens, H hidden size, E experts, K experts per token, I_l intermediate size per rank.
"""

import torch
import torch.nn.functional as F
from torch import nn

from shards.checkpoint import CheckpointReader
from shards.config import ModelConfig, ParallelConfig
from shards.distributed import TensorParallelGroup
from shards.layers.linear import materialize
from shards.quant.config import QuantizationConfig
from shards.quant.experts import QuantizedExperts
from shards.quant.linear import quantize_linear


def route(hidden: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over experts in fp32, top-k, renormalised.

    Returns weights [T, K] (fp32) and expert ids [T, K].
    """
    probs = F.softmax(F.linear(hidden, gate).float(), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, K]
    return weights / weights.sum(dim=-1, keepdim=True), experts


def experts_grouped(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """Sort-by-expert path: one pair of matmuls per expert that received tokens."""
    top_k = experts.shape[1]
    flat = experts.flatten()  # [T K]
    order = flat.argsort(stable=True)  # [T K], grouped by expert, token order kept within one
    token_of = order // top_k
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    routed = hidden[token_of]  # [T K, H]
    out = torch.empty_like(routed)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate_up = F.linear(routed[start:end], w13[expert])  # [c, 2 I_l]
        gate, up = gate_up.chunk(2, dim=-1)
        out[start:end] = F.linear(F.silu(gate) * up, w2[expert])  # [c, H]
        start = end
    scaled = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)  # [T K, H]
    return torch.zeros_like(hidden).index_add_(0, token_of, scaled)


def experts_gathered(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """Gather-by-index path: copy each token's chosen experts' weights and batch the matmuls."""
    gate_up = torch.einsum("th,tkih->tki", hidden, w13[experts])  # [T, K, 2 I_l]
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, w2[experts])  # [T, K, H]
    return (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)


class SparseMoE(nn.Module):
    """Gate + tensor-parallel experts + the closing all-reduce."""

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
        inter = config.intermediate_size // parallel.world_size
        self.gate = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.w13 = nn.Parameter(torch.empty(experts, 2 * inter, hidden), requires_grad=False)  # [E, 2 I_l, H]
        self.w2 = nn.Parameter(torch.empty(experts, hidden, inter), requires_grad=False)  # [E, H, I_l]
        self.quantization: QuantizationConfig | None = None
        self.quantized: QuantizedExperts | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, experts = route(hidden, self.gate, self.top_k)
        if self.quantized is not None:
            return self.group.all_reduce(self.quantized(hidden, weights, experts))
        compute = experts_gathered if hidden.shape[0] <= self.gather_max_tokens else experts_grouped
        return self.group.all_reduce(compute(hidden, self.w13, self.w2, weights, experts))

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        """Read `<prefix>.gate.weight` and this rank's slice of every `<prefix>.experts.{e}.w1/w2/w3`."""
        self.gate = materialize(reader.read(f"{prefix}.gate.weight"), self.gate, reader.device)
        num_experts, two_inter, hidden = self.w13.shape
        inter = two_inter // 2
        start, end = self.parallel.rank * inter, (self.parallel.rank + 1) * inter
        if self.quantization is not None:
            self._load_quantized(reader, prefix, start, end)
            return
        w13 = torch.empty(num_experts, two_inter, hidden, dtype=self.w13.dtype, device=reader.device)
        w2 = torch.empty(num_experts, hidden, inter, dtype=self.w2.dtype, device=reader.device)
        for e in range(num_experts):
            name = f"{prefix}.experts.{e}"
            w13[e, :inter] = reader.read(f"{name}.w1.weight", dim=0, start=start, end=end)
            w13[e, inter:] = reader.read(f"{name}.w3.weight", dim=0, start=start, end=end)
            w2[e] = reader.read(f"{name}.w2.weight", dim=1, start=start, end=end)
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def _load_quantized(self, reader: CheckpointReader, prefix: str, start: int, end: int) -> None:
        """Quantize expert by expert, so at most one expert's slice is ever held in full precision."""
        dtype, device = self.w13.dtype, reader.device
        w13, w2 = [], []
        for e in range(self.w13.shape[0]):
            name = f"{prefix}.experts.{e}"
            gate_up = torch.cat(
                [
                    reader.read(f"{name}.w1.weight", dim=0, start=start, end=end),
                    reader.read(f"{name}.w3.weight", dim=0, start=start, end=end),
                ]
            )  # [2 I_l, H]
            w13.append(quantize_linear(gate_up, self.quantization, dtype, device))
            down = reader.read(f"{name}.w2.weight", dim=1, start=start, end=end)  # [H, I_l]
            w2.append(quantize_linear(down, self.quantization, dtype, device))
        self.quantized = QuantizedExperts(w13, w2)
        self.w13 = None
        self.w2 = None
