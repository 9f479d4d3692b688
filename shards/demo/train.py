"""A short, deterministic training run of the demo Mixtral on the corpus the package ships.

Random weights give flat logits: the top two of thousands of near-equal logits swap under any
perturbation, so accuracy figures (quantized against full precision, say) say little there. A few
hundred steps of next-token training on the shipped corpus give the logits the shape of a language
model's (a clear favourite, word-like output) in a minute or two on a CPU.

The run uses transformers' MixtralForCausalLM (the correctness oracle) on one thread, AdamW with a
short warm-up and linear decay, and the router's load-balancing loss so that every expert keeps
receiving tokens. The same config gives the same weights on the same machine and torch build.
"""

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BATCH_SIZE = 16
SEQUENCE_LENGTH = 64
PEAK_LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
ROUTER_AUX_LOSS_COEF = 0.02

logger = logging.getLogger(__name__)


def corpus_token_ids(model_dir: Path) -> "torch.Tensor":
    """The whole shipped corpus as one stream of token ids of the checkpoint's tokenizer."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from mixserve.shards.demo.tokenizer import CORPUS_PATH

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    text = CORPUS_PATH.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def train_checkpoint(model_dir: Path, steps: int, seed: int) -> "dict[str, torch.Tensor]":
    """Train the checkpoint in `model_dir` for `steps` steps; its tensors under their hub names."""
    import torch
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = corpus_token_ids(model_dir)
        generator = torch.Generator().manual_seed(seed)
        model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = ROUTER_AUX_LOSS_COEF
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LEARNING_RATE, weight_decay=0.0)
        for step in range(steps):
            starts = torch.randint(0, len(ids) - SEQUENCE_LENGTH, (BATCH_SIZE,), generator=generator)
            batch = torch.stack([ids[s : s + SEQUENCE_LENGTH] for s in starts.tolist()])  # [B, L]
            for group in optimizer.param_groups:
                group["lr"] = PEAK_LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS) * (1 - step / steps)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 50 == 0 or step == steps - 1:
                logger.info("demo training step=%d/%d loss=%.3f", step + 1, steps, loss.item())
        model.config.output_router_logits = False
        # transformers holds the experts fused in memory and writes the hub's per-expert names on save.
        with tempfile.TemporaryDirectory(prefix="mixserve-train-") as tmp:
            model.save_pretrained(tmp)
            tensors: dict[str, torch.Tensor] = {}
            for path in sorted(Path(tmp).glob("*.safetensors")):
                tensors.update(load_file(path))
        return {name: tensor.contiguous() for name, tensor in tensors.items()}
    finally:
        torch.set_num_threads(threads)
