"""A short, deterministic training run of the demo Mixtral on the corpus the package ships.

Random weights give flat logits: the top two of thousands of near-equal logits swap under any
perturbation, so accuracy figures (quantized against full precision, say) say little there. A few
hundred steps of next-token training on the shipped corpus give the logits the shape of a language
model's (a clear favourite, word-like output) in a minute or two on a CPU.

The run uses transformers' MixtralForCausalLM (the correctness oracle) on one thread, AdamW with a
short warm-up and linear decay, and the router's load-balancing loss so that every expert keeps
receiving tokens. The same config gives the same weights on the same machine and torch build.

`Training` moves the run elsewhere: a GPU trains models far larger than the CPU demo (the GPU
benchmark of speculative decoding trains its target and draft there), with a peak learning rate for
their size and a time budget that shortens the run, the schedule with it, once the first steps are timed.
"""

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BATCH_SIZE = 16
SEQUENCE_LENGTH = 64
PEAK_LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
ROUTER_AUX_LOSS_COEF = 0.02
# Steps timed, after the first, before a time budget sets how many the run takes (within the warm-up,
# whose learning rates do not depend on the number of steps).
TIMED_STEPS = 5

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Training:
    """Where and how fast a checkpoint trains: the device, the peak learning rate, and at most how many
    seconds the steps may take (None: every step asked for)."""

    device: str = "cpu"
    peak_learning_rate: float = PEAK_LEARNING_RATE
    time_budget_s: float | None = None


def corpus_token_ids(model_dir: Path) -> "torch.Tensor":
    """The whole shipped corpus as one stream of token ids of the checkpoint's tokenizer."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from mixserve.shards.demo.tokenizer import CORPUS_PATH

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    text = CORPUS_PATH.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def train_checkpoint(
    model_dir: Path, steps: int, seed: int, training: Training | None = None
) -> "dict[str, torch.Tensor]":
    """Train the checkpoint in `model_dir` for `steps` steps (fewer where `training`'s time budget
    says so); its tensors under their hub names, on the CPU."""
    import torch
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    training = training or Training()
    device = torch.device(training.device)
    threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(1)
    # On a GPU the fp32 matmuls may round their inputs to TF32, as GPU training does.
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
    try:
        ids = corpus_token_ids(model_dir)
        generator = torch.Generator().manual_seed(seed)
        model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = ROUTER_AUX_LOSS_COEF
        model.train()
        peak = training.peak_learning_rate
        optimizer = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0)
        started, timed_from = time.monotonic(), 0.0
        step = 0
        while step < steps:
            if training.time_budget_s is not None and step in (1, 1 + TIMED_STEPS):
                # Step 0 pays for start-up (a GPU's kernel loading); the next TIMED_STEPS set the pace.
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.monotonic()
                if step == 1:
                    timed_from = now
                else:
                    pace_s = (now - timed_from) / TIMED_STEPS
                    steps = _steps_within(steps, step, training.time_budget_s - (now - started), pace_s)
            starts = torch.randint(0, len(ids) - SEQUENCE_LENGTH, (BATCH_SIZE,), generator=generator)
            batch = torch.stack([ids[s : s + SEQUENCE_LENGTH] for s in starts.tolist()]).to(device)  # [B, L]
            for group in optimizer.param_groups:
                group["lr"] = peak * min(1.0, (step + 1) / WARMUP_STEPS) * (1 - step / steps)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 50 == 0 or step == steps - 1:
                logger.info("demo training step=%d/%d loss=%.3f", step + 1, steps, loss.item())
            step += 1
        model.config.output_router_logits = False
        model.to("cpu")
        # transformers holds the experts fused in memory and writes the hub's per-expert names on save.
        with tempfile.TemporaryDirectory(prefix="mixserve-train-") as tmp:
            model.save_pretrained(tmp)
            tensors: dict[str, torch.Tensor] = {}
            for path in sorted(Path(tmp).glob("*.safetensors")):
                tensors.update(load_file(path))
        return {name: tensor.contiguous() for name, tensor in tensors.items()}
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _steps_within(steps: int, done: int, left_s: float, pace_s: float) -> int:
    """How many steps in all, `done` of them taken, fit the left_s seconds at pace_s a step (at least
    one more, at most `steps`)."""
    fitting = done + int(max(left_s, 0.0) / pace_s) if pace_s > 0 else steps
    if fitting < steps:
        logger.info("demo training shortened steps=%d of=%d pace_s=%.3f", max(fitting, done + 1), steps, pace_s)
    return max(done + 1, min(steps, fitting))
