"""Results on disk: the machine and command they came from, JSON, Markdown tables and PNG plots.

matplotlib (the `bench` extra) is imported only when a plot is drawn.
"""

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine_info() -> dict:
    """CPU model, cores this process may use, memory, load, OS and Python: what a number depends on."""
    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu or platform.processor(),
        "cores": cores,
        "memory_gib": memory_gib,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


def git_commit() -> str:
    """HEAD of the checkout the harness runs from, with `-dirty` when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _program() -> str:
    """`mixserve` for the entry point and for `python -m mixserve.cli`, else the script's name."""
    name = Path(sys.argv[0]).name
    return "mixserve" if name == "mixserve" or sys.argv[0].endswith("mixserve/cli.py") else name


def run_meta() -> dict:
    """Date (UTC), the command line, the commit and the machine."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([_program(), *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine_info(),
    }


def strip_live(result: dict) -> dict:
    """The result without its live per-request objects (`_records`), ready for JSON."""
    out = dict(result)
    if "levels" in out:
        out["levels"] = [{k: v for k, v in level.items() if not k.startswith("_")} for level in out["levels"]]
    if "systems" in out:
        out["systems"] = {name: strip_live(system) for name, system in out["systems"].items()}
    return out


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(strip_live(result), indent=1) + "\n")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _triple(dist: dict) -> str:
    return " / ".join(_fmt(dist[k], 0 if (dist[k] or 0) >= 100 else 1) for k in ("p50", "p90", "p99"))


def meta_lines(meta: dict) -> list[str]:
    """The provenance block above every table."""
    m = meta["machine"]
    load = ", ".join(str(x) for x in m.get("load_average") or [])
    return [
        f"- date: {meta['date']}; commit: `{meta.get('commit') or 'unknown'}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average at start: {load}",
        f"- command: `{meta['command']}`",
    ]


def serve_markdown(result: dict) -> str:
    """One load run as a Markdown table, one row per concurrency level."""
    meta, config = result["meta"], result["meta"]["config"]
    workload = config["workload"]
    lines = [
        f"### {meta.get('label') or config['target']}: `{config['target']}` at {config['url']}",
        "",
        *meta_lines(meta),
        f"- workload: {workload['input_len']}-token prompts, {workload['output_len']} output tokens"
        f" (spread ±{workload['output_spread']:.0%}), ignore_eos={config['ignore_eos']},"
        f" temperature {config['temperature']}, top_p {config.get('top_p', 1.0)}, seed {workload['seed']},"
        f" warm-up max({config['warmup']}, c) per level,"
        f" request rate {config['request_rate'] or 'unlimited'}",
        "",
        "| concurrency | requests | ok | errors | output tok/s | req/s | TTFT ms p50/p90/p99 | ITL ms p50/p90/p99"
        " | TPOT ms p50/p90/p99 | E2E ms p50/p90/p99 | tokens counted by |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in result["levels"]:
        s = level["summary"]
        lines.append(
            f"| {level['concurrency']} | {s['requests']} | {s['ok']} | {s['errors']} | {_fmt(s['output_throughput'])}"
            f" | {_fmt(s['request_throughput'], 2)} | {_triple(s['ttft_ms'])} | {_triple(s['itl_ms'])}"
            f" | {_triple(s['tpot_ms'])} | {_triple(s['e2e_ms'])} | {s['token_count_method']} |"
        )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(results: dict[str, dict], path: Path) -> None:
    """Output tokens/s against concurrency, one line per system."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        levels = result["levels"]
        ax.plot(
            [lv["concurrency"] for lv in levels],
            [lv["summary"]["output_throughput"] or 0 for lv in levels],
            marker="o",
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_cdfs(curves: dict[str, list], path: Path) -> None:
    """TTFT and E2E CDFs, one line per named list of RequestRecords."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in zip(axes, ("ttft", "e2e"), strict=True):
        for name, records in curves.items():
            values = sorted(getattr(r, what) * 1e3 for r in records if r.ok and getattr(r, what) is not None)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
        ax.set_xlabel(f"{what.upper()} ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{what.upper()} CDF")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_serve_result(result: dict, out_dir: Path) -> None:
    """serve.json, serve.md, throughput.png and latency_cdf.png (one curve per level) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, out_dir / "serve.json")
    (out_dir / "serve.md").write_text(serve_markdown(result) + "\n")
    label = result["meta"].get("label") or "server"
    plot_throughput({label: result}, out_dir / "throughput.png")
    curves = {f"c={level['concurrency']}": level["_records"] for level in result["levels"]}
    plot_latency_cdfs(curves, out_dir / "latency_cdf.png")
