"""The written copier: its checkpoint loads in transformers and continues passages found in its prompt."""

import argparse

import pytest
import torch
from transformers import MixtralForCausalLM

from mixserve.benchmarks import copy_circuit
from mixserve.benchmarks.copy_circuit import circuit_state
from mixserve.shards.demo.checkpoint import TINY, DemoConfig


@pytest.fixture(scope="module")
def circuit(copier_dir):
    return MixtralForCausalLM.from_pretrained(copier_dir, dtype=torch.float32).eval()


def passages_said_twice(length: int, rows: int, seed: int) -> torch.Tensor:
    """[rows, 2 * length]: distinct random tokens (no repeat inside a passage), said twice."""
    generator = torch.Generator().manual_seed(seed)
    passages = torch.stack([torch.randperm(8000, generator=generator)[:length] + 100 for _ in range(rows)])
    return passages.repeat(1, 2)


def test_the_circuit_copies_a_passage_it_has_seen(circuit):
    rows = passages_said_twice(112, 4, seed=0)
    with torch.no_grad():
        logits = circuit(input_ids=rows).logits
    # Past the second saying's first three tokens (the match needs three), every next token is the copy.
    predicted, wanted = logits[:, 115:-1].argmax(-1), rows[:, 116:]
    assert torch.equal(predicted, wanted)
    # Its first saying holds nothing to copy: the circuit guesses, and is mostly wrong.
    assert (logits[:, 3:111].argmax(-1) == rows[:, 4:112]).float().mean() < 0.2


def test_a_position_is_found_by_its_last_three_tokens(circuit):
    # A passage whose token x recurs: after (a, b, x) comes y, after (c, d, x) comes z. One token of
    # context would not say which; three do, both ways round.
    a, b, c, d, x, y, z = 500, 501, 502, 503, 504, 505, 506
    filler = list(range(1000, 1040))
    passage = [a, b, x, y, *filler[:20], c, d, x, z, *filler[20:]]
    for query, answer in (([a, b, x], y), ([c, d, x], z)):
        ids = torch.tensor([[*passage, 7, 8, *query]])
        with torch.no_grad():
            assert circuit(input_ids=ids).logits[0, -1].argmax().item() == answer


def test_greedy_generation_continues_the_passage(circuit):
    passage = passages_said_twice(60, 1, seed=1)[0, :60].tolist()
    prompt = torch.tensor([[1, *passage, 7, *passage[:8]]])
    with torch.no_grad():
        out = circuit.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert out[0, prompt.shape[1] :].tolist() == passage[8:48]


def test_the_circuit_needs_the_demo_s_widths():
    with pytest.raises(ValueError, match="hidden > 250"):
        circuit_state(DemoConfig(**TINY))


def test_the_command_writes_a_checkpoint(tmp_path):
    parser = argparse.ArgumentParser()
    copy_circuit.add_arguments(parser)
    assert copy_circuit.run(parser.parse_args([str(tmp_path / "c"), "--seed", "3"])) == 0
    model = MixtralForCausalLM.from_pretrained(tmp_path / "c")
    assert model.config.hidden_size == 256 and (tmp_path / "c" / "tokenizer.json").exists()
