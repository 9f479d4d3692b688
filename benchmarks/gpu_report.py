"""`bench gpu`'s gpu.md tables and gpu.png plot from the result that gpu.json holds."""

from pathlib import Path

from mixserve.benchmarks import report


def _ms(record: dict | None) -> str:
    if not record:
        return "—"
    if record.get("oom"):
        return "OOM"
    if record.get("error"):
        return "error"
    return report._fmt(record.get("ms"), 3)


def _pct(record: dict | None) -> str:
    value = (record or {}).get("roofline_pct")
    return "—" if value is None else f"{value:.0f} %"


def _gib(record: dict | None) -> str:
    value = (record or {}).get("peak_gib")
    return "—" if value is None else f"{value:.2f}"


def _error(record: dict | None) -> str:
    if not record or record.get("rel_error") is None:
        return "—"
    return f"{record['rel_error']:.1e} ({'ok' if record['agrees'] else 'DIFFERS'})"


def _speedup(case: dict, name: str) -> str:
    base, fast = case["variants"]["torch"].get("ms"), case["variants"][name].get("ms")
    return "—" if not base or not fast else f"{base / fast:.1f}x"


def gpu_markdown(result: dict) -> str:
    """The tables: machine and ceilings, decode and prefill cases, whole model, targets, server."""
    ceilings, gpu = result["ceilings"], result["gpu"]
    lines = [f"# mixserve bench gpu ({'dry run, CPU, tiny shapes' if result['dry_run'] else 'GPU'})", ""]
    lines += report.meta_lines(result["meta"])
    lines += [
        f"- device: {gpu['name']}; torch {gpu['torch']}, triton {gpu['triton']}; dtype {result['dtype']}",
        f"- shapes (one rank): {result['shapes']}",
        f"- copy bandwidth (read + write): {ceilings['bandwidth']['gb_s']:.0f} GB/s; "
        f"matmul: {ceilings['matmul']['tflop_s']:.1f} TFLOP/s ({ceilings['matmul']['dtype']})",
        f"- CUDA graphs: {'captured' if result['graphs'] else 'not on this device: the graph column is eager'}",
        "",
        "## Decode, one layer of one rank",
        "",
        "| case | torch ms | triton ms | graph ms | graph vs torch | roofline torch / triton / graph "
        "| peak GiB above held, torch / triton | triton error vs torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        if case["kind"] != "decode":
            continue
        if "skipped" in case:
            lines.append(f"| {case['name']} | skipped: {case['skipped']} | | | | | | |")
            continue
        v = case["variants"]
        lines.append(
            f"| {case['name']} | {_ms(v['torch'])} | {_ms(v['triton'])} | {_ms(v['triton_graph'])} "
            f"| {_speedup(case, 'triton_graph')} "
            f"| {_pct(v['torch'])} / {_pct(v['triton'])} / {_pct(v['triton_graph'])} "
            f"| {_gib(v['torch'])} / {_gib(v['triton'])} | {_error(v['triton'])} |"
        )
    lines += ["", "## Prefill, one layer of one rank", ""]
    lines += ["| case | torch ms | triton ms | triton vs torch | TFLOP/s torch / triton | triton error vs torch |"]
    lines += ["|---|---|---|---|---|---|"]
    for case in result["cases"]:
        if case["kind"] != "prefill":
            continue
        if "skipped" in case:
            lines.append(f"| {case['name']} | skipped: {case['skipped']} | | | | |")
            continue
        v = case["variants"]
        rates = " / ".join(
            "—" if v[n].get("tflop_s") is None else f"{v[n]['tflop_s']:.1f}" for n in ("torch", "triton")
        )
        lines.append(
            f"| {case['name']} | {_ms(v['torch'])} | {_ms(v['triton'])} | {_speedup(case, 'triton')} | {rates} "
            f"| {_error(v['triton'])} |"
        )
    lines += ["", "## Whole model on one rank: per-layer decode x layers + LM head", ""]
    lines += ["(no all-reduce, embedding or sampling: the kernels' share of a decode step)", ""]
    lines += ["| batch | context | torch ms (tok/s) | triton ms (tok/s) | graph ms (tok/s) | roofline graph |"]
    lines += ["|---|---|---|---|---|---|"]
    for row in result["whole_model"]:
        cells = []
        for name in ("torch", "triton", "triton_graph"):
            record = row["variants"].get(name, {})
            ms = record.get("ms")
            cells.append("—" if ms is None else f"{ms:.2f} ({record['tok_s']:.0f})")
        graph = _pct(row["variants"]["triton_graph"])
        lines.append(f"| {row['batch']} | {row['context']} | {' | '.join(cells)} | {graph} |")
    failures = [
        f"- {case['name']}, {name}: {record['error']}"
        for case in result["cases"]
        for name, record in case.get("variants", {}).items()
        if record.get("error")
    ]
    if failures:
        lines += ["", "## Variants that failed", "", *failures]
    lines += ["", "## The issue's targets", "", "| target | value | needed | verdict |", "|---|---|---|---|"]
    for check in result["targets"]:
        value = "—" if check["value"] is None else f"{check['value']:.1f}"
        lines.append(f"| {check['target']} | {value} | {check['needed']:.0f} | {check['verdict']} |")
    lines += ["", "## The server at TP 1 under `bench serve`", ""]
    lines += server_lines(result["server"])
    if "agreement" in result:
        lines += ["", "## Served tokens against transformers (fp32) on this device", ""]
        lines += agreement_lines(result["agreement"])
    return "\n".join(lines)


def agreement_lines(agreement: dict) -> list[str]:
    """Part (c): one row per served dtype, teacher-forced top-1 agreement with transformers' fp32."""
    if agreement["status"] != "ran":
        return [f"{agreement['status'].capitalize()}: {agreement['reason']}."]
    lines = [
        f"Model {agreement['model']}, random weights; {agreement['prompts']} prompts sent at once, "
        f"{agreement['new_tokens']} greedy tokens each.",
        "",
        "| dtype | ready s | top-1 agree | greedy prefix tokens | largest miss gap (tie gap) "
        "| transformers' misses in the dtype | verdict | ops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in agreement["runs"]:
        if "score" not in run:
            why = run.get("skipped") or run.get("error", "no tokens")
            lines.append(f"| {run['dtype']} | {why} | | | | | | |")
            continue
        s = run["score"]
        rate = f"{s['top1_agree']}/{s['positions']} ({100 * s['top1_rate']:.1f} %)"
        lines.append(
            f"| {run['dtype']} | {run['startup_s']:.0f} | {rate} "
            f"| {s['greedy_prefix_tokens']} | {s['max_gap']:.4f} ({s['tie_gap']}) "
            f"| {'—' if s.get('baseline_misses') is None else s['baseline_misses']} "
            f"| {'agrees' if s['agrees'] else 'DIFFERS'} | {run.get('ops') or '—'} |"
        )
    return lines


def server_lines(server: dict) -> list[str]:
    """The server part: why it was skipped or failed, else one row per concurrency level."""
    if server["status"] == "skipped":
        return [f"Skipped: {server['reason']}."]
    lines = [f"`{server['command']}`: {server['status']}" + (f" ({server['error']})" if "error" in server else "")]
    if "startup_s" in server:
        lines[-1] += f"; ready after {server['startup_s']:.0f} s"
    lines += [
        "",
        "| concurrency | ok | errors | output tok/s | TTFT p50 ms | decode ms a token (server's counts) |",
        "|---|---|---|---|---|---|",
    ]
    for level in server["levels"]:
        if "skipped" in level:
            lines.append(f"| {level['concurrency']} | skipped: {level['skipped']} | | | | |")
            continue
        lines.append(
            f"| {level['concurrency']} | {level['ok']} | {level['errors']} | {report._fmt(level['output_throughput'])} "
            f"| {report._fmt(level['ttft_ms']['p50'])} | {report._fmt(level.get('decode_ms'))} |"
        )
    lines += [
        "",
        "Decode ms a token: (E2E p50 - TTFT p50) / (tokens a request - 1). Not the client's ITL: random weights "
        "make many tokens stream no text, and the client times text chunks.",
    ]
    return lines


def plot_roofline(result: dict, path: Path) -> bool:
    """% of the roofline against batch, one line per (variant, context); False without matplotlib."""
    try:
        plt = report._pyplot()
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    decode = [c for c in result["cases"] if c["kind"] == "decode" and "skipped" not in c]
    for context in sorted({c["context"] for c in decode}):
        for name, style in (("torch", ":"), ("triton", "--"), ("triton_graph", "-")):
            points = [(c["batch"], c["variants"][name]["roofline_pct"]) for c in decode if c["context"] == context]
            points = sorted(p for p in points if p[1] is not None)
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{name} C={context}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch")
    ax.set_ylabel("% of measured copy bandwidth")
    ax.set_title("One decoder layer of one rank: bytes read / time")
    if ax.get_legend_handles_labels()[1]:  # every case skipped: an empty plot, no legend
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
