"""Constrained decoding on a shard: bitmask decoding against llguidance's own, the mask of a vocabulary
slice against the full one, matchers that end in the end-of-sequence token, and the runner sampling
under a grammar (shards/grammar.py, shards/runner.py)."""

import json

import llguidance
import pytest
import torch

from mixserve.shards.grammar import GrammarMatchers, allowed_tokens, load_tokenizer
from mixserve.shards.ops.reference import MASKED_LOGIT, apply_token_bitmask

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "s": {"enum": ["x", "y"]}},
    "required": ["n", "s"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def matchers(demo_dir) -> GrammarMatchers:
    config = json.loads((demo_dir / "config.json").read_text())
    return GrammarMatchers(load_tokenizer(demo_dir, config["vocab_size"]), config["vocab_size"])


def _reference_allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[C, V] bool from llguidance's own bitmask unpacking (its numpy helper)."""
    import numpy as np
    from llguidance.numpy import apply_token_bitmask_inplace

    logits = np.zeros((bitmask.shape[0], vocab_size), dtype=np.float32)
    apply_token_bitmask_inplace(logits, bitmask.numpy())
    return torch.from_numpy(logits == 0)


def test_allowed_tokens_match_llguidance_unpacking():
    gen = torch.Generator().manual_seed(0)
    vocab = 100
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=gen, dtype=torch.int64).to(torch.int32)
    torch.testing.assert_close(allowed_tokens(bitmask, 0, vocab, vocab), _reference_allowed(bitmask, vocab))


@pytest.mark.parametrize("ranks", [2, 3])
def test_mask_of_a_vocabulary_slice_is_the_slice_of_the_full_mask(ranks):
    gen = torch.Generator().manual_seed(1)
    vocab, rows = 70, 5
    per_rank = -(-vocab // ranks)  # the last rank's slice has padding columns past the vocabulary
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 3), generator=gen, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(rows, ranks * per_rank, generator=gen)
    constrained = [1, 3]
    full = apply_token_bitmask(logits[:, :vocab], constrained, bitmask, 0, vocab)  # [R, V]
    for rank in range(ranks):
        start = rank * per_rank
        local = apply_token_bitmask(logits[:, start : start + per_rank], constrained, bitmask, start, vocab)
        valid = min(per_rank, vocab - start)
        torch.testing.assert_close(local[:, :valid], full[:, start : start + valid])
        assert (local[constrained, valid:] == MASKED_LOGIT).all()  # padding is never allowed
    free = [0, 2, 4]
    torch.testing.assert_close(full[free], logits[free, :vocab])  # unconstrained rows untouched
    assert torch.equal(full[constrained] != MASKED_LOGIT, allowed_tokens(bitmask, 0, vocab, vocab))


@pytest.mark.parametrize("background_threads", [0, 2])
def test_matcher_follows_the_grammar_to_the_end_of_sequence(matchers, background_threads):
    tokenizer = matchers.tokenizer
    matchers = GrammarMatchers(tokenizer, matchers.vocab_size, background_threads)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    sequence = matchers.matcher(grammar)
    text_ids = tokenizer.tokenize_str('{"n":7,"s":"y"}')
    for token in text_ids:
        allowed = allowed_tokens(sequence.mask()[None], 0, matchers.vocab_size, matchers.vocab_size)[0]
        assert allowed[token], tokenizer.decode_str([token])
        assert not allowed[tokenizer.eos_token]
        sequence.consume([token])
    allowed = allowed_tokens(sequence.mask()[None], 0, matchers.vocab_size, matchers.vocab_size)[0]
    assert allowed.nonzero().flatten().tolist() == tokenizer.eos_tokens


def test_a_grammar_seen_before_starts_from_a_fresh_copy(matchers):
    grammar = llguidance.LLMatcher.grammar_from_regex("ab|ac")
    tokenizer = matchers.tokenizer
    first = matchers.matcher(grammar)
    initial = first.mask().clone()
    for token in tokenizer.tokenize_str("ab"):
        first.consume([token])
    second = matchers.matcher(grammar)
    assert torch.equal(second.mask(), initial)
    assert not torch.equal(first.mask(), initial)


def test_forced_tokens_and_the_valid_start_of_proposals(matchers):
    tokenizer = matchers.tokenizer
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    sequence = matchers.matcher(grammar)
    forced = sequence.forced(8)
    assert tokenizer.decode_str(forced) == '{"n":'  # the schema's first key is required: forced up to its value
    assert sequence.forced(2) == forced[:2] and sequence.forced(0) == []
    sequence.consume(forced)
    assert sequence.forced(8) == []  # the digit is the model's choice
    digits = tokenizer.tokenize_str("7,")
    assert sequence.valid_start(digits + tokenizer.tokenize_str("}}")) == digits  # the first "}" is refused


def test_row_masks_follow_the_proposals_and_leave_the_matcher_where_it_was(matchers):
    tokenizer = matchers.tokenizer
    vocab = matchers.vocab_size
    sequence = matchers.matcher(llguidance.LLMatcher.grammar_from_regex("abc|abd"))
    a, b, c, x = (tokenizer.tokenize_str(ch)[0] for ch in "abcx")
    before = sequence.mask().clone()
    masks = sequence.row_masks([a, b, x, c])  # x is refused: the rows after it repeat the mask before it
    assert masks.shape == (5, before.numel()) and torch.equal(masks[0], before)
    allowed = allowed_tokens(masks, 0, vocab, vocab)
    assert allowed[0, a] and allowed[1, b] and not allowed[1, a] and allowed[2, c] and not allowed[2, x]
    assert torch.equal(masks[3], masks[2]) and torch.equal(masks[4], masks[2])
    assert torch.equal(sequence.mask(), before)  # rolled back
    ended = sequence.row_masks([a, b, c])  # the last row: the grammar is complete, only the end of sequence
    assert allowed_tokens(ended[3:], 0, vocab, vocab)[0].nonzero().flatten().tolist() == tokenizer.eos_tokens
    sequence.consume([a, b])
    assert allowed_tokens(sequence.mask()[None], 0, vocab, vocab)[0, c]


def test_invalid_grammar_is_refused(matchers):
    from mixserve.shards.grammar import GrammarError

    with pytest.raises(GrammarError, match="regex"):
        matchers.matcher(llguidance.LLMatcher.grammar_from_regex("a(b"))


def test_runner_samples_only_what_the_grammar_allows(demo_dir, matchers):
    """Greedy and seeded draws through ModelRunner.step with a regex grammar: the random demo model's
    tokens spell a full match, then the end-of-sequence token."""
    import re

    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.loader import load_model
    from mixserve.shards.runner import ModelRunner
    from mixserve.shards.sampling_params import SamplingParams
    from mixserve.shards.sequence_step import SequenceStep

    torch.set_num_threads(1)
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    model = load_model(demo_dir, parallel, group)
    runner = ModelRunner(model, parallel, group, torch.device("cpu"), torch.float32, 16, grammars=matchers)
    runner.allocate_cache(16)
    pattern = "(yes|no|[0-9]{2})!"
    grammar = llguidance.LLMatcher.grammar_from_regex(pattern)
    tokenizer = matchers.tokenizer
    for seq_id, temperature in ((1, 0.0), (2, 1.0)):
        params = SamplingParams(temperature=temperature, seed=seq_id, grammar=grammar)
        table = [seq_id * 4 + b for b in range(4)]
        steps = [SequenceStep(seq_id, [1, 300, 301], 0, [table[0] * 16 + p for p in range(3)], table, True, params)]
        out: list[int] = []
        for _ in range(12):
            token = runner.step(steps)[0].token_id
            if token == tokenizer.eos_token:
                break
            out.append(token)
            position = steps[0].start_position + len(steps[0].token_ids)
            slot = table[position // 16] * 16 + position % 16
            steps = [SequenceStep(seq_id, [token], position, [slot], table)]
        else:
            pytest.fail(f"no end of sequence after {tokenizer.decode_str(out)!r}")
        assert re.fullmatch(pattern, tokenizer.decode_str(out))
