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
(system `mixserve-NAME`), `--llama-dtype` llama.cpp in another weight type (`llama.cpp-<dtype>`).
"""

import argparse
import asyncio
import datetime
import json
import logging
import math
import os
import re
import shlex
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mixserve.benchmarks import llamacpp, report
from mixserve.benchmarks.interleave import run_interleaved
from mixserve.benchmarks.processes import PYTHON, REPO, ServerProcess, child_env, free_port
from mixserve.benchmarks.serve import ServeConfig, add_workload_arguments, config_from_args, config_json, run_benchmark

log = logging.getLogger("mixserve.bench")

# mixserve-N is N shards; on a 2-core machine two shards (one per core) serve best, four (the
# default of `mixserve launch`, one per GPU of a 4-GPU host) oversubscribe the cores.
SYSTEMS = ("mixserve-2", "mixserve-1", "mixserve-4", "naive", "vllm", "transformers-serve", "llama.cpp-f32")
PEERS_DIR = llamacpp.peers_dir()
# Shards of a `--mixserve NAME=ARGS` variant unless ARGS sets --num-shard: the reference's two.
VARIANT_SHARDS = 2
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
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
    keepalive: bool = True
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


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """`NAME=ARGS` of `--mixserve`: the name (system `mixserve-NAME`) and the launch flags, shell-split."""
    name, sep, args = spec.partition("=")
    name = name.strip()
    if not sep or not _VARIANT_NAME.match(name):
        raise ValueError(f"--mixserve takes NAME=ARGS with NAME of letters, digits, '_.+-', got {spec!r}")
    if name.isdigit():
        raise ValueError(f"--mixserve name {name!r} is taken by mixserve-N (N shards); pick another")
    try:
        return name, shlex.split(args)
    except ValueError as exc:
        raise ValueError(f"--mixserve {name}: cannot split its flags: {exc}") from None


_ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def split_environment(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """A variant's ARGS as a shell line reads them: leading `NAME=VALUE` words set the server's environment
    (e.g. `MIXSERVE_KERNEL_CFLAGS=-mno-amx-tile`, which its shards' kernels are built with), the rest are
    launch flags."""
    count = next((i for i, arg in enumerate(args) if not _ENV_ASSIGNMENT.match(arg)), len(args))
    return dict(arg.split("=", 1) for arg in args[:count]), args[count:]


def mixserve_command(model_dir: str, port: int, startup_timeout_s: float, shards: int, extra: list[str]) -> list[str]:
    """`mixserve launch` on `port` with `shards` shards, then `extra` (later flags win, so ARGS may set
    --num-shard too)."""
    cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--model", model_dir, "--num-shard", str(shards)]
    # The launcher's own wait for its shards follows the harness's start-up timeout.
    return cmd + ["--port", str(port), "--shard-timeout", str(startup_timeout_s), *extra]


@dataclass(slots=True)
class LlamaSizing:
    """What llama-server's slots must hold: the most requests in flight and one request's tokens."""

    slots: int = 32
    input_len: int = 64
    output_len: int = 64


def find_systems(
    names: list[str],
    model_dir: str,
    vllm_venvs: list[Path],
    transformers_venvs: list[Path],
    startup_timeout_s: float = 600.0,
    *,
    llama_servers: list[Path] | None = None,
    llama_sizing: LlamaSizing | None = None,
    variants: dict[str, list[str]] | None = None,
    logs_dir: Path | None = None,
):
    """The systems to run (each on its own free port) and, for each left out, why. llama.cpp systems
    convert the checkpoint first (cached), writing the converter's log under `logs_dir`."""
    found: list[System] = []
    skipped: dict[str, str] = {}
    variants = variants or {}
    vllm_venv = find_venv(vllm_venvs, "vllm")
    transformers_venv = find_venv(transformers_venvs, "fastapi")
    llama_servers = llama_servers if llama_servers is not None else llamacpp.server_candidates(None)
    for name in names:
        port = free_port()
        if name.startswith("mixserve-") and name.removeprefix("mixserve-") in variants:
            environment, extra = split_environment(variants[name.removeprefix("mixserve-")])
            cmd = mixserve_command(model_dir, port, startup_timeout_s, VARIANT_SHARDS, extra)
            described = shlex.join([f"{key}={value}" for key, value in environment.items()] + extra)
            env = {**child_env(), **environment}
            found.append(System(name, cmd, port, "auto", env=env, description=f"mixserve, {described}"))
        elif name.startswith("mixserve-") and name.removeprefix("mixserve-").isdigit():
            shards = int(name.removeprefix("mixserve-"))
            cmd = mixserve_command(model_dir, port, startup_timeout_s, shards, [])
            found.append(System(name, cmd, port, "auto", description=f"mixserve, {shards} shard(s)"))
        elif name.startswith("llama.cpp-"):
            system = _llama_system(name, model_dir, port, llama_servers, llama_sizing or LlamaSizing(), logs_dir)
            if isinstance(system, str):
                skipped[name] = system
            else:
                found.append(system)
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
            raise ValueError(
                f"unknown system {name!r}; known: {', '.join(SYSTEMS)}, any mixserve-N, mixserve-NAME of"
                f" --mixserve, llama.cpp-DTYPE ({', '.join(llamacpp.DTYPES)})"
            )
    return found, skipped


def _llama_system(
    name: str, model_dir: str, port: int, servers: list[Path], sizing: LlamaSizing, logs_dir: Path | None
) -> System | str:
    """llama-server serving the checkpoint in the name's dtype, or why it cannot run."""
    dtype = name.removeprefix("llama.cpp-")
    if dtype not in llamacpp.DTYPES:
        raise ValueError(f"unknown llama.cpp dtype in {name!r}; known: {', '.join(llamacpp.DTYPES)}")
    server = llamacpp.find_server(servers)
    if server is None:
        places = ", ".join(map(str, servers))
        return f"no llama-server at {places} (recipe: benchmarks/peers.md; or pass --llama-server)"
    converter = llamacpp.find_converter(server)
    if converter is None:
        return f"no {llamacpp.CONVERTER} beside {server} or in the llama.cpp tree it was built in"
    logs_dir = logs_dir or Path(model_dir)
    try:
        gguf = llamacpp.ensure_gguf(converter, Path(model_dir), dtype, logs_dir / f"{name}-convert.log")
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    context = llamacpp.context_size(sizing.slots, sizing.input_len, sizing.output_len)
    threads = llamacpp.server_threads()
    cmd = llamacpp.server_command(server, gguf, port, sizing.slots, context, threads)
    description = f"llama.cpp llama-server, {dtype}, {sizing.slots} slots, -t {threads}"
    # llama-server closes the connection after each streamed response while advertising keep-alive.
    return System(name, cmd, port, "openai", keepalive=False, env=dict(os.environ), description=description)


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
        f" allows, greedy, streamed; {per_level} measured requests per level after"
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
        " another)",
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
