"""`mixserve bench compare`: mixserve, the naive baseline and every installed peer, side by side.

Each system is started on its own, loaded with the same workload by the same client
(`benchmarks.serve`), and stopped before the next one starts, so none competes with another
for the cores; or, with `--interleave N`, all are started at once and measured in alternating blocks
of each level (benchmarks/interleave.py), one loaded at a time, so that the machine's drift over the
run weighs on each alike. The machine's roofline is measured first, with nothing running. Writes
compare.json, compare.md (one table with ratios to the reference system and % of the
roofline ceiling), throughput.png and latency_cdf.png.

Peers are found, never installed: vLLM's CPU build and transformers' own server each live in
their own venv, llama.cpp's `llama-server` is a binary (recipes in benchmarks/peers.md); a missing
one is skipped with the reason. `--mixserve NAME=ARGS` adds mixserve started with extra launch flags
(system `mixserve-NAME`), `--llama-dtype` llama.cpp in another weight type (`llama.cpp-<dtype>`);
benchmarks/systems.py finds them and says how each starts.
"""

import argparse
import asyncio
import datetime
import json
import logging
import math
import sys
import urllib.error
import urllib.request
from pathlib import Path

from mixserve.benchmarks import llamacpp, report
from mixserve.benchmarks.interleave import run_interleaved
from mixserve.benchmarks.processes import REPO, ServerProcess
from mixserve.benchmarks.serve import ServeConfig, add_workload_arguments, config_from_args, config_json, run_benchmark
from mixserve.benchmarks.systems import (
    SYSTEMS,
    TRANSFORMERS_VENVS,
    VARIANT_SHARDS,
    VLLM_VENVS,
    LlamaSizing,
    System,
    find_systems,
    parse_variant,
    venv_candidates,
)

log = logging.getLogger("mixserve.bench")


def has_openai_completions(url: str) -> bool:
    """Whether the server routes POST /v1/completions (any answer but 404/405)."""
    request = urllib.request.Request(f"{url}/v1/completions", data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code not in (404, 405)
    except OSError:
        return False


SPECULATION_COUNTERS = {
    "proposed": "mixserve_speculative_proposed_tokens_total",
    "accepted": "mixserve_speculative_accepted_tokens_total",
}


def speculation_counters(metrics_text: str) -> dict[str, float] | None:
    """mixserve's speculation totals from a /metrics page, with the acceptance rate; None without them."""
    values = {}
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        for key, metric in SPECULATION_COUNTERS.items():
            if name == metric:
                values[key] = float(value)
    if len(values) != len(SPECULATION_COUNTERS):
        return None
    values["acceptance"] = round(values["accepted"] / values["proposed"], 4) if values["proposed"] else 0.0
    return values


def read_speculation(url: str) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            return speculation_counters(response.read().decode(errors="replace"))
    except OSError:
        return None


def start_system(system: System, args: argparse.Namespace, model_dir: str, out_dir: Path):
    """Start one system and wait until it serves: its process, the ServeConfig that drives it, and the
    seconds it took to start. Stops the process if it never gets ready."""
    server = ServerProcess(system.name, system.cmd, out_dir / "logs" / f"{system.name}.log", system.env)
    url = f"http://127.0.0.1:{system.port}"
    try:
        startup_s = server.wait_http_ready(f"{url}/health", args.startup_timeout)
        target = system.target
        if target == "auto":
            target = args.mixserve_api
        if target == "auto":
            target = "openai" if has_openai_completions(url) else "predict"
    except BaseException:
        server.stop()
        raise
    config = config_from_args(args, url, model_dir, target)
    config.ignore_eos = system.ignore_eos
    config.keepalive = system.keepalive
    return server, config, startup_s


def _finish(result: dict, system: System, config: ServeConfig, startup_s: float) -> dict:
    result["meta"].update(startup_s=round(startup_s, 1), description=system.description, server_cmd=system.cmd)
    if system.target == "auto":
        # Over the whole run, warm-up included.
        result["meta"]["speculation"] = read_speculation(config.url)
    return result


def _failed(system: System, exc: BaseException) -> dict:
    log.error("event=system_failed name=%s error=%s", system.name, str(exc).splitlines()[0])
    return {"error": str(exc)[-2000:], "meta": {"label": system.name, "server_cmd": system.cmd}}


def run_system(system: System, args: argparse.Namespace, model_dir: str, out_dir: Path) -> dict:
    """Start, load and stop one system; its result, with `error` set if it could not be measured."""
    try:
        server, config, startup_s = start_system(system, args, model_dir, out_dir)
    except (RuntimeError, TimeoutError, OSError) as exc:
        return _failed(system, exc)
    try:
        return _finish(asyncio.run(run_benchmark(config, system.name)), system, config, startup_s)
    except (RuntimeError, TimeoutError, OSError) as exc:
        return _failed(system, exc)
    finally:
        server.stop()


def run_systems_interleaved(found: list[System], args: argparse.Namespace, model_dir: str, out_dir: Path) -> dict:
    """Start every system, measure them together in `args.interleave` alternating blocks per level
    (benchmarks/interleave.py), stop them; one result per system, as run_system gives."""
    results: dict[str, dict] = {}
    started: dict[str, tuple] = {}
    try:
        for system in found:
            try:
                started[system.name] = (system, *start_system(system, args, model_dir, out_dir))
            except (RuntimeError, TimeoutError, OSError) as exc:
                results[system.name] = _failed(system, exc)
        configs = {name: config for name, (_, _, config, _) in started.items()}
        measured = asyncio.run(run_interleaved(configs, args.interleave)) if configs else {}
        for name, (system, _, config, startup_s) in started.items():
            meta = report.run_meta()
            meta.update(label=name, config=config_json(config), interleave=args.interleave)
            results[name] = _finish({"meta": meta, **measured[name]}, system, config, startup_s)
    finally:
        for _, server, _, _ in started.values():
            server.stop()
    return {system.name: results[system.name] for system in found}


def _ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "–"
    return f"{value / reference:.2f}×"


def _decoding(workload: dict) -> str:
    temperature = workload.get("temperature", 0.0)
    if not temperature:
        return "greedy"
    return f"sampled (temperature {temperature}, top_p {workload.get('top_p', 1.0)})"


def compare_markdown(result: dict) -> str:
    """The side-by-side table: one row per system and concurrency, ratios to the reference."""
    systems, reference = result["systems"], result["reference"]
    w = result["workload"]
    per_level = w["num_prompts"] or f"max(8, {w['rounds']} × c)"
    lines = [
        "## mixserve against the baseline and the peers",
        "",
        *report.meta_lines(result["meta"]),
        f"- workload: {w.get('kind', 'random')} {w['input_len']}-token prompts, {w['output_len']} output tokens,"
        " EOS ignored where the API"
        f" allows, {_decoding(w)}, streamed; {per_level} measured requests per level after"
        f" max({w['warmup']}, c) warm-up; one client ({result['client']}) for every server",
        f"- ratios are to `{reference}`; roofline % is output tok/s over this machine's serving ceiling",
    ]
    if w.get("interleave", 1) > 1:
        blocks = {lv["concurrency"]: lv.get("blocks") for s in systems.values() for lv in s.get("levels", [])}
        per_level = ", ".join(f"c={c}: {b}" for c, b in blocks.items())
        lines.append(
            f"- interleaved: every server up at once, each level measured in up to {w['interleave']} alternating"
            f" blocks (A B, B A, ...; a block holds >= c requests; {per_level}), one server loaded at a time"
        )
    if result.get("conditions"):
        lines.append(f"- conditions: {result['conditions']}")
    lines += [
        "",
        "| concurrency | system | API | output tok/s | vs ref | % roofline | req/s | TTFT p50 ms | ITL p50 ms"
        " | TPOT p50 ms | E2E p50 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ceilings = (result.get("roofline") or {}).get("ceilings", {})
    ref_levels = {lv["concurrency"]: lv["summary"] for lv in systems.get(reference, {}).get("levels", [])}
    for concurrency in w["concurrency"]:
        for name, system in systems.items():
            level = next((lv for lv in system.get("levels", []) if lv["concurrency"] == concurrency), None)
            if level is None:
                continue
            s = level["summary"]
            ceiling = ceilings.get(str(concurrency), {}).get("serving_output_tok_s")
            tok_s = s["output_throughput"]
            roof = f"{100 * tok_s / ceiling:.0f} %" if tok_s and ceiling else "–"
            ref = ref_levels.get(concurrency, {}).get("output_throughput")
            lines.append(
                f"| {concurrency} | {name} | {system['meta']['config']['target']} | {tok_s:.1f}"
                f" | {_ratio(tok_s, ref)} | {roof} | {s['request_throughput']:.2f} | {_p50(s['ttft_ms'])}"
                f" | {_p50(s['itl_ms'])} | {_p50(s['tpot_ms'])} | {_p50(s['e2e_ms'])} | {s['errors']} |"
            )
    for name, system in systems.items():
        spec = system.get("meta", {}).get("speculation")
        if spec and spec["proposed"]:
            lines.append(
                f"\n- `{name}` speculation (whole run, warm-up included): {spec['accepted']:.0f} of"
                f" {spec['proposed']:.0f} proposed tokens accepted ({100 * spec['acceptance']:.1f} %)"
            )
    failed = {name: s["error"].splitlines()[0] for name, s in systems.items() if "error" in s}
    for name, reason in {**result["skipped"], **failed}.items():
        lines.append(f"\n- `{name}` not measured: {reason}")
    return "\n".join(lines)


def _p50(dist: dict) -> str:
    value = dist["p50"]
    return "–" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--systems", nargs="+", default=list(SYSTEMS), help=f"subset of {', '.join(SYSTEMS)} (any mixserve-N)"
    )
    parser.add_argument("--reference", default="mixserve-2", help="system the ratios are taken to")
    parser.add_argument("--mixserve-api", choices=["auto", "predict", "openai"], default="auto")
    parser.add_argument(
        "--vllm-venv", type=Path, help=f"default: $MIXSERVE_VLLM_VENV, then {', '.join(map(str, VLLM_VENVS))}"
    )
    parser.add_argument(
        "--transformers-venv",
        type=Path,
        help=f"default: $MIXSERVE_TRANSFORMERS_VENV, then {', '.join(map(str, TRANSFORMERS_VENVS))}",
    )
    parser.add_argument(
        "--llama-server",
        type=Path,
        help="llama.cpp's llama-server binary (default: $MIXSERVE_LLAMA_SERVER, then "
        f"{', '.join(map(str, llamacpp.server_candidates(None)))})",
    )
    parser.add_argument(
        "--llama-dtype",
        action="append",
        choices=llamacpp.DTYPES,
        default=[],
        help="add llama.cpp serving the checkpoint in this weight type (system llama.cpp-DTYPE; repeatable)",
    )
    parser.add_argument(
        "--mixserve",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="add mixserve launched with these extra flags as system mixserve-NAME"
        f" ({VARIANT_SHARDS} shards unless ARGS sets --num-shard; leading VAR=VALUE words set its environment;"
        " repeatable)",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for a server to get ready")
    parser.add_argument("--no-roofline", action="store_true", help="skip the bandwidth and FLOP/s measurement")
    parser.add_argument(
        "--interleave",
        type=int,
        default=1,
        metavar="N",
        help="run every system at once and measure them in N alternating blocks of each level's requests"
        " (benchmarks/interleave.py), so that the machine's drift weighs on each alike (1: one system after"
        " another); the servers. order has biased such runs, so list one system twice as a control",
    )
    parser.add_argument("--conditions", default="", help="a note on the conditions, written under the table")
    parser.add_argument("--out", type=Path, help="output dir (default: benchmarks/results/compare-<UTC time>)")
    add_workload_arguments(parser)


def max_output_len(args: argparse.Namespace) -> int:
    """The longest output the workload asks for (output_len widened by --output-spread)."""
    return math.ceil(args.output_len * (1 + args.output_spread))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench %(levelname)s %(message)s")
    model_dir = args.model
    if model_dir is None:
        from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

        model_dir = str(ensure_demo_checkpoint())
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or REPO / "benchmarks" / "results" / f"compare-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = report.run_meta()
    roofline = None
    if not args.no_roofline:
        from mixserve.benchmarks.roofline import roofline as measure_roofline

        roofline = measure_roofline(model_dir, args.concurrency, args.input_len, args.output_len)
    variants = dict(parse_variant(spec) for spec in args.mixserve)
    names = list(dict.fromkeys([*args.systems, *(f"mixserve-{v}" for v in variants)]))
    names += [f"llama.cpp-{dtype}" for dtype in args.llama_dtype if f"llama.cpp-{dtype}" not in names]
    found, skipped = find_systems(
        names,
        model_dir,
        venv_candidates(args.vllm_venv, "MIXSERVE_VLLM_VENV", VLLM_VENVS),
        venv_candidates(args.transformers_venv, "MIXSERVE_TRANSFORMERS_VENV", TRANSFORMERS_VENVS),
        args.startup_timeout,
        llama_servers=llamacpp.server_candidates(args.llama_server),
        llama_sizing=LlamaSizing(max(args.concurrency), args.input_len, max_output_len(args)),
        variants=variants,
        logs_dir=out_dir / "logs",
    )
    for name, reason in skipped.items():
        log.warning("event=skipped name=%s reason=%s", name, reason)
    if args.interleave > 1:
        systems = run_systems_interleaved(found, args, model_dir, out_dir)
    else:
        systems = {system.name: run_system(system, args, model_dir, out_dir) for system in found}
    result = {
        "meta": meta,
        "reference": args.reference if args.reference in systems else next(iter(systems), ""),
        "workload": {
            "kind": args.workload,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "concurrency": args.concurrency,
            "num_prompts": args.num_prompts,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "interleave": args.interleave,
            "temperature": args.temperature,
            "top_p": args.top_p,
        },
        "client": "benchmarks/serve.py, one aiohttp session",
        "conditions": args.conditions,
        "roofline": roofline,
        "skipped": skipped,
        "systems": systems,
    }
    report.write_json(result, out_dir / "compare.json")
    table = compare_markdown(result)
    (out_dir / "compare.md").write_text(table + "\n")
    measured = {name: s for name, s in systems.items() if "levels" in s}
    if measured:
        report.plot_throughput(measured, out_dir / "throughput.png")
        middle = args.concurrency[len(args.concurrency) // 2]
        curves = {
            f"{name} c={middle}": next(lv["_records"] for lv in s["levels"] if lv["concurrency"] == middle)
            for name, s in measured.items()
        }
        report.plot_latency_cdfs(curves, out_dir / "latency_cdf.png")
    if roofline is not None:
        (out_dir / "roofline.json").write_text(json.dumps(roofline, indent=1) + "\n")
    sys.stdout.write(table + f"\n\nwritten to {out_dir}\n")
    return 0 if measured and len(measured) == len(systems) else 1
