"""The MoE experts without a host sync: every held expert runs on every token, unchosen pairs weighted 0.

The sort-by-expert path reads per-expert token counts back to the host (`bincount().tolist()`) to
slice its rows, which a CUDA graph cannot capture. This path has only fixed shapes: two batched
matmuls over all E_l held experts and a scatter of the routing weights into a dense [T, E_l] table.
Cost: E_l / K times the sparse path's FLOPs (4x for Mixtral's 8 experts, top 2, under tp), and every
held expert's weights read once a step, which the sparse path also reads once a decode batch reaches
every expert (top 2 of 8 leaves an expert unused at batch 16 with probability ~1 %). It is the
reference the Triton fused MoE replaces on the GPU, and what a captured decode step runs without it.
Legend: T tokens, H hidden size, K experts per token, E_l experts held, I_l intermediate size per rank.
"""

import torch
import torch.nn.functional as F


def experts_dense(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """This rank's partial MoE output [T, H] for hidden [T, H], routing weights and expert ids [T, K].

    Expert ids >= E_l (held by another rank, see `held_expert_ids`) get no weight.
    """
    held = w13.shape[0]
    # Column E_l collects every pair routed elsewhere (held_expert_ids maps them to E_l) and is dropped.
    combine = torch.zeros(hidden.shape[0], held + 1, dtype=torch.float32, device=hidden.device)  # [T, E_l + 1]
    combine.scatter_add_(1, experts, weights.float())
    gate_up = torch.einsum("th,eih->eti", hidden, w13)  # [E_l, T, 2 I_l]
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.einsum("eti,ehi->eth", F.silu(gate) * up, w2)  # [E_l, T, H]
    scale = combine[:, :held].t().unsqueeze(-1).to(out.dtype)  # [E_l, T, 1]
    return (out * scale).sum(dim=0)
