"""`python -m mixserve.benchmarks.gpu_sampling OUT`: what a step's sampling (shards/sampling.py) costs on
a GPU, and whether it waits for the step's forward; `gpu_run.sh` runs it after the kernel profile.

Each case queues a stand-in forward (a chain of bf16 matmuls of about a millisecond, ending in the
step's fp32 logits), then `sample` over them, then reads the tokens back as the runner does, and
takes the wall time of the whole (median of rounds). It runs twice: with the host values sent
through pinned memory (shards/host_to_device.py, as served) and with plain pageable copies
(`torch.tensor(values, device=...)`), whose host waits for the forward before it can queue the
sampling kernels. A third run with `torch.cuda.set_sync_debug_mode("error")` names the first op of
`sample` that synchronises, if any.

Cases: greedy; temperature 0.8 with top_p 0.95 (seeded); the same with repetition and frequency
penalties; batch 1, 8 and 32 rows of Mixtral's 32,000-token vocabulary. Writes sampling.md and prints
it. `--dry-run` runs the same code on the CPU at small shapes: a check of the script, not a measurement.
"""

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

VOCAB = 32000
BATCHES = (1, 8, 32)
CASES = {
    "greedy": {"temperature": 0.0},
    "top-p 0.95": {"temperature": 0.8, "top_p": 0.95, "seed": 7},
    "top-p + penalties": {
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 7,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0.5,
    },
}


@contextmanager
def pageable_copies():
    """sample's host values as plain `torch.tensor(values, device=...)` copies, as before 2026-12-05."""
    import torch

    from mixserve.shards import draw, logits_processors, sampling

    def pageable(values, device, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    def pageable_tensor(tensor, device):
        return tensor.to(device)

    saved = sampling.to_device, draw.to_device, logits_processors.to_device, logits_processors.tensor_to_device
    sampling.to_device = draw.to_device = logits_processors.to_device = pageable
    logits_processors.tensor_to_device = pageable_tensor
    try:
        yield
    finally:
        sampling.to_device, draw.to_device, logits_processors.to_device, logits_processors.tensor_to_device = saved


def _inputs(batch: int, vocab: int, settings: dict, device):
    import torch

    from mixserve.shards.sampling_params import SamplingParams
    from mixserve.shards.token_history import TokenHistory

    params = [SamplingParams(**settings) for _ in range(batch)]
    histories = []
    for row in range(batch):
        history = TokenHistory()
        history.add_prompt(range(row, row + 128))
        history.add_output(range(row + 200, row + 264))
        histories.append(history)
    keys = [128 + row for row in range(batch)]
    hidden = torch.randn(batch, 1024, device=device, dtype=torch.bfloat16)
    head = torch.randn(1024, vocab, device=device, dtype=torch.bfloat16) / 8
    return params, histories, keys, hidden, head


def forward(square, chain: int):
    """The forward's stand-in: `chain` matmuls queued on the device, which the host does not wait for."""
    x = square
    for _ in range(chain):
        x = x @ square
    return x


def step_ms(batch: int, vocab: int, settings: dict, device, chain: int, rounds: int, width: int) -> float:
    """Median wall ms of forward stand-in + sample + reading the tokens back."""
    import torch

    from mixserve.shards.sampling import sample

    params, histories, keys, hidden, head = _inputs(batch, vocab, settings, device)
    square = torch.randn(width, width, device=device, dtype=torch.bfloat16) / 64

    def step() -> list[int]:
        forward(square, chain)  # queued ahead of the logits on the same stream
        logits = (hidden @ head).float()  # [B, V]
        return sample(logits, params, histories, keys).token_ids.tolist()

    for _ in range(3):
        step()
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        step()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def first_sync(batch: int, vocab: int, settings: dict, device) -> str:
    """'none', or the error of the first synchronising op of `sample` (CUDA only)."""
    import torch

    from mixserve.shards.sampling import sample

    if device.type != "cuda":
        return "not checked (CPU)"
    params, histories, keys, hidden, head = _inputs(batch, vocab, settings, device)
    logits = (hidden @ head).float()
    sample(logits, params, histories, keys)  # warm: pinned blocks, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(logits, params, histories, keys)
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="the CPU at small shapes: a check of the script")
    args = parser.parse_args(argv)
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    vocab, chain, rounds, width = (512, 1, 3, 64) if args.dry_run else (VOCAB, 40, 30, 2048)
    forward_ms = float("nan")
    if not args.dry_run:
        square = torch.randn(width, width, device=device, dtype=torch.bfloat16) / 64
        for _ in range(2):
            torch.cuda.synchronize()
            began = time.perf_counter()
            forward(square, chain)
            torch.cuda.synchronize()
            forward_ms = (time.perf_counter() - began) * 1e3
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    lines = [
        f"# Sampling on {name}, torch {torch.__version__}",
        "",
        f"A stand-in forward of {chain} bf16 matmuls of {width}x{width} ({forward_ms:.2f} ms alone), then",
        f"`sample` over [B, {vocab}] fp32 logits, then the tokens read back; median wall ms of {rounds} rounds.",
        "Pinned: host values through pinned memory, as served; pageable: plain copies.",
        "",
        "| case | B | pinned ms | pageable ms | first syncing op in sample |",
        "|---|---|---|---|---|",
    ]
    for case, settings in CASES.items():
        for batch in BATCHES:
            pinned = step_ms(batch, vocab, settings, device, chain, rounds, width)
            with pageable_copies():
                pageable = step_ms(batch, vocab, settings, device, chain, rounds, width)
            sync = first_sync(batch, vocab, settings, device)
            lines.append(f"| {case} | {batch} | {pinned:.3f} | {pageable:.3f} | {sync} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampling.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
