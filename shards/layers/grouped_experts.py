"""The sort-by-expert MoE compute shared by full-precision and quantized experts.

(token, expert) pairs are sorted by expert; each expert this rank holds that received tokens runs
its MLP once on its rows, and the outputs, scaled by the routing weights, are summed back per
token. Expert ids >= E_l (held by another rank under expert parallelism) sort last and are dropped.
Legend: T tokens, H hidden size, K experts per token, E_l experts held, P pairs routed to them.
"""

from collections.abc import Callable

import torch


def run_grouped(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    num_held: int,
    expert_mlp: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """This rank's partial MoE output [T, H] for hidden [T, H], routing weights and expert ids [T, K];
    `expert_mlp(e, rows)` is expert e's MLP on rows [c, H] (returning [c, H])."""
    top_k = experts.shape[1]
    flat = experts.flatten()  # [T K]
    order = flat.argsort(stable=True)  # [T K], grouped by expert, token order kept within one
    counts = torch.bincount(flat, minlength=num_held).tolist()
    order = order[: sum(counts[:num_held])]  # [P]: pairs routed elsewhere sort last and are dropped
    token_of = order // top_k
    routed = hidden[token_of]  # [P, H]
    out = torch.empty_like(routed)
    start = 0
    for expert, count in enumerate(counts[:num_held]):
        if count == 0:
            continue
        end = start + count
        out[start:end] = expert_mlp(expert, routed[start:end])  # [c, H]
        start = end
    scaled = out * weights.flatten()[order].unsqueeze(-1).to(out.dtype)  # [P, H]
    return torch.zeros_like(hidden).index_add_(0, token_of, scaled)
