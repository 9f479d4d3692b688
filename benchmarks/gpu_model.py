"""`bench gpu`'s whole-model figure: one rank's decode step as layers x one layer + its LM head slice, and
the issue's targets on it (batch 1 at >= 70 % of the roofline of one rank's bytes and >= 3x today's
torch path; batch 64 at context 1k at >= 50 %).

Legend: B decoding sequences, H hidden size, V vocabulary, n ranks.
"""

import math

import torch
import torch.nn.functional as F

from mixserve.benchmarks.gpu_kernels import Suite, time_ms


def lm_head_case(suite: Suite, batch: int, device: torch.device) -> dict:
    """This rank's slice of the LM head at batch B: one matmul against [V/n, H]."""
    shapes = suite.shapes
    weight = (torch.randn(shapes.vocab, shapes.hidden, device=device) * 0.02).to(suite.dtype)
    hidden = torch.randn(batch, shapes.hidden, device=device).to(suite.dtype)
    ms, iterations = time_ms(lambda: F.linear(hidden, weight), device, suite.iteration_budget_s, suite.warmup)
    nbytes = weight.numel() * suite.dtype.itemsize
    return {"batch": batch, "ms": ms, "iterations": iterations, "bytes": nbytes}


def whole_model(suite: Suite, cases: list[dict], lm_heads: list[dict], bandwidth_gb_s: float) -> list[dict]:
    """Per batch with an LM head timing: per-layer decode time x layers + the LM head, per variant,
    and its % of the roofline of the rank's bytes, at the whole-model context."""
    rows = []
    for head in lm_heads:
        case = next(
            (
                c
                for c in cases
                if "variants" in c and c.get("batch") == head["batch"] and c.get("context") == suite.whole_model_context
            ),
            None,
        )
        if case is None:
            continue
        nbytes = suite.shapes.layers * case["bytes"] + head["bytes"]
        row = {"batch": head["batch"], "context": suite.whole_model_context, "bytes": nbytes, "variants": {}}
        for name, record in case["variants"].items():
            if record["ms"] is None:
                row["variants"][name] = {"ms": None, "tok_s": None, "roofline_pct": None}
                continue
            ms = suite.shapes.layers * record["ms"] + head["ms"]
            row["variants"][name] = {
                "ms": ms,
                "tok_s": head["batch"] * 1e3 / ms,
                "roofline_pct": 100 * nbytes / ms / 1e6 / bandwidth_gb_s,
            }
        rows.append(row)
    return rows


def targets(rows: list[dict], large_batch: int, dry_run: bool) -> list[dict]:
    """The issue's GPU targets against the whole-model figures (best Triton variant): batch 1 at >= 70 %
    of the roofline and >= 3x the torch path, the large batch (64) at >= 50 %."""

    def best(row: dict) -> dict | None:
        timed = [row["variants"][n] for n in ("triton_graph", "triton") if row["variants"].get(n, {}).get("ms")]
        return min(timed, key=lambda r: r["ms"]) if timed else None

    by_batch = {row["batch"]: row for row in rows}
    checks = []
    one, large = by_batch.get(1), by_batch.get(large_batch)
    if one and best(one):
        checks.append(_check("batch 1 decode, % of roofline", best(one)["roofline_pct"], 70.0, dry_run))
        torch_ms = one["variants"]["torch"]["ms"]
        speedup = torch_ms / best(one)["ms"] if torch_ms else None
        checks.append(_check("batch 1 decode, speed-up over torch", speedup, 3.0, dry_run))
    if large and best(large):
        checks.append(_check(f"batch {large_batch} decode, % of roofline", best(large)["roofline_pct"], 50.0, dry_run))
    return checks


def _check(name: str, value: float | None, target: float, dry_run: bool) -> dict:
    if dry_run:
        verdict = "not judged (dry run on CPU)"
    elif value is None or math.isnan(value):
        verdict = "no figure"
    else:
        verdict = "met" if value >= target else "missed"
    return {"target": name, "value": value, "needed": target, "verdict": verdict}
