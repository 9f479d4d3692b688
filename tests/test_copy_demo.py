"""The copy fine-tune: its rows and attention targets, and a short run on a tiny checkpoint."""

import pytest
import torch
from transformers import MixtralForCausalLM

from mixserve.benchmarks.copy_demo import CopyTraining, attention_targets, fine_tune, repeated_rows


def test_attention_targets_point_at_the_previous_token_and_at_what_comes_next():
    ids = torch.arange(1000, 2000)
    rows = repeated_rows(ids, 7, 3, 4, torch.Generator().manual_seed(0), random_tokens=True)  # [4, 21]
    assert rows.shape == (4, 21) and torch.equal(rows[:, :7], rows[:, 7:14])
    previous_q, previous_k, induction_q, induction_k = attention_targets(7, 21)
    assert torch.equal(previous_k, previous_q - 1) and previous_q.tolist() == list(range(1, 21))
    two_back_q, two_back_k, _, _ = attention_targets(7, 21, lookback=2)
    assert two_back_q.tolist() == list(range(2, 21)) and torch.equal(two_back_k, two_back_q - 2)
    # Each repeated token's key position holds the token that follows the query: the copy's answer.
    assert induction_q.tolist() == list(range(7, 20))
    assert torch.equal(rows[:, induction_k], rows[:, induction_q + 1])
    # Corpus rows are spans of the stream.
    spans = repeated_rows(ids, 5, 2, 3, torch.Generator().manual_seed(1), random_tokens=False)
    assert all(torch.equal(row[1:5] - row[:4], torch.ones(4, dtype=row.dtype)) for row in spans)


def test_fine_tune_logs_its_losses_and_writes_a_loadable_checkpoint(interpreter_dir, tmp_path):
    out = tmp_path / "copying"
    logged = fine_tune(interpreter_dir, out, CopyTraining(steps=2, batch=2, min_len=4, max_len=6), log_every=1)
    assert [row["step"] for row in logged] == [0, 1, 2]
    for row in logged[1:]:
        # Attention losses are -log of a probability: positive and finite.
        assert all(0 < row[key] < 100 for key in ("lm_loss", "previous_token_loss", "induction_loss"))
    assert all(0 <= row["copy_accuracy_48"] <= 1 for row in logged)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    model = MixtralForCausalLM.from_pretrained(out)
    assert not model.config.output_router_logits
    assert model.config.hidden_size == 64
    # Two heads of each kind, half the steps plain next-token training (no attention loss there).
    mixed = fine_tune(
        interpreter_dir,
        out,
        CopyTraining(steps=4, batch=2, min_len=4, max_len=6, heads=2, plain_fraction=0.5),
        log_every=1,
        save_every=2,
    )
    kinds = {row["previous_token_loss"] > 0 and row["induction_loss"] > 0 for row in mixed[1:]}
    assert kinds == {True, False} and all(row["lm_loss"] > 0 for row in mixed[1:])
    with pytest.raises(ValueError, match="heads a layer"):
        fine_tune(interpreter_dir, out, CopyTraining(steps=1, batch=2, min_len=4, max_len=6, heads=3))
