"""`mixserve bench compare`: mixserve, the naive baseline and every installed peer, side by side.

Each system is started on its own, loaded with the same workload by the same client
(`benchmarks.serve`), and stopped before the next one starts, so none competes with another
for the cores. The machine's roofline is measured first, with nothing running. Writes
compare.json, compare.md (one table with ratios to the reference system and % of the
roofline ceiling), throughput.png and latency_cdf.png.

A mixserve system is `mixserve-N` (N shards) with, after a colon, flags for `mixserve launch`:
`mixserve-2:--dtype bfloat16` or `"mixserve-2:--quantize int8-wo"` set the weight formats side by
side in one table (the name, flags included, labels the row).

Peers are found, never installed: vLLM's CPU build and transformers' own server each live in
their own venv (recipes in benchmarks/peers.md); a missing venv is skipped with the reason.
"""

import argparse
import asyncio
import datetime
import json
import logging
import os
import shlex
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mixserve.benchmarks import report
from mixserve.benchmarks.processes import PYTHON, REPO, ServerProcess, child_env, free_port
from mixserve.benchmarks.serve import add_workload_arguments, config_from_args, run_benchmark

log = logging.getLogger("mixserve.bench")

# mixserve-N is N shards; on a 2-core machine two shards (one per core) serve best, four (the
# default of `mixserve launch`, one per GPU of a 4-GPU host) oversubscribe the cores.
SYSTEMS = ("mixserve-2", "mixserve-1", "mixserve-4", "naive", "vllm", "transformers-serve")
PEERS_DIR = Path(os.environ.get("MIXSERVE_CACHE") or Path.home() / ".cache" / "mixserve") / "peers"
# Where peers' venvs are looked for, in order, after --vllm-venv / --transformers-venv and the
# MIXSERVE_VLLM_VENV / MIXSERVE_TRANSFORMERS_VENV variables.
VLLM_VENVS = (PEERS_DIR / "vllm", Path("/opt/vllm-venv"))
TRANSFORMERS_VENVS = (PEERS_DIR / "transformers", Path("/opt/transformers-venv"))


@dataclass(slots=True)
class System:
    """How to start one server and which API to drive on it."""

    name: str
    cmd: list[str]
    port: int
    target: str
    ignore_eos: bool = True
    env: dict[str, str] = field(default_factory=child_env)
    description: str = ""


def _has_module(venv: Path, module: str) -> bool:
    return any((venv / "lib").glob(f"python3*/site-packages/{module}/__init__.py"))


def find_venv(candidates: list[Path], module: str) -> Path | None:
    """The first of `candidates` whose site-packages holds `module`."""
    return next((venv for venv in candidates if _has_module(venv, module)), None)


def venv_candidates(given: Path | None, variable: str, defaults: tuple[Path, ...]) -> list[Path]:
    """Where to look for a peer's venv: the flag, else the environment variable, then the defaults."""
    if given is not None:
        return [given]
    return [Path(os.environ[variable]), *defaults] if os.environ.get(variable) else list(defaults)


def find_systems(
    names: list[str],
    model_dir: str,
    vllm_venvs: list[Path],
    transformers_venvs: list[Path],
    startup_timeout_s: float = 600.0,
):
    """The systems to run (each on its own free port) and, for each left out, why."""
    found: list[System] = []
    skipped: dict[str, str] = {}
    vllm_venv = find_venv(vllm_venvs, "vllm")
    transformers_venv = find_venv(transformers_venvs, "fastapi")
    for name in names:
        port = free_port()
        if name.startswith("mixserve-"):
            shards, _, flags = name.removeprefix("mixserve-").partition(":")
            cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--model", model_dir, "--num-shard", shards]
            # The launcher's own wait for its shards follows the harness's start-up timeout.
            cmd += ["--port", str(port), "--shard-timeout", str(startup_timeout_s), *shlex.split(flags)]
            description = f"mixserve, {shards} shard(s)" + (f", {flags}" if flags else "")
            found.append(System(name, cmd, port, "auto", description=description))
        elif name == "naive":
            cmd = [
                PYTHON,
                "-m",
                "mixserve.benchmarks.baselines.naive_server",
                "--model",
                model_dir,
                "--port",
                str(port),
            ]
            # torch's default threads (every core), as such a deployment runs.
            env = {k: v for k, v in child_env().items() if k != "OMP_NUM_THREADS"}
            found.append(System(name, cmd, port, "openai", env=env, description="transformers generate, one at a time"))
        elif name == "vllm":
            if vllm_venv is None:
                places = ", ".join(map(str, vllm_venvs))
                skipped[name] = f"no vLLM venv at {places} (recipe: benchmarks/peers.md; or pass --vllm-venv)"
                continue
            cmd = [str(vllm_venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048"]
            env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_HOST_IP="127.0.0.1")
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            found.append(System(name, cmd, port, "openai", env=env, description="vLLM CPU build"))
        elif name == "transformers-serve":
            if transformers_venv is None or not (transformers_venv / "bin" / "transformers").exists():
                places = ", ".join(map(str, transformers_venvs))
                skipped[name] = (
                    f"no transformers[serving] venv at {places} (recipe: benchmarks/peers.md;"
                    " or pass --transformers-venv)"
                )
                continue
            binary = transformers_venv / "bin" / "transformers"
            cmd = [str(binary), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--device", "cpu", "--dtype", "float32", "--continuous-batching"]
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            # It answers 422 to fields it does not know, ignore_eos among them.
            found.append(
                System(name, cmd, port, "openai", ignore_eos=False, env=env, description="transformers serve, CB")
            )
        else:
            raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
    return found, skipped


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


def run_system(system: System, args: argparse.Namespace, model_dir: str, out_dir: Path) -> dict:
    """Start, load and stop one system; its result, with `error` set if it could not be measured."""
    server = ServerProcess(system.name, system.cmd, out_dir / "logs" / f"{system.name}.log", system.env)
    url = f"http://127.0.0.1:{system.port}"
    try:
        startup_s = server.wait_http_ready(f"{url}/health", args.startup_timeout)
        target = system.target
        if target == "auto":
            target = args.mixserve_api
        if target == "auto":
            target = "openai" if has_openai_completions(url) else "predict"
        config = config_from_args(args, url, model_dir, target)
        config.ignore_eos = system.ignore_eos
        result = asyncio.run(run_benchmark(config, system.name))
        result["meta"].update(startup_s=round(startup_s, 1), description=system.description, server_cmd=system.cmd)
        return result
    except (RuntimeError, TimeoutError, OSError) as exc:
        log.error("event=system_failed name=%s error=%s", system.name, str(exc).splitlines()[0])
        return {"error": str(exc)[-2000:], "meta": {"label": system.name, "server_cmd": system.cmd}}
    finally:
        server.stop()


def _ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "–"
    return f"{value / reference:.2f}×"


def compare_markdown(result: dict) -> str:
    """The side-by-side table: one row per system and concurrency, ratios to the reference."""
    systems, reference = result["systems"], result["reference"]
    w = result["workload"]
    per_level = w["num_prompts"] or f"max(8, {w['rounds']} × c)"
    lines = [
        "## mixserve against the baseline and the peers",
        "",
        *report.meta_lines(result["meta"]),
        f"- workload: {w['input_len']}-token prompts, {w['output_len']} output tokens, EOS ignored where the API"
        f" allows, greedy, streamed; {per_level} measured requests per level after"
        f" max({w['warmup']}, c) warm-up; one client ({result['client']}) for every server",
        f"- ratios are to `{reference}`; roofline % is output tok/s over this machine's serving ceiling",
    ]
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
    failed = {name: s["error"].splitlines()[0] for name, s in systems.items() if "error" in s}
    for name, reason in {**result["skipped"], **failed}.items():
        lines.append(f"\n- `{name}` not measured: {reason}")
    return "\n".join(lines)


def _p50(dist: dict) -> str:
    value = dist["p50"]
    return "–" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--systems",
        nargs="+",
        default=list(SYSTEMS),
        help=f"subset of {', '.join(SYSTEMS)} (any mixserve-N, and mixserve-N:FLAGS with flags for mixserve "
        "launch, e.g. 'mixserve-2:--quantize int8-wo')",
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
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for a server to get ready")
    parser.add_argument("--no-roofline", action="store_true", help="skip the bandwidth and FLOP/s measurement")
    parser.add_argument("--conditions", default="", help="a note on the conditions, written under the table")
    parser.add_argument("--out", type=Path, help="output dir (default: benchmarks/results/compare-<UTC time>)")
    add_workload_arguments(parser)


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
    found, skipped = find_systems(
        args.systems,
        model_dir,
        venv_candidates(args.vllm_venv, "MIXSERVE_VLLM_VENV", VLLM_VENVS),
        venv_candidates(args.transformers_venv, "MIXSERVE_TRANSFORMERS_VENV", TRANSFORMERS_VENVS),
        args.startup_timeout,
    )
    for name, reason in skipped.items():
        log.warning("event=skipped name=%s reason=%s", name, reason)
    systems = {system.name: run_system(system, args, model_dir, out_dir) for system in found}
    result = {
        "meta": meta,
        "reference": args.reference if args.reference in systems else next(iter(systems), ""),
        "workload": {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "concurrency": args.concurrency,
            "num_prompts": args.num_prompts,
            "rounds": args.rounds,
            "warmup": args.warmup,
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
