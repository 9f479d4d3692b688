"""Where a copier fails, teacher-forced on 32 corpus passages of 112 tokens said twice: its accuracy, on
positions whose token recurs in the passage (ambiguous) and the others, top-5, and each head of layer 1's
attention on the position after the earlier occurrence (the induction target), with the accuracy where
that attention is above 0.5.

python benchmarks/results/copy-demo/diagnose.py CHECKPOINT_DIR
"""

import sys
from pathlib import Path

import torch
from transformers import MixtralForCausalLM

from mixserve.benchmarks.copy_demo import repeated_rows
from mixserve.shards.demo.train import corpus_token_ids

LENGTH, ROWS = 112, 32


def share(mask: torch.Tensor) -> float:
    return mask.float().mean().item()


def main(source: Path) -> None:
    ids = corpus_token_ids(source)  # the corpus in the checkpoint's own tokens
    model = MixtralForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    rows = repeated_rows(ids, LENGTH, 2, ROWS, torch.Generator().manual_seed(7), random_tokens=False)
    with torch.no_grad():
        out = model(input_ids=rows, output_attentions=True)
    logits = out.logits[:, LENGTH:-1]
    target = rows[:, LENGTH + 1 :]
    right = logits.argmax(-1) == target
    # A position is ambiguous where its token occurs more than once in the passage's first saying.
    ambiguous = torch.zeros_like(right)
    for b in range(ROWS):
        first = rows[b, :LENGTH].tolist()
        for i in range(LENGTH - 1):
            ambiguous[b, i] = first.count(rows[b, LENGTH + i].item()) > 1
    top5 = (logits.topk(5, -1).indices == target[..., None]).any(-1)
    print(f"accuracy {share(right):.3f} top-5 {share(top5):.3f} ambiguous positions {share(ambiguous):.3f}")
    print(f"accuracy where ambiguous {share(right[ambiguous]):.3f}, elsewhere {share(right[~ambiguous]):.3f}")
    queries = torch.arange(LENGTH, 2 * LENGTH - 1)
    keys = queries - LENGTH + 1
    for head in range(out.attentions[1].shape[1]):
        attention = out.attentions[1][:, head, queries, keys]
        on = attention > 0.5
        where = f"{share(right[on]):.3f}" if on.any() else "-"
        print(f"layer 1 head {head}: attention on the target {attention.mean().item():.3f}, accuracy there {where}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
