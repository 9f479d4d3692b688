"""vLLM's allowed_token_ids and bad_words on a shard runner (shards/logits_processors.py, shards/step_rows.py):
every greedy token is transformers' argmax among the tokens the rule permits at its position (teacher-forced
on the demo checkpoint), in plain decode steps and in verification steps whose proposals run into a banned
word, beside an unrestricted sequence in the same steps that keeps its own tokens."""

import pytest
import torch
from transformers import MixtralForCausalLM as ReferenceMixtral

from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.grammar import token_bitmask
from mixserve.shards.loader import load_model
from mixserve.shards.logits_processors import banned_tokens
from mixserve.shards.ops import cpu_logits
from mixserve.shards.ops import reference as torch_ops
from mixserve.shards.ops.reference import MASKED_LOGIT
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import InvalidStep, SequenceStep

BLOCK = 4
NUM_BLOCKS = 48
PROMPT = [1, 40, 41, 42, 43, 40, 41, 7, 9]
STEPS = 10
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(demo_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    return load_model(demo_dir, parallel, TensorParallelGroup(parallel))


@pytest.fixture(scope="module")
def reference(demo_dir):
    return ReferenceMixtral.from_pretrained(demo_dir, dtype=torch.float32).eval()


def new_runner(model) -> ModelRunner:
    parallel = ParallelConfig()
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), CPU, torch.float32, BLOCK)
    runner.allocate_cache(NUM_BLOCKS)
    return runner


def slots(table: list[int], start: int, end: int) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]


def decode(runner: ModelRunner, samplings: list[SamplingParams], proposals=None) -> list[list[int]]:
    """STEPS tokens for each sampling's sequence (ids 1, 2, ...) on PROMPT, decoded together; `proposals`
    (sequence index, its output so far) -> tokens it proposes for verification (none: plain steps)."""
    tables = [[(i * 11 + 5 * b) % NUM_BLOCKS for b in range(8)] for i in range(len(samplings))]
    first = [
        SequenceStep(i + 1, PROMPT, 0, slots(tables[i], 0, len(PROMPT)), tables[i], True, sampling)
        for i, sampling in enumerate(samplings)
    ]
    outs = [[r.token_id] for r in runner.step(first)]
    while min(len(out) for out in outs) < STEPS:
        steps, live = [], [i for i, out in enumerate(outs) if len(out) < STEPS]
        for i in live:
            start = len(PROMPT) + len(outs[i]) - 1
            proposed = (proposals(i, outs[i]) if proposals else [])[: STEPS - len(outs[i]) - 1]
            steps.append(
                SequenceStep(
                    i + 1,
                    [outs[i][-1], *proposed],
                    start,
                    slots(tables[i], start, start + 1 + len(proposed)),
                    tables[i],
                    True,
                    num_proposed=len(proposed),
                )
            )
        for i, r in zip(live, runner.step(steps), strict=True):
            outs[i] += [r.token_id] + [t.token_id for t in r.next_tokens]
    runner.release([i + 1 for i in range(len(samplings))])
    return [out[:STEPS] for out in outs]


def assert_argmax_of_permitted(reference, out: list[int], permitted) -> None:
    """Each of `out` is transformers' argmax over `permitted(output before it)` (a set of token ids, or None:
    every token but those in `banned`) given PROMPT and the tokens before it."""
    with torch.no_grad():
        logits = reference(torch.tensor([PROMPT + out])).logits[0, len(PROMPT) - 1 : -1]  # [STEPS, V]
    for i, token in enumerate(out):
        allowed, banned = permitted(out[:i])
        row = logits[i].clone()
        if allowed is not None:
            keep = torch.zeros_like(row, dtype=torch.bool)
            keep[list(allowed)] = True
            row[~keep] = -torch.inf
        row[list(banned)] = -torch.inf
        assert token == int(row.argmax()), f"position {i}: {token} is not the permitted argmax {int(row.argmax())}"


def test_banned_tokens_follows_vllms_rule():
    words = [[5], [7, 8], [1, 2, 3]]
    assert banned_tokens(words, []) == [5]  # a longer word never matches the prompt, only the output
    assert banned_tokens(words, [9, 7]) == [5, 8]
    assert banned_tokens(words, [1, 2]) == [5, 3]
    assert banned_tokens(words, [2]) == [5]


def test_allowed_token_ids_keep_greedy_to_the_allowed_tokens(model, reference):
    plain = decode(new_runner(model), [SamplingParams()])[0]
    # The unrestricted picks at two positions, a token from each half of the vocabulary, not the first pick.
    allowed = sorted({plain[1], plain[4], 300, 7000} - {plain[0]})
    got, beside = decode(new_runner(model), [SamplingParams(allowed_token_ids=allowed), SamplingParams()])
    assert set(got) <= set(allowed) and beside == plain
    assert_argmax_of_permitted(reference, got, lambda before: (set(allowed), ()))


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "verified"])
def test_bad_words_ban_single_tokens_always_and_longer_words_after_their_start(model, reference, speculate):
    plain = decode(new_runner(model), [SamplingParams()])[0]
    # The unrestricted output's first two tokens as a word (its first token not the prompt's last, where
    # transformers' rule, which also reads the prompt, would differ), and its next other token as a word.
    word = plain[:2]
    single = next(token for token in plain if token not in word)
    assert word[0] != PROMPT[-1]
    words = [word, [single]]
    # Verification steps propose the unrestricted continuation, so their proposals hold the banned word.
    proposals = (lambda i, out: plain[len(out) : len(out) + 3]) if speculate else None
    sampling = SamplingParams(bad_words=words)
    got, beside = decode(new_runner(model), [sampling, SamplingParams()], proposals)
    assert beside == plain and got != plain and single not in got
    assert all(got[i : i + 2] != word for i in range(len(got) - 1))
    assert_argmax_of_permitted(reference, got, lambda before: (None, banned_tokens(words, before)))


def test_sampled_rows_draw_only_permitted_tokens(model):
    plain = decode(new_runner(model), [SamplingParams()])[0]
    allowed = sorted({plain[0], 300, 4100, 7000})
    restricted = SamplingParams(temperature=1.5, seed=3, allowed_token_ids=allowed)
    banning = SamplingParams(temperature=1.5, seed=3, top_k=3, bad_words=[[plain[0]]])
    got, other = decode(new_runner(model), [restricted, banning])
    assert set(got) <= set(allowed) and len(set(got)) > 1
    assert plain[0] not in other


@pytest.mark.parametrize("op", [torch_ops.apply_token_bitmask, cpu_logits.apply_token_bitmask], ids=["torch", "c"])
def test_allowed_tokens_mask_a_vocabulary_slice_and_its_padding(op):
    masks = torch.stack([token_bitmask([1, 5, 6], 8), token_bitmask([2], 8)])
    logits = torch.arange(15, dtype=torch.float32).view(3, 5)  # 3 rows of the slice [4, 9): token 8 is padding
    got = op(logits, [0, 2], masks, 4, 8)
    off = MASKED_LOGIT
    expected = torch.tensor([[off, 1, 2, off, off], [5, 6, 7, 8, 9], [off] * 5])  # in fp32, as the logits are
    assert torch.equal(got, expected)


def test_restrictions_naming_tokens_past_the_vocabulary_are_refused(model):
    runner = new_runner(model)
    table = list(range(4))
    for sampling in (SamplingParams(allowed_token_ids=[3, 9000]), SamplingParams(bad_words=[[3, 9000]])):
        step = SequenceStep(1, PROMPT, 0, slots(table, 0, len(PROMPT)), table, True, sampling)
        with pytest.raises(InvalidStep, match="9000 >= vocab size"):
            runner.step([step])
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[[]])
