"""`mixserve bench copy-demo`: teach a trained demo checkpoint to copy from its context.

Served models copy: asked to quote, edit or summarise a document, they repeat its spans, and prompt
lookup (`--speculate K`) is built for that. The demo trained on its corpus (`mixserve demo-model
--train-steps 300`) does not: its 300 steps form no induction head, so the copy workload
(workload.py: a passage, a line break, its start again) gives it nothing to repeat. Plain next-token
training on repeated passages did not form one either in the hour or two a CPU gives it (1-2 M tokens;
benchmarks/results/copy-demo).

So the heads are taught directly, as attention supervision does in the literature: rows are a passage
(corpus text, or corpus tokens drawn at random) repeated; next-token loss on the repeats only; and
`--heads K` heads of each kind have their attention pulled to the positions an induction circuit
attends to: in layer 0 to the previous position (and, for every second head, the one before it), which
carries the tokens before each position into its keys; in layer 1 from each repeated token to the
position after its earlier occurrence, whose token comes next. The weights still do the copying;
nothing at serving time knows of it. `--plain-fraction` of the steps train plain next-token prediction
on corpus spans, to keep the language model.

The run reports, every `--log-every` steps, the losses and the copy accuracy: teacher-forced top-1 on
the second half of 16 fixed corpus passages of 48 and of 112 tokens said twice (what prompt lookup
would keep). Transformers' MixtralForCausalLM on the CPU, one seed, eager attention (it returns the
weights).
"""

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mixserve.bench")

# Layers of the previous-token heads and of the induction heads; the taught heads are 0, 2, 4, ... of
# each (one a KV group first, where query heads share keys in pairs).
PREVIOUS_TOKEN_LAYER, INDUCTION_LAYER = 0, 1
# Copy accuracy is measured on passages of these lengths said twice: 112 is the copy workload's distance
# at 128-token prompts (a 111-token passage and a line break).
EVAL_ROWS, EVAL_LENS = 16, (48, 112)
# Files of the source checkpoint that the fine-tuned one keeps as they are.
KEPT_FILES = ("generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(slots=True, frozen=True)
class CopyTraining:
    """Passage lengths drawn uniformly in [min_len, max_len], each said `repeats` times in a row."""

    steps: int
    min_len: int = 8
    max_len: int = 32
    repeats: int = 3
    batch: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 20
    supervision: float = 1.0
    random_fraction: float = 0.5
    plain_fraction: float = 0.0
    heads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.repeats < 2:
            raise ValueError("steps and batch must be >= 1 and repeats >= 2")
        if self.heads < 1 or not 0.0 <= self.plain_fraction < 1.0:
            raise ValueError("heads must be >= 1 and plain_fraction in [0, 1)")
        if not 2 <= self.min_len <= self.max_len:
            raise ValueError(f"need 2 <= min_len <= max_len, got {self.min_len}, {self.max_len}")


def repeated_rows(
    ids: "torch.Tensor", length: int, repeats: int, rows: int, generator: "torch.Generator", random_tokens: bool
) -> "torch.Tensor":
    """[rows, length * repeats]: each row a passage said `repeats` times; the passage is a corpus span,
    or corpus tokens drawn at random (nothing to predict in it but the repeat)."""
    import torch

    passages = []
    for _ in range(rows):
        if random_tokens:
            passage = ids[torch.randint(0, len(ids), (length,), generator=generator)]
        else:
            start = int(torch.randint(0, len(ids) - length, (1,), generator=generator))
            passage = ids[start : start + length]
        passages.append(passage.repeat(repeats))
    return torch.stack(passages)


def attention_targets(
    length: int, total: int, lookback: int = 1
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]":
    """Query and key positions of the taught heads in a row of period `length`, `total` tokens: every
    position from `lookback` on to the one `lookback` before it; every repeated position (whose next
    token is known) to the position after its previous occurrence."""
    import torch

    positions = torch.arange(total)
    previous_q = positions[lookback:]
    induction_q = positions[length : total - 1]
    return previous_q, previous_q - lookback, induction_q, induction_q - length + 1


def copy_accuracy(model, rows: "torch.Tensor") -> float:
    """Teacher-forced top-1 accuracy on the second half of rows that say a passage twice."""
    import torch

    half = rows.shape[1] // 2
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=rows).logits
    model.train(was_training)
    return (logits[:, half:-1].argmax(-1) == rows[:, half + 1 :]).float().mean().item()


def fine_tune(
    source: Path, out: Path, training: CopyTraining, log_every: int = 25, save_every: int = 0
) -> list[dict[str, float]]:
    """Fine-tune the checkpoint in `source` to copy, write it to `out` (the source's tokenizer beside
    it; also every `save_every` steps, so that a long run can be stopped), and return the logged rows
    (step, losses, copy accuracies)."""
    import torch
    from transformers import MixtralForCausalLM

    from mixserve.shards.demo.train import ROUTER_AUX_LOSS_COEF, corpus_token_ids

    ids = corpus_token_ids(source)
    generator = torch.Generator().manual_seed(training.seed)
    eval_rows = [
        repeated_rows(ids, length, 2, EVAL_ROWS, torch.Generator().manual_seed(123), random_tokens=False)
        for length in EVAL_LENS
    ]
    model = MixtralForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
    available = model.config.num_attention_heads
    if 2 * training.heads > available:
        raise ValueError(
            f"--heads {training.heads} needs {2 * training.heads} heads a layer, the model has {available}"
        )
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = ROUTER_AUX_LOSS_COEF
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=0.0)
    logged = [{"step": 0, **_copy_accuracies(model, eval_rows)}]
    log.info("copy-demo %s", _fields(logged[0]))
    started = time.monotonic()
    for step in range(1, training.steps + 1):
        length = int(torch.randint(training.min_len, training.max_len + 1, (1,), generator=generator))
        random_tokens = bool(torch.rand(1, generator=generator) < training.random_fraction)
        # A plain step (corpus spans, next-token loss on every token) keeps the language model.
        plain = training.plain_fraction > 0 and bool(torch.rand(1, generator=generator) < training.plain_fraction)
        if plain:
            rows = repeated_rows(ids, length * training.repeats, 1, training.batch, generator, random_tokens=False)
        else:
            rows = repeated_rows(ids, length, training.repeats, training.batch, generator, random_tokens)  # [B, T]
        labels = rows.clone()
        if not plain:
            labels[:, :length] = -100  # the first saying is unpredictable by design
        for group in optimizer.param_groups:
            group["lr"] = training.learning_rate * min(1.0, step / training.warmup_steps)
        output = model(input_ids=rows, labels=labels, output_attentions=True)
        previous_loss = induction_loss = torch.zeros(())
        if not plain:
            heads = list(range(0, 2 * training.heads, 2))
            previous = output.attentions[PREVIOUS_TOKEN_LAYER]  # [B, H, T, T]
            induction = output.attentions[INDUCTION_LAYER][:, heads]  # [B, heads, T, T]
            # Layer 0's taught heads look 1, 2, 1, 2, ... tokens back: a repeat is then found by its
            # last two tokens, not by one that may recur inside the passage.
            previous_losses = []
            for j, head in enumerate(heads):
                previous_q, previous_k, _, _ = attention_targets(length, rows.shape[1], lookback=1 + j % 2)
                previous_losses.append(-torch.log(previous[:, head, previous_q, previous_k] + 1e-9).mean())
            previous_loss = torch.stack(previous_losses).mean()
            _, _, induction_q, induction_k = attention_targets(length, rows.shape[1])
            induction_loss = -torch.log(induction[:, :, induction_q, induction_k] + 1e-9).mean()
        loss = output.loss + training.supervision * (previous_loss + induction_loss)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == training.steps:
            row = {
                "step": step,
                "lm_loss": output.loss.item(),
                "previous_token_loss": previous_loss.item(),
                "induction_loss": induction_loss.item(),
                **_copy_accuracies(model, eval_rows),
                "seconds": time.monotonic() - started,
            }
            logged.append(row)
            log.info("copy-demo %s", _fields(row))
        if save_every and step % save_every == 0 and step < training.steps:
            _save(model, source, out)
    _save(model, source, out)
    return logged


def _copy_accuracies(model, eval_rows: "list[torch.Tensor]") -> dict[str, float]:
    return {f"copy_accuracy_{rows.shape[1] // 2}": copy_accuracy(model, rows) for rows in eval_rows}


def _fields(row: dict) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _save(model, source: Path, out: Path) -> None:
    """The model as a checkpoint in `out`, with the source's tokenizer and generation config."""
    model.config.output_router_logits = False
    model.save_pretrained(out)
    model.config.output_router_logits = True
    for name in KEPT_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="a trained demo checkpoint (mixserve demo-model --train-steps N)")
    parser.add_argument("out", type=Path, help="where to write the fine-tuned checkpoint")
    parser.add_argument("--steps", type=int, required=True)
    for name, default in (("min-len", 8), ("max-len", 32), ("repeats", 3), ("batch", 16), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--supervision", type=float, default=1.0, help="weight of the heads' attention losses")
    parser.add_argument("--heads", type=int, default=1, help="heads taught of each kind (0, 2, 4, ... of their layer)")
    parser.add_argument("--plain-fraction", type=float, default=0.0, help="steps of plain corpus next-token training")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--save-every", type=int, default=0, help="also write OUT every N steps (0: at the end only)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    training = CopyTraining(
        steps=args.steps,
        min_len=args.min_len,
        max_len=args.max_len,
        repeats=args.repeats,
        batch=args.batch,
        learning_rate=args.learning_rate,
        supervision=args.supervision,
        heads=args.heads,
        plain_fraction=args.plain_fraction,
        seed=args.seed,
    )
    fine_tune(args.source, args.out, training, args.log_every, args.save_every)
    return 0
