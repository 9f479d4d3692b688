"""The logits processors of a shard's sampling, each over a batch of rows: logit bias, vLLM's
bad_words, repetition, frequency and presence penalties (shards/token_history.py
keeps what they read), and the top-k/top-p and typical masks. Ties are broken by token id, so every rank
of a group removes the same tokens.

Shapes:
    B  sequences sampling this step (rows of the logits)
    V  vocabulary size
    P  this rank's columns of the vocabulary
    R  the subset of rows a stage works on (rows with penalties, or rows that draw at random)
    S  ids of one stage's (row, token) pairs, flattened over its rows
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mixserve.shards.host_to_device import tensor_to_device, to_device
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.token_history import TokenHistory


def mask_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Return `logits` `[R, V]` with the entries that top-k and then top-p remove set to -inf.

    `top_k` `[R]` keeps exactly the k highest (0 = off; ties at the k-th value go to the lower token
    id); `top_p` `[R]` then keeps the fewest most probable tokens whose probability (softmax of the
    top-k survivors) reaches p, and always the most probable one (p >= 1 = off).

    On the CPU each row reads only as many of its largest logits as its nucleus needs (`_kept_ids`):
    sorting a row of Mixtral's 32,000 logits takes ~2 ms of a core, for every sampled sequence of every
    step. Elsewhere the rows are sorted (`_mask_sorted`): a GPU sorts them in microseconds, and the
    growing selection would read counts back to the host.
    """
    if not logits.is_cpu:
        return _mask_sorted(logits, top_k, top_p)
    masked = torch.full_like(logits, -math.inf)  # [R, V]
    vocab = logits.shape[1]
    for row, (k, p) in enumerate(zip(top_k.tolist(), top_p.tolist(), strict=True)):
        if (k <= 0 or k >= vocab) and p >= 1:  # a row without cuts in a batch with them
            masked[row] = logits[row]
            continue
        kept = _kept_ids(logits[row], k, p)  # [M]
        masked[row, kept] = logits[row, kept]
    return masked


# The largest logits `_kept_ids` reads first: a trained model's nucleus at top_p 0.9-0.95 is rarely
# more than a few dozen tokens.
NUCLEUS_FIRST = 64
# Past those, the survivors' probability mass in bins of their log-probability (NUCLEUS_BIN_WIDTH wide,
# the last bin holding everything below) says how many of the largest logits hold the nucleus.
NUCLEUS_BINS = 128
NUCLEUS_BIN_WIDTH = 0.25


def _kept_ids(row: Tensor, top_k: int, top_p: float) -> Tensor:
    """The ids `mask_top_k_top_p` keeps of one CPU row `[V]`: the m largest logits, ties at the m-th value
    to the lower ids. m depends on the sorted values alone (the same whichever of equal values a
    selection returns), so it is read from the 64 largest where the nucleus closes among them; else from
    the n largest, n counted by binning the survivors' mass so that they reach top_p; else (rounding
    left the nucleus open at n) from the sorted row."""
    vocab = row.shape[0]
    k = min(top_k, vocab) if top_k > 0 else vocab
    if top_p >= 1:
        if k == vocab:
            return torch.arange(vocab)
        values, m = row.topk(k).values, k  # [k] descending
    else:
        top = row.max()
        survivors = row if k == vocab else row.topk(k).values  # [k]
        weights = (survivors - top).exp()  # [k]
        denominator = weights.sum()  # of the softmax over the top-k survivors
        n = min(NUCLEUS_FIRST, k)
        values, m = _nucleus(row, top, denominator, n, top_p)
        if m == n < k:
            n = _nucleus_size(survivors, top, weights, denominator, top_p)
            values, m = _nucleus(row, top, denominator, n, top_p)
            if m == n < k:
                values, m = _nucleus(row, top, denominator, k, top_p)
    if m == 0:  # top_p <= 0, or a row of -inf and NaN: nothing survives
        return torch.empty(0, dtype=torch.long)
    cut = values[m - 1]
    above = (row > cut).nonzero().squeeze(1)  # [A] every one kept
    tied = (row == cut).nonzero().squeeze(1)[: m - above.shape[0]]  # the lowest ids at the cut
    return torch.cat((above, tied))


def _nucleus(row: Tensor, top: Tensor, denominator: Tensor, n: int, top_p: float) -> tuple[Tensor, int]:
    """The n largest logits of `row` (descending) and how many of them top_p keeps (n: maybe more)."""
    values = row.topk(n).values  # [n] descending
    probs = (values - top).exp() / denominator  # [n]
    mass_before = probs.cumsum(0) - probs  # [n] mass of the more probable tokens
    return values, int((mass_before < top_p).sum())


def _nucleus_size(survivors: Tensor, top: Tensor, weights: Tensor, denominator: Tensor, top_p: float) -> int:
    """How many of the largest survivors hold top_p of their mass, to a bin: every survivor in the bins
    (of log-probability, from the largest down) up to the one where the mass reaches top_p."""
    bins = ((top - survivors) / NUCLEUS_BIN_WIDTH).nan_to_num(posinf=NUCLEUS_BINS).clamp_(max=NUCLEUS_BINS - 1)
    bins = bins.long()  # [k]
    mass = torch.zeros(NUCLEUS_BINS, dtype=torch.float64).index_add_(0, bins, weights.double())  # [B]
    last = int(torch.searchsorted(mass.cumsum(0), top_p * float(denominator)).clamp(max=NUCLEUS_BINS - 1))
    return int((bins <= last).sum())


def _mask_sorted(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """mask_top_k_top_p over whole sorted rows: the same tokens, with no host reads."""
    vocab = logits.shape[-1]
    # A stable sort puts equal logits in token-id order, so tie-breaking is the same on every rank.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # [R, V], [R, V]
    ranks = torch.arange(vocab, device=logits.device)  # [V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).to(logits.device)  # [R]
    removed = ranks[None, :] >= k[:, None]  # [R, V] in sorted order
    probs = sorted_logits.masked_fill(removed, -math.inf).softmax(dim=-1)  # [R, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V] mass of the more probable tokens
    top_p = top_p.to(device=logits.device, dtype=probs.dtype)[:, None]  # [R, 1]
    # The first token has mass_before 0 < p, so one always survives; p >= 1 is off even where
    # rounding lets the cumulative sum reach 1 before the tail.
    removed |= (mass_before >= top_p) & (top_p < 1)
    removed = torch.empty_like(removed).scatter_(1, sorted_ids, removed)  # [R, V] back in token order
    return logits.masked_fill(removed, -math.inf)


def mask_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Return `logits` `[R, V]` with the tokens less likely than `min_p` `[R]` times the row's most likely
    one set to -inf (transformers' MinPLogitsWarper; 0 = off); the most likely token always stays."""
    log_probs = logits.log_softmax(dim=-1)  # [R, V]
    best = log_probs.max(dim=-1, keepdim=True).values  # [R, 1]
    share = min_p.to(device=logits.device, dtype=log_probs.dtype)[:, None]  # [R, 1]
    # p < min_p * p_max, in logs; a row with min_p 0 compares against -inf and keeps every token.
    removed = log_probs < best + share.log()
    return logits.masked_fill(removed, -math.inf)


def mask_typical(logits: Tensor, mass: Tensor) -> Tensor:
    """Return `logits` `[R, V]` with the tokens typical sampling removes set to -inf (transformers'
    TypicalLogitsWarper): tokens ranked by how far their surprisal is from the row's entropy, the
    closest kept until their probability reaches `mass` `[R]` (>= 1 = off), the closest always."""
    log_probs = logits.log_softmax(dim=-1)  # [R, V]
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # [R, 1]
    distance = (-log_probs - entropy).abs()  # [R, V]
    # A stable sort puts equal distances in token-id order, the same on every rank.
    sorted_distance, sorted_ids = distance.sort(dim=-1, stable=True)  # [R, V], [R, V]
    cumulative = logits.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)  # [R, V]
    mass = mass.to(device=logits.device, dtype=cumulative.dtype)[:, None]  # [R, 1]
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)  # [R, 1]
    removed = sorted_distance > sorted_distance.gather(-1, last)  # [R, V] in sorted order
    removed[:, 0] = False
    removed &= mass < 1
    removed = torch.empty_like(removed).scatter_(1, sorted_ids, removed)  # [R, V] back in token order
    return logits.masked_fill(removed, -math.inf)


def apply_logit_bias(
    logits: Tensor, rows: list[int], biases: list[dict[int, float]], vocab_start: int, vocab_size: int
) -> Tensor:
    """`logits` `[R, P]` (fp32, this rank's columns from `vocab_start`) with each of `rows`' `biases` (token id ->
    bias, in the order of `rows`) added to the tokens it holds; ids at or past `vocab_size` are never biased."""
    row_of, columns, values = [], [], []
    end = min(vocab_start + logits.shape[1], vocab_size)
    for row, bias in zip(rows, biases, strict=True):
        for token, value in bias.items():
            if vocab_start <= token < end:
                row_of.append(row)
                columns.append(token - vocab_start)
                values.append(value)
    logits = logits.float()
    if not row_of:
        return logits
    device = logits.device
    index = (to_device(row_of, device), to_device(columns, device))  # [S], [S]
    return logits.index_put(index, to_device(values, device, torch.float32), accumulate=True)


def banned_tokens(bad_words: Sequence[Sequence[int]], past: Sequence[int]) -> list[int]:
    """The tokens vLLM's bad_words rule bans after the output `past`: every one-token word, and each longer
    word's last token where `past` ends with the rest of it (the prompt never counts)."""
    banned = []
    for word in bad_words:
        rest = len(word) - 1
        if rest == 0 or (rest <= len(past) and list(past[len(past) - rest :]) == list(word[:rest])):
            banned.append(word[-1])
    return banned


def apply_penalties(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory]) -> Tensor:
    """Penalised copy of `logits` `[B, V]` (`logits` itself when no row has a penalty).

    Repetition penalty, once per distinct prompt or output token: a positive logit is divided by
    it, any other multiplied. Then, per output token: logit -= frequency_penalty * count +
    presence_penalty * (count > 0).
    """
    rows = [i for i, p in enumerate(params) if p.has_repetition_penalty or p.has_output_penalty]
    if not rows:
        return logits
    device = logits.device
    row_index = to_device(rows, device)  # [R]
    scores = logits.index_select(0, row_index)  # [R, V]
    sub_params = [params[i] for i in rows]
    sub_histories = [histories[i] for i in rows]

    if any(p.has_repetition_penalty for p in sub_params):
        seen = _row_token_mask(scores, [h.seen_ids() for h in sub_histories])  # [R, V] bool
        penalty = to_device([p.repetition_penalty for p in sub_params], device, torch.float32)[:, None]  # [R, 1]
        penalised = torch.where(scores > 0, scores / penalty, scores * penalty)  # [R, V]
        scores = torch.where(seen, penalised, scores)

    if any(p.has_output_penalty for p in sub_params):
        counts = _row_token_counts(scores, [h.output_ids() for h in sub_histories])  # [R, V]
        frequency = to_device([p.frequency_penalty for p in sub_params], device, torch.float32)[:, None]  # [R, 1]
        presence = to_device([p.presence_penalty for p in sub_params], device, torch.float32)[:, None]  # [R, 1]
        scores = scores - frequency * counts - presence * (counts > 0)

    return logits.index_copy(0, row_index, scores)


def _flat_rows(ids_per_row: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([ids.numel() for ids in ids_per_row])  # [R]
    row_of = torch.repeat_interleave(torch.arange(len(ids_per_row)), lengths)  # [S]
    return tensor_to_device(row_of, device), tensor_to_device(torch.cat(ids_per_row), device)  # [S], [S]


def _row_token_mask(scores: Tensor, ids_per_row: list[Tensor]) -> Tensor:
    row_of, ids = _flat_rows(ids_per_row, scores.device)
    # 2-D indexing bounds-checks ids against V instead of spilling into the next row.
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).index_put_(
        (row_of, ids), torch.ones((), dtype=torch.bool, device=scores.device)
    )  # [R, V]


def _row_token_counts(scores: Tensor, ids_per_row: list[Tensor]) -> Tensor:
    row_of, ids = _flat_rows(ids_per_row, scores.device)
    return torch.zeros_like(scores).index_put_(
        (row_of, ids), torch.ones((), dtype=scores.dtype, device=scores.device), accumulate=True
    )  # [R, V]
