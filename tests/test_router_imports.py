"""The router's import boundaries, read from the source with `ast`, and torch kept out of a launched router.

- No router module imports torch: the router runs on machines that have none (router/launch_serving.py
  keeps even the demo checkpoint writer in a child process).
- The fronts (HTTP and gRPC) reach the engine only through router/engine_api.py and validate with
  router/validation.py: never the scheduler, the engine loop, a request's internals or the shard wire.
- The gRPC front imports no module that imports aiohttp.
- No import cycle among router modules (imports inside functions and TYPE_CHECKING blocks count).
- `mixserve launch`, started as a user starts it, serves a request without torch in its process; and a
  router-only install (router/requirements.txt) serves in front of shards started elsewhere.
"""

import ast
import importlib.metadata
import json
import re
import subprocess
from pathlib import Path

import pytest

from child_processes import PYTHON, REPO, free_port, subprocess_env

ROUTER = REPO / "router"

# The front modules: each serves an API (or is a helper only the fronts use).
FRONTS = frozenset(
    {
        "mixserve.router.api_info",
        "mixserve.router.api_metrics",
        "mixserve.router.api_openai",
        "mixserve.router.api_predict",
        "mixserve.router.api_responses",
        "mixserve.router.api_sagemaker",
        "mixserve.router.api_tgi",
        "mixserve.router.api_tokenize",
        "mixserve.router.cors",
        "mixserve.router.front_config",
        "mixserve.router.grpc_server",
        "mixserve.router.http_common",
        "mixserve.router.metrics_vllm",
        "mixserve.router.openai_errors",
        "mixserve.router.openai_logprobs",
        "mixserve.router.openai_requests",
        "mixserve.router.openai_responses",
        "mixserve.router.openai_token_ids",
        "mixserve.router.openai_vllm",
        "mixserve.router.openapi",
        "mixserve.router.openapi_builders",
        "mixserve.router.openapi_info",
        "mixserve.router.openapi_openai",
        "mixserve.router.openapi_predict",
        "mixserve.router.openapi_responses",
        "mixserve.router.openapi_schemas",
        "mixserve.router.openapi_tgi",
        "mixserve.router.openapi_tokenize",
        "mixserve.router.responses_body",
        "mixserve.router.server",
        "mixserve.router.server_tls",
    }
)
# What a front may import of the router besides other fronts: the engine interface, the validation
# step (with its grammar compiler), and the request-level helpers (errors, parameter parsing, token text,
# the metrics registry).
FRONT_MAY_IMPORT = frozenset(
    {
        "mixserve.router.bad_words",
        "mixserve.router.detokenizer",
        "mixserve.router.engine_api",
        "mixserve.router.errors",
        "mixserve.router.fields",
        "mixserve.router.metrics",
        "mixserve.router.params",
        "mixserve.router.prediction",
        "mixserve.router.request_ids",
        "mixserve.router.structured",
        "mixserve.router.tool_turns",
        "mixserve.router.tools",
        "mixserve.router.validation",
    }
)
WIRE_MODULES = frozenset({"mixserve_pb.shard_pb2", "mixserve_pb.shard_pb2_grpc"})


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports anywhere (top level, functions, TYPE_CHECKING blocks), as dotted names;
    `from package import name` counts as importing `package.name` too, since name may be a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def router_modules() -> dict[str, Path]:
    return {f"mixserve.router.{path.stem}": path for path in sorted(ROUTER.glob("*.py")) if path.stem != "__init__"}


def import_graph() -> dict[str, set[str]]:
    """Router module -> the router modules it imports."""
    modules = router_modules()
    return {name: imported_modules(path) & modules.keys() for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c"], ["e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_walk_sees_every_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import torch.nn\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from mixserve.router.engine import Engine\n"
        "def f():\n    from mixserve.router import scheduler\n"
    )
    found = imported_modules(source)
    assert {"torch.nn", "mixserve.router.engine", "mixserve.router.scheduler"} <= found


def test_every_front_is_a_router_module():
    assert FRONTS | FRONT_MAY_IMPORT <= router_modules().keys()


def test_no_router_module_imports_torch():
    offenders = {
        name: sorted(m for m in imported_modules(path) if m == "torch" or m.startswith("torch."))
        for name, path in router_modules().items()
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_fronts_use_only_the_engine_interface():
    graph = import_graph()
    modules = router_modules()
    for front in sorted(FRONTS):
        internals = graph[front] - FRONTS - FRONT_MAY_IMPORT
        assert not internals, f"{front} imports engine internals {sorted(internals)}"
        wire = imported_modules(modules[front]) & WIRE_MODULES
        assert not wire, f"{front} imports the shard wire format {sorted(wire)}"


def test_the_validation_step_and_the_interface_stay_off_the_engine():
    graph = import_graph()
    for module in ("mixserve.router.engine_api", "mixserve.router.validation"):
        assert graph[module] <= FRONT_MAY_IMPORT, f"{module} imports {sorted(graph[module] - FRONT_MAY_IMPORT)}"


def test_only_the_shard_client_speaks_the_shard_wire_format():
    speakers = {name for name, path in router_modules().items() if imported_modules(path) & WIRE_MODULES}
    # The launcher's serving half reads the shards' Info and Warmup answers while it starts them.
    assert speakers <= {
        "mixserve.router.shard_client",
        "mixserve.router.launch_serving",
        "mixserve.router.shard_processes",
    }, speakers
    assert "mixserve.router.shard_client" in speakers


def test_the_grpc_front_needs_no_aiohttp():
    graph = import_graph()
    modules = router_modules()
    reached, todo = set(), ["mixserve.router.grpc_server"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    uses_aiohttp = {m for m in reached if any(n.split(".")[0] == "aiohttp" for n in imported_modules(modules[m]))}
    assert not uses_aiohttp, f"mixserve.router.grpc_server reaches aiohttp through {sorted(uses_aiohttp)}"


def test_no_import_cycle_in_the_router():
    assert find_cycles(import_graph()) == []


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def router_only_site(tmp_path: Path) -> Path:
    """A site-packages folder of what `pip install -r router/requirements.txt` installs: links to this
    environment's copies of those distributions and of everything they require, nothing else."""
    lines = (ROUTER / "requirements.txt").read_text().splitlines()
    keys, todo = set(), [line for line in lines if line.strip() and not line.startswith("#")]
    while todo:
        name = re.match(r"[A-Za-z0-9_.-]+", todo.pop()).group(0)
        if _key(name) in keys:
            continue
        keys.add(_key(name))
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo.extend(r for r in requires if "extra ==" not in r)
    site = tmp_path / "site-packages"
    site.mkdir()
    for dist in importlib.metadata.distributions():
        if _key(dist.metadata["Name"]) not in keys:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source, link = Path(dist.locate_file(top)), site / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return site


# Run as `python -m mixserve.cli launch ...` runs (runpy, __main__), with a thread that waits for /health,
# serves one /predict, then reports what the process has imported and stops it as a user would (SIGTERM).
LAUNCH_AND_REPORT = """
import json, os, runpy, signal, sys, threading, time, urllib.request

port, report_path = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}"


def wait_healthy(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def report() -> None:
    try:
        wait_healthy(300)
        body = json.dumps({"prompt": "The river", "max_new_tokens": 4, "stream": False}).encode()
        request = urllib.request.Request(f"{url}/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.load(r)
        torch_modules = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        with open(report_path, "w") as f:
            json.dump({"generated_tokens": answer["generated_tokens"], "torch_modules": torch_modules}, f)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # as a user stops it; the launcher stops its shards


threading.Thread(target=report, daemon=True).start()
sys.argv = ["mixserve", *sys.argv[3:]]
try:
    runpy.run_module("mixserve.cli", run_name="__main__")
finally:
    print("torch_at_exit=%s" % ("torch" in sys.modules), flush=True)
"""


def launch_and_report(tmp_path: Path, port: int, args: list[str], site: Path | None = None) -> dict:
    """Run `mixserve launch ARGS` on `port` as LAUNCH_AND_REPORT does; with `site`, in a Python that sees
    the standard library, the repository and that site-packages folder only. Its report, after it served
    one request and exited cleanly."""
    report_path = tmp_path / "report.json"
    python, script = [PYTHON], LAUNCH_AND_REPORT
    if site is not None:
        python += ["-S"]  # no site-packages of this environment
        script = f"import sys\nsys.path[:0] = {[str(site), str(REPO), str(REPO / 'proto')]!r}\n" + script
    done = subprocess.run(
        [*python, "-c", script, str(port), str(report_path), *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert report_path.exists(), (
        f"the router never served (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    report = json.loads(report_path.read_text())
    assert report["generated_tokens"] >= 1
    assert report["torch_modules"] == [], f"the router process imported {report['torch_modules'][:5]}"
    assert "torch_at_exit=False" in done.stdout, done.stdout[-3000:]
    assert done.returncode == 0, done.stdout[-3000:]
    return report


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_launched_router_never_imports_torch(demo_dir, tmp_path):
    args = ["launch", "--port", str(port := free_port()), "--model", str(demo_dir), "--num-shard", "1"]
    launch_and_report(tmp_path, port, [*args, "--max-kv-blocks", "64"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_router_only_install_serves_shards_on_another_host(demo_dir, tmp_path):
    """The router of `pip install -r router/requirements.txt && pip install --no-deps .`: in front of a
    shard started on its own (as on another host), it serves with nothing importable beyond what that
    install has."""
    shard_port, port = free_port(), free_port()
    cmd = [PYTHON, "-m", "mixserve.cli", "shard", "--model", str(demo_dir), "--port", str(shard_port)]
    with open(tmp_path / "shard.log", "w") as log:
        shard = subprocess.Popen(cmd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        args = ["launch", "--port", str(port), "--model", str(demo_dir)]
        site = router_only_site(tmp_path)
        launch_and_report(tmp_path, port, [*args, "--shard-addresses", f"127.0.0.1:{shard_port}"], site)
    finally:
        shard.terminate()
        shard.wait(timeout=60)


@pytest.mark.slow
def test_a_router_only_install_has_no_torch(tmp_path):
    """router_only_site (above) is no wider than a router-only install: the shards' own packages are missing."""
    site = router_only_site(tmp_path)
    probe = f"import sys\nsys.path[:0] = [{str(site)!r}]\nimport aiohttp, grpc, transformers, llguidance\n"
    probe += "for name in ('torch', 'accelerate', 'bitsandbytes'):\n    try:\n        __import__(name)\n"
    probe += "    except ModuleNotFoundError:\n        print('missing', name)\n"
    done = subprocess.run([PYTHON, "-S", "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["missing torch", "missing accelerate", "missing bitsandbytes"]
