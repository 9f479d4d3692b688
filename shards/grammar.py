"""Constrained decoding on a shard: each constrained sequence's llguidance matcher, the allowed-token
bitmask it gives before every sample, and that mask applied to the logits (the whole vocabulary, or
the slice of it this rank holds under the parallel greedy path).

The grammar state lives here, beside the sequence's sampling state, so multi-step decode runs
constrained and free sequences alike without a round trip to the router. After a token is sampled
the matcher consumes it and computes the next mask in a worker thread (llguidance releases the
GIL), so the work overlaps the next forward; the next sample waits for it. That pays where the host
waits on a GPU; a CPU shard's forward keeps its core busy, so there the work runs inline (measured on
the demo model, 8 constrained rows: 0.33 ms a step inline, 0.8-1.9 ms waiting on the thread). A matcher is a pure
function of the grammar and the tokens it consumed, so every rank masks the same tokens.

Speculation: a constrained sequence proposes the tokens its grammar forces next (`forced`: llguidance's
fast-forward tokens, a JSON schema's keys and punctuation) or the looked-up tokens it allows
(`valid_start`), and a verification step masks each of its rows by the matcher's state after the
proposals before that row (`row_masks`: consumed, masked, rolled back), so the verified tokens are the
ones plain constrained decoding samples; the matcher then consumes the run kept.

The mask reaches the logits through the `apply_token_bitmask` op (shards/ops: the torch reference or
the C kernel).

Legend: C constrained rows that sample, W = ceil(V / 32) 32-bit words of a mask row, V vocabulary
size, P columns of the logits given (V, or this rank's vocabulary slice, padding included).
"""

import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llguidance
import torch
from torch import Tensor

from mixserve.shards.ops import reference

log = logging.getLogger("mixserve.shard")

# Compiled grammars a shard keeps (a request repeating a schema skips compiling it).
COMPILED_GRAMMARS = 64


class GrammarError(ValueError):
    """A grammar the shard cannot build a matcher for."""


def load_tokenizer(model_dir: str | Path, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the checkpoint's tokenizer (tokenizer.json), over the model's `vocab_size`
    rows; the end-of-sequence tokens are config.json's `eos_token_id` where it names them."""
    model_dir = Path(model_dir)
    tokenizer_json = model_dir / "tokenizer.json"
    eos = None
    config = model_dir / "config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
    if tokenizer_json.is_file():
        return llguidance.LLTokenizer(tokenizer_json.read_text(), n_vocab=vocab_size, eos_token=eos)
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    return from_tokenizer(AutoTokenizer.from_pretrained(model_dir), n_vocab=vocab_size, eos_token=eos)


class SequenceGrammar:
    """One sequence's matcher and the mask of the token it may sample next."""

    __slots__ = ("_matcher", "_eos_only", "_mask", "_pending", "_executor")

    def __init__(self, matcher: llguidance.LLMatcher, eos_only: Tensor, executor: ThreadPoolExecutor | None) -> None:
        self._matcher = matcher
        self._eos_only = eos_only
        self._mask = torch.empty_like(eos_only)  # [W] int32
        self._executor = executor
        self._pending: Future[None] | None = None
        self._run(self._compute_mask)

    def mask(self) -> Tensor:
        """The allowed tokens of the next sample as a bitmask [W] int32 (bit t % 32 of word t // 32)."""
        if self._pending is not None:
            self._pending.result()
        return self._mask

    def consume(self, token_ids: list[int]) -> None:
        """Advance past the sampled `token_ids` (a verified run: one or more) and compute the next mask (in the
        background, with an executor)."""
        self.mask()
        self._run(self._consume_and_mask, token_ids)

    def forced(self, k: int) -> list[int]:
        """Up to `k` tokens the grammar forces next (llguidance's fast-forward tokens: a JSON schema's keys and
        punctuation, in the tokenizer's own spelling); [] where the next token is the model's choice."""
        self.mask()
        matcher = self._matcher
        if k < 1 or matcher.is_error() or matcher.is_stopped():
            return []
        return matcher.compute_ff_tokens()[:k]

    def valid_start(self, tokens: list[int]) -> list[int]:
        """The longest start of `tokens` the grammar allows from here."""
        self.mask()
        return tokens[: self._matcher.validate_tokens(tokens)] if tokens else []

    def row_masks(self, proposed: list[int]) -> Tensor:
        """[1 + len(proposed), W]: the mask before each proposed token, then after the last (a verification step's
        rows); the matcher is left where it was. Rows after a token the grammar refuses repeat the last valid
        state's mask: that token is masked out, so verification stops there whatever they hold."""
        masks = [self.mask().clone()]
        valid = self._matcher.validate_tokens(proposed) if proposed else 0
        for token in proposed[:valid]:
            self._matcher.consume_token(token)
            masks.append(torch.empty_like(self._mask))
            self._compute_mask_into(masks[-1])
        if valid:
            self._matcher.rollback(valid)
        masks.extend(masks[-1] for _ in range(len(proposed) - valid))
        return torch.stack(masks)

    def _run(self, work, *args) -> None:
        if self._executor is None:
            work(*args)
        else:
            self._pending = self._executor.submit(work, *args)

    def _consume_and_mask(self, token_ids: list[int]) -> None:
        for token_id in token_ids:
            if not self._matcher.is_error() and not self._matcher.consume_token(token_id):
                log.warning("event=grammar_rejected_token token_id=%d error=%r", token_id, self._matcher.get_error())
        self._compute_mask()

    def _compute_mask(self) -> None:
        self._compute_mask_into(self._mask)

    def _compute_mask_into(self, mask: Tensor) -> None:
        matcher = self._matcher
        # A finished grammar (or one in error, which a validated grammar and masked sampling never reach)
        # leaves only the end of the sequence.
        if matcher.is_error() or matcher.is_stopped():
            mask.copy_(self._eos_only)
            return
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        if matcher.is_error():
            mask.copy_(self._eos_only)


class GrammarMatchers:
    """Builds the per-sequence matchers of one shard over its checkpoint's tokenizer."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab_size: int, background_threads: int = 0) -> None:
        """`background_threads` > 0 computes masks in that many worker threads, off the step's path (for
        shards whose host waits on a GPU); 0 computes them inline."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_only = token_bitmask(tokenizer.eos_tokens, vocab_size)
        # Untouched matchers by grammar, least recently used first; copied, never advanced.
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor = (
            ThreadPoolExecutor(max_workers=background_threads, thread_name_prefix="grammar")
            if background_threads
            else None
        )

    def matcher(self, grammar: str) -> SequenceGrammar:
        """A sequence's grammar state at its first token; GrammarError if `grammar` does not compile.

        A grammar seen before is copied from its untouched matcher (~0.01 ms, where compiling a schema of a
        few dozen fields takes ~2.5 ms of the step)."""
        start = self._compiled.get(grammar)
        if start is None:
            start = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if start.is_error():
                raise GrammarError(f"the grammar does not compile: {start.get_error()}")
            self._compiled[grammar] = start
            if len(self._compiled) > COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return SequenceGrammar(start.deep_copy(), self.eos_only, self._executor)


def token_bitmask(token_ids: Iterable[int], vocab_size: int) -> Tensor:
    """[W] int32: the bitmask that allows exactly `token_ids` (a grammar's end of sequence, a request's
    allowed_token_ids), in the layout `apply_token_bitmask` reads."""
    mask = torch.zeros(-(-vocab_size // 32), dtype=torch.int32)  # [W]
    for token in token_ids:
        mask[token // 32] |= _bit(token % 32)
    return mask


def _bit(index: int) -> int:
    """The int32 word with only bit `index` set (bit 31 is the sign bit)."""
    return (1 << index) - (1 << 32 if index == 31 else 0)


def allowed_tokens(bitmask: Tensor, vocab_start: int, width: int, vocab_size: int) -> Tensor:
    """[C, P] bool: whether token `vocab_start + j` is allowed in each row of `bitmask` [C, W] int32."""
    rows = bitmask.shape[0]
    zeros = torch.zeros(rows, width, device=bitmask.device)
    return reference.apply_token_bitmask(zeros, list(range(rows)), bitmask, vocab_start, vocab_size) == 0
