"""Constrained decoding with speculation on a shard runner: a constrained sequence proposes the tokens its
grammar forces (llguidance's fast-forward tokens) or looked-up tokens the grammar allows, each verified
row is masked by the grammar's state after the proposals before it, and the tokens equal those of plain
constrained decoding, greedy and seeded, with n-gram lookup or a draft model (which knows no grammar: its
tokens the grammar allows, where the grammar forces nothing); the forced tokens are kept."""

import json

import llguidance
import pytest
import torch

from json_schemas import SMALL_JSON_SCHEMA as SCHEMA
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.draft import load_draft
from mixserve.shards.grammar import GrammarMatchers, load_tokenizer
from mixserve.shards.loader import load_model
from mixserve.shards.runner import ModelRunner
from mixserve.shards.sampling_params import SamplingParams
from mixserve.shards.sequence_step import SequenceStep

BLOCK = 16
PROMPT = [1, 300, 301, 302]


@pytest.fixture(scope="module")
def parts(demo_dir):
    torch.set_num_threads(1)
    vocab = json.loads((demo_dir / "config.json").read_text())["vocab_size"]
    matchers = GrammarMatchers(load_tokenizer(demo_dir, vocab), vocab)
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    return load_model(demo_dir, parallel, group), group, matchers


def new_runner(parts, draft_dir=None) -> ModelRunner:
    """A runner with grammars, and the draft model at `draft_dir` if given."""
    model, group, matchers = parts
    cpu = torch.device("cpu")
    draft = None if draft_dir is None else load_draft(draft_dir, model.config, group, torch.float32, cpu, BLOCK)
    runner = ModelRunner(model, ParallelConfig(), group, cpu, torch.float32, BLOCK, grammars=matchers, draft=draft)
    runner.allocate_cache(32)
    runner.prepare_decode_graphs(4)
    return runner


def decode(runner: ModelRunner, eos: int, seq_id: int, params: SamplingParams, reserve: int):
    """Tokens up to the end of sequence (at most 48), each decode reserving `reserve` proposals the shard makes;
    and the proposals made and kept."""
    table = [seq_id * 4 + b for b in range(4)]
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(64)]
    result = runner.step([SequenceStep(seq_id, PROMPT, 0, slots[: len(PROMPT)], table, True, params)])[0]
    out, made, kept = [result.token_id], 0, 0
    while out[-1] != eos and len(out) < 48:
        start = len(PROMPT) + len(out) - 1
        step = SequenceStep(seq_id, [out[-1]], start, slots[start : start + 1 + reserve], table, True)
        if reserve:
            step.num_proposed, step.draft = reserve, True
        result = runner.step([step])[0]
        out += [result.token_id] + [t.token_id for t in result.next_tokens]
        made += result.num_drafted
        kept += len(result.next_tokens)
    runner.release([seq_id])
    return out, made, kept


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "seeded"])
@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculating_constrained_decoding_gives_the_plain_tokens(parts, demo_dir, monkeypatch, temperature, proposer):
    # The draft (the model itself) proposes where the grammar forces nothing, however unsure.
    monkeypatch.setattr("mixserve.shards.draft.MIN_CONFIDENCE", 0.0)
    tokenizer = parts[2].tokenizer
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    params = SamplingParams(temperature=temperature, seed=4, grammar=grammar)
    plain, _, _ = decode(new_runner(parts), tokenizer.eos_token, 1, params, 0)
    text = tokenizer.decode_str(plain[:-1])
    assert plain[-1] == tokenizer.eos_token and json.loads(text).keys() == SCHEMA["properties"].keys(), text
    runner = new_runner(parts, demo_dir if proposer == "draft" else None)
    speculated, made, kept = decode(runner, tokenizer.eos_token, 2, params, 5)
    assert speculated == plain
    assert made >= kept > 0  # forced keys and punctuation came in verified runs
