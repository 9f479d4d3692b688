"""The draft model on a shard (shards/draft.py): drafting steps give the tokens plain decode steps give
(greedy and seeded, with a draft that agrees with the model and one that does not), the draft catches
up over the sequence's own slots after rejections and prefix hits, an unsure draft proposes less, and
bad drafts are refused."""

import json
import shutil

import pytest
import torch

from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.draft import CATCH_UP_CHUNK, check_draft, load_draft
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import InvalidStep, SequenceStep

BLOCK = 4
NUM_BLOCKS = 32
PROMPT = [1, 40, 41, 42, 43, 40, 41, 7, 9]
CPU = torch.device("cpu")


@pytest.fixture
def confident(monkeypatch):
    """Drafts propose every token reserved, however unsure (the demo's random weights give flat logits)."""
    monkeypatch.setattr("mixserve.shards.draft.MIN_CONFIDENCE", 0.0)


@pytest.fixture(scope="module")
def model(demo_dir):
    torch.set_num_threads(1)
    parallel = ParallelConfig()
    return load_model(demo_dir, parallel, TensorParallelGroup(parallel))


def new_runner(model, draft_dir=None, cuda_graphs: str = "off") -> ModelRunner:
    """A runner of `model`, with the draft at `draft_dir`; `cuda_graphs` eager: the draft's decodes go
    through the decode graph runner's static buffers (without capture, on the CPU)."""
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    draft = None
    if draft_dir is not None:
        draft = load_draft(draft_dir, model.config, group, torch.float32, CPU, BLOCK, cuda_graphs)
    runner = ModelRunner(model, parallel, group, CPU, torch.float32, BLOCK, draft=draft)
    runner.allocate_cache(NUM_BLOCKS)
    runner.prepare_decode_graphs(4)
    return runner


def slots(table: list[int], start: int, end: int) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]


def table_of(seq_id: int) -> list[int]:
    """Each sequence its own blocks, in a scattered order (so a wrong slot would read another's K/V)."""
    return [(seq_id * 7 + 3 * i) % NUM_BLOCKS for i in range(10)]


def generate(runner: ModelRunner, seq_id: int, prompt: list[int], n: int, sampling: SamplingParams, k: int = 0):
    """`n` tokens for `prompt`, drafting up to `k` proposals a step (never past `n`); the tokens, the
    proposals kept and the proposals made."""
    table = table_of(seq_id)
    result = runner.step([SequenceStep(seq_id, prompt, 0, slots(table, 0, len(prompt)), table, True, sampling)])[0]
    out, kept, made = [result.token_id], 0, 0
    while len(out) < n:
        start = len(prompt) + len(out) - 1
        proposals = min(k, n - len(out) - 1)
        s = SequenceStep(
            seq_id,
            [out[-1]],
            start,
            slots(table, start, start + 1 + proposals),
            table,
            True,
            None,
            num_proposed=proposals,
            draft=bool(proposals),
        )
        result = runner.step([s])[0]
        out += [result.token_id] + [t.token_id for t in result.next_tokens]
        kept += len(result.next_tokens)
        made += result.num_drafted
        assert 1 <= result.num_drafted <= proposals or not proposals
    runner.release([seq_id])
    return out, kept, made


SAMPLINGS = [SamplingParams(), SamplingParams(temperature=0.9, seed=5, repetition_penalty=1.2)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
@pytest.mark.parametrize("k", [1, 3])
def test_drafting_gives_the_tokens_of_plain_decode(model, demo_dir, interpreter_dir, confident, sampling, k):
    expected, _, _ = generate(new_runner(model), 1, PROMPT, 14, sampling)
    # The model as its own draft agrees with every greedy pick (k = 3: its decodes through the decode
    # graph runner); a smaller model now and then.
    own = new_runner(model, demo_dir, "eager" if k == 3 else "off")
    assert (own.draft.runner.decode_graphs is not None) == (k == 3)
    same, kept_same, made = generate(own, 1, PROMPT, 14, sampling, k)
    small, _, _ = generate(new_runner(model, interpreter_dir), 1, PROMPT, 14, sampling, k)
    assert same == expected and small == expected
    if sampling.temperature == 0:
        assert kept_same == made == 13 - -(-13 // (k + 1))  # all kept: one target step per k + 1 tokens


def test_an_unsure_draft_stops_proposing(model, demo_dir):
    """Random weights give flat logits: the draft is unsure of every token, so it proposes one a step
    (the slots reserved for the rest stay unwritten) and outputs do not change."""
    expected, _, _ = generate(new_runner(model), 1, PROMPT, 14, SamplingParams())
    got, kept, made = generate(new_runner(model, demo_dir), 1, PROMPT, 14, SamplingParams(), 3)
    assert got == expected
    assert made == kept == 13 // 2  # one proposal a step, kept: two tokens a step


def test_batched_drafts_after_rejections_and_a_prefix_hit(model, interpreter_dir):
    """Two sequences drafting in one step, proposals rejected along the way; then a third admitted past
    the first's prompt blocks (a prefix hit) whose draft recomputes them: tokens as without a draft."""
    plain = new_runner(model)
    want = {i: generate(plain, i, PROMPT[: 5 + i], 12, SamplingParams())[0] for i in (1, 2)}
    runner = new_runner(model, interpreter_dir)
    tables = {i: table_of(i) for i in (1, 2)}
    first = [
        SequenceStep(i, PROMPT[: 5 + i], 0, slots(tables[i], 0, 5 + i), tables[i], True, SamplingParams())
        for i in (1, 2)
    ]
    out = {r.seq_id: [r.token_id] for r in runner.step(first)}
    while any(len(o) < 12 for o in out.values()):
        steps = []
        for i, o in out.items():
            if len(o) >= 12:
                continue
            start, k = 5 + i + len(o) - 1, min(3, 12 - len(o) - 1)
            table = tables[i]
            steps.append(
                SequenceStep(
                    i,
                    [o[-1]],
                    start,
                    slots(table, start, start + 1 + k),
                    table,
                    True,
                    num_proposed=k,
                    draft=bool(k),
                )
            )
        for r in runner.step(steps):
            out[r.seq_id] += [r.token_id] + [t.token_id for t in r.next_tokens]
    assert out == want
    # Sequence 3 shares sequence 1's first block (positions 0-3 of the same prompt) and starts at 4.
    prompt = PROMPT[:6]
    table = [tables[1][0]] + table_of(3)[1:]
    hit = SequenceStep(3, prompt[4:], 4, slots(table, 4, 6), table, True, SamplingParams(), prefix_token_ids=prompt[:4])
    got = [runner.step([hit])[0].token_id]
    while len(got) < 12:
        start = 6 + len(got) - 1
        s = SequenceStep(3, [got[-1]], start, slots(table, start, start + 3), table, True, num_proposed=2, draft=True)
        r = runner.step([s])[0]
        got += [r.token_id] + [t.token_id for t in r.next_tokens]
    assert got[:12] == want[1]


def draft_keys(runner: ModelRunner, table: list[int], end: int) -> torch.Tensor:
    """The draft cache's keys at positions [0, end) of a sequence with block table `table`. [L, end, kv, d]"""
    keys = runner.draft.runner.kv_cache.keys
    flat = keys.reshape(keys.shape[0], -1, *keys.shape[3:])
    return flat[:, slots(table, 0, end)]


def test_the_draft_cache_holds_the_kept_tokens_after_partial_acceptance(model, demo_dir, confident):
    """The model as its own draft, its picks pushed off the draft's by a logit bias, so runs end inside
    the proposals: the draft's K/V at every position it counts as computed equals a fresh prefill's."""
    # Biases found by the draft's greedy picks on PROMPT: 5637 is the first pick, 3117 a later one.
    sampling = SamplingParams(logit_bias={5637: -2.0, 3117: 3.0})
    expected, _, _ = generate(new_runner(model), 1, PROMPT, 12, sampling)
    runner = new_runner(model, demo_dir)
    table = table_of(1)
    got = [runner.step([SequenceStep(1, PROMPT, 0, slots(table, 0, 9), table, True, sampling)])[0].token_id]
    fresh = new_runner(model, demo_dir)
    partial = 0
    while len(got) < 12:
        start = len(PROMPT) + len(got) - 1
        s = SequenceStep(1, [got[-1]], start, slots(table, start, start + 4), table, True, num_proposed=3, draft=True)
        r = runner.step([s])[0]
        got += [r.token_id] + [t.token_id for t in r.next_tokens]
        partial += len(r.next_tokens) < 3
        state = runner.draft.sequences[1]
        tokens = state.tokens[: state.cached]
        fresh.draft.runner.forward([SequenceStep(1, tokens, 0, slots(table, 0, len(tokens)), table, False)])
        torch.testing.assert_close(draft_keys(runner, table, state.cached), draft_keys(fresh, table, state.cached))
        assert state.tokens[: start + 1] == PROMPT + got[: start + 1 - len(PROMPT)]
    assert got[:12] == expected
    assert partial  # some runs ended inside the proposals


def test_a_long_prompt_catches_up_in_chunks(model, demo_dir, confident, monkeypatch):
    monkeypatch.setattr("mixserve.shards.draft.CATCH_UP_CHUNK", 4)
    assert CATCH_UP_CHUNK > 4
    expected, _, _ = generate(new_runner(model), 1, PROMPT, 8, SamplingParams())
    got, kept, _ = generate(new_runner(model, demo_dir), 1, PROMPT, 8, SamplingParams(), 3)
    assert got == expected and kept == 5


def test_a_draft_of_dummy_weights_needs_its_config_alone(model, interpreter_dir, tmp_path):
    """--load-format dummy reaches the draft: random weights of its config's shapes, outputs unchanged."""
    config_only = tmp_path / "draft-config"
    config_only.mkdir()
    shutil.copy(interpreter_dir / "config.json", config_only / "config.json")
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    draft = load_draft(config_only, model.config, group, torch.float32, CPU, BLOCK, load_format="dummy", seed=3)
    runner = ModelRunner(model, parallel, group, CPU, torch.float32, BLOCK, draft=draft)
    runner.allocate_cache(NUM_BLOCKS)
    expected, _, _ = generate(new_runner(model), 1, PROMPT, 8, SamplingParams())
    assert generate(runner, 1, PROMPT, 8, SamplingParams(), 2)[0] == expected


def test_drafting_steps_are_refused_where_they_cannot_run(model, interpreter_dir):
    table = table_of(1)
    drafting = SequenceStep(1, [5], 9, slots(table, 9, 11), table, True, num_proposed=1, draft=True)
    runner = new_runner(model, interpreter_dir)
    runner.step([SequenceStep(1, PROMPT, 0, slots(table, 0, 9), table, True, SamplingParams())])
    with pytest.raises(InvalidStep, match="a drafting step is one token"):
        runner.step([SequenceStep(1, [5, 6], 9, slots(table, 9, 12), table, True, num_proposed=1, draft=True)])
    with pytest.raises(InvalidStep, match="2 positions but 3 slots"):
        runner.step([SequenceStep(1, [5], 9, slots(table, 9, 12), table, True, num_proposed=1, draft=True)])
    runner.step([drafting])  # the refusals changed nothing


def test_a_draft_with_another_vocabulary_or_no_config_is_refused(model, interpreter_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(interpreter_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab_size .* differs from the model's"):
        check_draft(other, model.config)
    with pytest.raises(ValueError, match="its config does not load"):
        check_draft(tmp_path / "missing", model.config)
    assert check_draft(interpreter_dir, model.config).vocab_size == model.config.vocab_size
