"""`mixserve bench gpu-spec`: speculative decoding with a draft model on one GPU, on trained weights.

Random weights accept no proposal, so both models are trained on the device first, on the demo's
corpus with its tokenizer (shards.demo.train on the GPU, a few minutes at most):
- the target: 4 layers of one Mixtral-8x7B rank of four's MoE (hidden 2048, 8 experts of 7168, top 2:
  the fused MoE reads 176 MB a layer for one token, as a rank of 8x7B does), 16 query / 4 KV heads of
  128, 1.5 B parameters;
- the draft: 2 layers, hidden 512, 4 experts of 1024 (a 5 M-parameter model of the same vocabulary).
One server at TP 1 in bf16 a configuration (the arms below; each restarted, the Triton kernels and
decode CUDA graphs as served), one client at concurrency 1 on the corpus workload (128-token corpus
passages, 128 greedy tokens, EOS ignored) or, for the `-json` arms, the same passages with each output
under the benchmark's JSON schema (ended by EOS; speculation proposes the tokens the schema forces, by
default, with `--speculate K`, and not with `--no-speculate-constrained`, the JSON arms' plain one):
output tok/s, decode ms a token from the server's counts, and the speculation counters of /metrics
(proposed, accepted). Arms run in order while the budget lasts: plain and n-gram first, then JSON,
then the draft's.

On an MoE a verification of k + 1 tokens reads the experts all of them route to (the fused MoE's floor
at one rank's shape: 41.5 us for 1 token, 145 us for 4 on an H200), so a draft pays only where its
acceptance outweighs that: the run measures it rather than assumes it, with speculation's cost back-off
(the default: a request pauses where its proposals gain it fewer tokens a step than a step costs) and,
for the draft at k = 3, without it.

`--dry-run` trains tiny models for a few steps on the CPU and serves them there (two 8-token
requests an arm), so CI runs the same code. Results: spec.json, spec.md and each arm's server log in
--out (default benchmarks/results/gpu-spec-<UTC time>/).
"""

import argparse
import datetime
import logging
import sys
import tempfile
import time
from pathlib import Path

from mixserve.benchmarks import report

log = logging.getLogger("mixserve.bench")

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = dict(
    hidden_size=2048,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=7168,
    num_local_experts=8,
    max_position_embeddings=2048,
)
DRAFT = dict(
    hidden_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1024,
    num_local_experts=4,
    max_position_embeddings=2048,
)
# (steps, peak learning rate, seconds at most): the target's rate is lower than the CPU demo's for its size.
TARGET_TRAINING = (600, 1e-3, 100.0)
DRAFT_TRAINING = (1500, 3e-3, 35.0)
# The dry run's, short enough that the budget usually cuts the steps, as it may on a GPU.
DRY_RUN_TRAINING = (12, 3e-3, 1.0)
# Each arm: its name, the launch flags it adds ({draft}: the draft's directory) and its workload
# (benchmarks/workload.py: corpus passages; `json`, the same with each output under a JSON schema, whose
# forced tokens a speculating server proposes).
ARMS = (
    ("plain", (), "corpus"),
    ("ngram-k3", ("--speculate", "3"), "corpus"),
    # Constrained requests speculate by default (their grammar's forced tokens): plain-json turns it off,
    # default-json is what a server without flags does.
    ("plain-json", ("--no-speculate-constrained",), "json"),
    ("default-json", (), "json"),
    ("ngram-k5-json", ("--speculate", "5"), "json"),
    ("draft-k3", ("--speculate", "3", "--speculative-model", "{draft}"), "corpus"),
    # The draft lost to plain decoding (0.90x) before the cost back-off: both, to see what it catches.
    (
        "draft-k3-no-back-off",
        ("--speculate", "3", "--speculative-model", "{draft}", "--no-speculate-cost-back-off"),
        "corpus",
    ),
    ("draft-k5", ("--speculate", "5", "--speculative-model", "{draft}"), "corpus"),
)
# An arm starts only with this much of --time-budget left (a server's start-up, capture included, and
# its requests took 20-36 s on an H200).
ARM_RESERVE_S = 40.0


def train_models(scratch: Path, device: str, dry_run: bool) -> tuple[Path, Path, dict]:
    """The target's and the draft's checkpoints trained on `device` (tiny ones in a dry run), and what
    the training took."""
    from mixserve.shards.demo.checkpoint import TINY, DemoConfig, write_demo_checkpoint
    from mixserve.shards.demo.train import Training

    plans = {
        "target": (TARGET, TARGET_TRAINING) if not dry_run else (TINY, DRY_RUN_TRAINING),
        "draft": (DRAFT, DRAFT_TRAINING) if not dry_run else (dict(TINY, num_hidden_layers=1), DRY_RUN_TRAINING),
    }
    dirs, info = {}, {}
    for name, (shape, (steps, rate, budget_s)) in plans.items():
        started = time.monotonic()
        config = DemoConfig(**shape, train_steps=steps)
        training = Training(device=device, peak_learning_rate=rate, time_budget_s=budget_s)
        dirs[name] = write_demo_checkpoint(scratch / name, config, training)
        info[name] = {"shape": shape, "train_steps": steps, "peak_learning_rate": rate, "train_budget_s": budget_s}
        info[name]["seconds"] = round(time.monotonic() - started, 1)
        log.info("event=trained model=%s seconds=%.0f", name, info[name]["seconds"])
    return dirs["target"], dirs["draft"], info


def run_arms(out: Path, target: Path, draft: Path, args: argparse.Namespace, deadline: float, result: dict) -> None:
    """Each arm's server under the one-stream corpus load, while the budget lasts, into result["arms"]
    (the results written after each: an outer timeout keeps the arms done)."""
    from mixserve.benchmarks import gpu_server

    device = gpu_server.DRY_RUN_CPU if args.dry_run else ("--device", "cuda", "--dtype", "bfloat16")
    arms = result["arms"] = []
    for name, flags, workload in ARMS:
        remaining = deadline - time.monotonic()
        if remaining < (0 if args.dry_run else ARM_RESERVE_S):
            arms.append({"arm": name, "status": "skipped", "reason": f"{remaining:.0f} s of --time-budget left"})
            continue
        launch = ["--model", str(target), *device, *(flag.format(draft=draft) for flag in flags)]
        arm = gpu_server.run_server(
            out,
            launch,
            max(remaining, 60.0),
            [1],
            args.input_len,
            args.output_len,
            workload=workload,
            num_prompts=args.num_prompts,
            name=name,
        )
        arms.append({"arm": name, "workload": workload, **arm})
        level = (arm.get("levels") or [{}])[0]
        log.info(
            "event=arm arm=%s status=%s tok_s=%s decode_ms=%s speculation=%s",
            *(name, arm["status"], level.get("output_throughput"), level.get("decode_ms"), arm.get("speculation")),
        )
        write_results(result, out)


def write_results(result: dict, out: Path) -> str:
    """spec.json and spec.md in out; returns the Markdown."""
    report.write_json(result, out / "spec.json")
    table = spec_markdown(result)
    (out / "spec.md").write_text(table + "\n")
    return table


def spec_markdown(result: dict) -> str:
    lines = ["# mixserve bench gpu-spec", "", *report.meta_lines(result["meta"])]
    lines.append(f"- device: {result['device']}; dry run: {result['dry_run']}")
    for name, info in result["models"].items():
        lines.append(
            f"- {name}: {info['shape']}, trained {info['seconds']} s (at most {info['train_steps']} steps, "
            f"peak rate {info['peak_learning_rate']}, budget {info['train_budget_s']} s; the log has the loss)"
        )
    lines += [
        "",
        "One stream, corpus prompts; decode ms a token from the server's counts: (E2E p50 - TTFT p50) / "
        "(tokens - 1). Speculation counters are the whole run's, warm-up included.",
        "",
        "| arm | workload | status | output tok/s | vs plain | TTFT p50 ms | decode ms a token | accepted / proposed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # Each arm against the plain arm of its workload.
    plains = {
        a.get("workload", "corpus"): a["levels"][0].get("output_throughput")
        for a in result["arms"]
        if a["arm"].startswith("plain") and a.get("levels")
    }
    for arm in result["arms"]:
        level = (arm.get("levels") or [{}])[0]
        tok_s = level.get("output_throughput")
        base = plains.get(arm.get("workload", "corpus"))
        ratio = f"{tok_s / base:.2f}x" if tok_s and base else "–"
        spec = arm.get("speculation")
        counted = f"{spec['accepted']:.0f} / {spec['proposed']:.0f} ({spec['acceptance']:.1%})" if spec else "–"
        status = arm["status"] if arm["status"] != "skipped" else f"skipped: {arm['reason']}"
        if arm.get("error"):
            status += f": {arm['error']}"
        ttft = (level.get("ttft_ms") or {}).get("p50")
        lines.append(
            f"| {arm['arm']} | {arm.get('workload', 'corpus')} | {status} | {report._fmt(tok_s)} | {ratio} | "
            f"{report._fmt(ttft)} | "
            f"{report._fmt(level.get('decode_ms'), 2)} | {counted} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/gpu-spec-<UTC time>)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models trained and served on the CPU (CI)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds for everything; arms past it skipped")
    parser.add_argument("--num-prompts", type=int, default=12, help="measured requests an arm")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (corpus passages)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens a request")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    import torch

    from mixserve.benchmarks import gpu_server

    if args.dry_run:
        args.input_len, args.output_len, args.num_prompts = 8, 8, 2
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run `mixserve bench gpu-spec --dry-run` for the CPU check")
    missing = gpu_server.missing_modules()
    if missing:
        raise SystemExit(f"the server's imports are not installed: {', '.join(missing)}")
    deadline = time.monotonic() + args.time_budget
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"gpu-spec-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    result = {
        "meta": report.run_meta(),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)",
    }
    with tempfile.TemporaryDirectory(prefix="mixserve-bench-spec-") as scratch:
        target, draft, result["models"] = train_models(Path(scratch), device, args.dry_run)
        if device == "cuda":
            torch.cuda.empty_cache()  # the servers' shards share this GPU
        result["arms"] = []
        write_results(result, out)
        run_arms(out, target, draft, args, deadline, result)
    sys.stdout.write(write_results(result, out) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_spec", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
