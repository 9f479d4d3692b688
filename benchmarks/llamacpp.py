"""llama.cpp's `llama-server` as a peer of `bench compare`: find it, convert the checkpoint, size its slots.

The server is found, never built (recipe in benchmarks/peers.md): `--llama-server`, else
`$MIXSERVE_LLAMA_SERVER`, then under `$MIXSERVE_CACHE/peers/llama.cpp`. llama.cpp's converter
(`convert_hf_to_gguf.py`) is looked for beside the binary and at the root of the llama.cpp tree it
was built in. The checkpoint is converted once per (checkpoint, dtype) into the peers cache, keyed by
its files' names, sizes and modification times, so a retrained checkpoint is converted again.

The server gets one slot per request the client keeps in flight (the highest concurrency of the
sweep) and `-c` the total context of all slots (llama-server splits `-c` evenly over them), and as
many threads as this process may use.
"""

import hashlib
import logging
import os
import subprocess
from pathlib import Path

from mixserve.benchmarks.processes import PYTHON, REPO, child_env
from mixserve.shards.cache_dir import cache_root

log = logging.getLogger("mixserve.bench")

DTYPES = ("f32", "bf16", "q8_0")
# Per-slot context beyond prompt + output: the BOS llama-server adds and a few spare positions.
CONTEXT_MARGIN = 16
CONVERTER = "convert_hf_to_gguf.py"


def peers_dir() -> Path:
    """$MIXSERVE_CACHE/peers (MIXSERVE_CACHE defaults to ~/.cache/mixserve)."""
    return cache_root() / "peers"


def server_candidates(given: Path | None) -> list[Path]:
    """Where to look for `llama-server`: the flag, else $MIXSERVE_LLAMA_SERVER, then the peers cache
    (the binary itself, or a llama.cpp tree with its cmake build)."""
    if given is not None:
        return [given]
    home = peers_dir() / "llama.cpp"
    defaults = [home / "llama-server", home / "build" / "bin" / "llama-server"]
    variable = os.environ.get("MIXSERVE_LLAMA_SERVER")
    return [Path(variable), *defaults] if variable else defaults


def find_server(candidates: list[Path]) -> Path | None:
    """The first candidate that is an executable file."""
    return next((path for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


def find_converter(server: Path) -> Path | None:
    """llama.cpp's converter: beside the binary, or at the root of the tree it was built in (build/bin)."""
    binary_dir = server.resolve().parent
    places = (binary_dir, binary_dir.parent, binary_dir.parent.parent)
    return next((place / CONVERTER for place in places if (place / CONVERTER).is_file()), None)


def context_size(slots: int, input_len: int, output_len: int, margin: int = CONTEXT_MARGIN) -> int:
    """llama-server's `-c`: every slot holds a whole request (prompt, output and the margin)."""
    if slots < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"slots, input_len and output_len must be >= 1, got {slots}, {input_len}, {output_len}")
    return slots * (input_len + output_len + margin)


def checkpoint_key(model_dir: Path) -> str:
    """A short hash of the checkpoint directory's files (name, size, modification time)."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def gguf_path(model_dir: Path, dtype: str, cache_dir: Path | None = None) -> Path:
    """Where the GGUF of `model_dir` in `dtype` is cached."""
    if dtype not in DTYPES:
        raise ValueError(f"llama.cpp dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cache_dir = cache_dir or peers_dir() / "llama.cpp" / "gguf"
    return cache_dir / f"{model_dir.name}-{checkpoint_key(model_dir)}-{dtype}.gguf"


def ensure_gguf(converter: Path, model_dir: Path, dtype: str, log_path: Path, cache_dir: Path | None = None) -> Path:
    """The cached GGUF of `model_dir` in `dtype`, converted first if missing (the converter's output
    goes to `log_path`); raises RuntimeError with the log's tail when the conversion fails."""
    out = gguf_path(model_dir, dtype, cache_dir)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".partial-{os.getpid()}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, "-m", "mixserve.benchmarks.llamacpp_gguf", str(converter), str(model_dir), str(partial), dtype]
    log.info("event=gguf_convert model=%s dtype=%s out=%s", model_dir, dtype, out)
    with open(log_path, "w") as log_file:
        code = subprocess.run(cmd, env=child_env(), cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT).returncode
    if code != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        tail = log_path.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"GGUF conversion failed (exit {code}), log {log_path}:\n{tail}")
    partial.rename(out)
    return out


def server_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def server_command(server: Path, gguf: Path, port: int, slots: int, context: int, threads: int) -> list[str]:
    """llama-server on loopback with `slots` parallel sequences sharing `context` tokens."""
    return [
        str(server),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(context),
        "-np",
        str(slots),
        "-t",
        str(threads),
        "--cont-batching",
        "--no-webui",
    ]
