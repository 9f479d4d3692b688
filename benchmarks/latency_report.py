"""`mixserve bench latency`'s report: the shard step latencies by MoE split, batch and sequence length
(tp and ep side by side where both were swept, with the tokens each expert gets), and the router's
overhead, as Markdown. The measurements are benchmarks/latency.py's.
"""

from mixserve.benchmarks import report


def latency_markdown(result: dict) -> str:
    """Step latencies (and, with tp and ep both swept, the two side by side) and router overhead as Markdown."""
    lines = [
        f"### Shard step latency: {result['config']['num_shard']} shard(s)",
        "",
        *report.meta_lines(result["meta"]),
        "",
        "| MoE | batch | seq len | prefill ms p50 (shard forward) | prefill tok/s | decode ms p50 / p90 (shard forward"
        " p50) | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["steps"]:
        lines.append(
            f"| {r.get('moe_parallel', 'tp')} | {r['batch']} | {r['seq_len']}"
            f" | {r['prefill_ms']['p50']:.1f} ({r['prefill_forward_ms']['p50']:.1f}) | {r['prefill_tok_s']:.0f}"
            f" | {r['decode_ms']['p50']:.1f} / {r['decode_ms']['p90']:.1f} ({r['decode_forward_ms']['p50']:.1f})"
            f" | {r['decode_tok_s']:.0f} |"
        )
    lines += ep_vs_tp_lines(result["steps"])
    if result["router"]:
        lines += [
            "",
            "| seq len | TTFT ms p50 (HTTP) | prefill step ms p50 | router overhead ms | ITL ms p50 (HTTP, one"
            " stream) | shard decode forward ms p50 | per-token overhead ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["router"]:
            lines.append(
                f"| {r['seq_len']} | {r['ttft_ms']['p50']:.1f} | {r['prefill_step_ms_p50']:.1f}"
                f" | {r['router_overhead_ms_p50']:.1f} | {r['itl_ms']['p50']:.2f} | {r['decode_forward_ms_p50']:.2f}"
                f" | {r['per_token_overhead_ms_p50']:.2f} |"
            )
    return "\n".join(lines)


def ep_vs_tp_lines(rows: list[dict]) -> list[str]:
    """Expert- against tensor-parallel MoE per (batch, seq len): step time ratios (below 1: ep is faster)
    and the tokens each expert gets; empty unless both modes were swept."""
    by_mode = {(r.get("moe_parallel", "tp"), r["batch"], r["seq_len"]): r for r in rows}
    pairs = [(r, by_mode.get(("ep", r["batch"], r["seq_len"]))) for r in rows if r.get("moe_parallel", "tp") == "tp"]
    pairs = [(tp, ep) for tp, ep in pairs if ep is not None]
    if not pairs:
        return []
    lines = [
        "",
        "| batch | seq len | decode tokens/expert | decode ms p50 tp / ep | ep/tp | prefill tokens/expert"
        " | prefill ms p50 tp / ep | ep/tp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tp, ep in pairs:
        decode = (tp["decode_ms"]["p50"], ep["decode_ms"]["p50"])
        prefill = (tp["prefill_ms"]["p50"], ep["prefill_ms"]["p50"])
        lines.append(
            f"| {tp['batch']} | {tp['seq_len']} | {tp['decode_tokens_per_expert']:g}"
            f" | {decode[0]:.1f} / {decode[1]:.1f} | {decode[1] / decode[0]:.2f} | {tp['prefill_tokens_per_expert']:g}"
            f" | {prefill[0]:.1f} / {prefill[1]:.1f} | {prefill[1] / prefill[0]:.2f} |"
        )
    return lines
