"""The systems `mixserve bench compare` runs, and how each is started: mixserve with N shards or with a
variant's flags (`--mixserve NAME=ARGS`, leading VAR=VALUE words its environment), the naive baseline,
and the peers found installed (vLLM's CPU build and transformers' server in their venvs, llama.cpp's
llama-server serving the checkpoint converted to GGUF); a peer that is missing is skipped with the
reason, never installed."""

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from mixserve.benchmarks import llamacpp
from mixserve.benchmarks.processes import PYTHON, child_env, free_port

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
