"""Build this folder's C kernels with the machine's C compiler, load them with ctypes, and hold
whether they may run at all.

`select` (called by shards.ops.select, which picks each op's implementation) records the C side of
`--kernels`: `auto` (the C kernels where they build), `native` (the C kernels, or fail at start),
`torch` (never; the shared-memory collectives then take their torch path too).
Compiled once per source and machine (`-march=native`, so the cache key covers the CPU) into
$MIXSERVE_CACHE/kernels (default ~/.cache/mixserve/kernels); MIXSERVE_KERNEL_CFLAGS adds compiler
flags after those (tests build the fallback paths on a machine that has AVX-512 with `-mno-avx512f`,
or `-mno-avx2 -mno-fma` for plain C, then `forget_loaded`; the flags are part of the cache key).
Shard processes that start together build side by side and each moves its own file into place. A
machine without a C compiler keeps the torch paths: `load` raises KernelUnavailable and the caller decides.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from mixserve.shards.cache_dir import cache_root

log = logging.getLogger(__name__)

_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c11"]
# Linked in a step of its own, without -ffast-math: linking with it adds crtfastmath.o, whose
# constructor turns on flush-to-zero for the whole process that loads the library (torch's
# results would change with it; a hypothesis test caught it).
_LINK = ["-shared"]
_SOURCES = Path(__file__).parent
MODES = ("auto", "native", "torch")
# `--cpu-tiles` (the launcher's and a shard's): AMX's tiles for the larger bf16 products where the CPU has
# them (set_amx_tiles), or never. Here, torch-free, for the router's flags too.
TILE_MODES = ("auto", "off")
TILE_HELP = (
    "whether the C kernels' bf16 products of 1 MiB of weights and more run in AMX's tiles on CPUs with amx_bf16 "
    "(auto) or never (off: one stream a few percent faster, many streams slower)"
)
LIBRARIES = (
    "paged_attention",
    "prefill_attention",
    "moe",
    "sampling",
    "linear",
    "elementwise",
    "shm_exchange",
    "decoder_layer",
    "dequantize",
)
_loaded: dict[str, ctypes.CDLL] = {}
_choice = {"mode": "auto", "int8_bf16_activations": False, "amx_tiles": True}
_functions: dict[str, ctypes._CFuncPtr | None] = {}


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here (no C compiler, or it failed)."""


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def cpu_fingerprint() -> str:
    """What -march=native depends on: the machine type and the CPU's model and feature flags (also a key of
    the warm-up's stored timings)."""
    lines = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    lines.append(line.strip())
                    if len(lines) == 3:
                        break
    except OSError:
        pass
    return "\n".join(lines)


def _flags() -> list[str]:
    return _FLAGS + shlex.split(os.environ.get("MIXSERVE_KERNEL_CFLAGS", ""))


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable("no C compiler (cc, gcc or clang) on PATH")


def compiler_available() -> bool:
    """Whether a C compiler is on PATH to build the kernels."""
    try:
        _compiler()
    except KernelUnavailable:
        return False
    return True


def _build(name: str, folder: Path = _SOURCES) -> Path:
    source = folder / f"{name}.c"
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{compiler} --version failed: {e}") from e
    # Every source and header of the folder: a source may include others (decoder_layer.c does).
    sources = [path.read_text() for path in sorted(folder.glob("*.[ch]"))]
    key = hashlib.sha256(
        "\0".join([source.read_text(), *sources, " ".join(_flags() + _LINK), version, cpu_fingerprint()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".so")
    os.close(fd)
    try:
        obj = f"{partial}.o"
        for step in ([*_flags(), "-c", "-o", obj, str(source)], [*_LINK, "-o", partial, obj, "-lm"]):
            result = subprocess.run([compiler, *step], capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise KernelUnavailable(f"{compiler} failed on {source.name}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"building {source.name} failed: {e}") from e
    finally:
        for leftover in (partial, f"{partial}.o"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    log.info("event=kernel_built name=%s path=%s", name, target)
    return target


def load(name: str) -> ctypes.CDLL:
    """The shared library built from `<name>.c` beside this file (built on first use, then cached)."""
    if name not in _loaded:
        _loaded[name] = load_source(_SOURCES / f"{name}.c")
        _apply_modes(_loaded[name])
    return _loaded[name]


def load_source(source: Path) -> ctypes.CDLL:
    """The shared library built from the C file `source` (the kernels beside this file, or another, such as the
    benchmarks' read loop, built as they are); built on first use, then cached on disk."""
    path = _build(source.stem, source.parent)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"loading {path} failed: {e}") from e


def _apply_modes(lib: ctypes.CDLL) -> None:
    """Tell `lib` (if it holds rows_times_weight.h) whether int8 codes meet activations rounded to bf16 and
    whether bf16 weights may take AMX's tiles."""
    modes = (("kernel_set_int8_bf16_activations", "int8_bf16_activations"), ("kernel_set_amx_tiles", "amx_tiles"))
    for name, key in modes:
        setter = getattr(lib, name, None)
        if setter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
            setter(int(_choice[key]))


def set_int8_bf16_activations(on: bool) -> None:
    """Whether int8 weights meet their inputs rounded to bf16 in the CPU's bf16 dot product, where it has
    one (on for a bf16 model, whose activations are bf16: ops.select sets it), in the libraries loaded now
    and later; off, the inputs stay fp32 against the codes widened to fp32."""
    _set_mode("int8_bf16_activations", on)


def set_amx_tiles(on: bool) -> None:
    """Whether bf16 weights of 1 MiB and more take AMX's tiles where the CPU has them (rows_times_weight_amx.h),
    in the libraries loaded now and later: ops.select sets it from `--cpu-tiles`, before a process's first
    step."""
    _set_mode("amx_tiles", on)


def _set_mode(key: str, on: bool) -> None:
    _choice[key] = bool(on)
    for lib in _loaded.values():
        _apply_modes(lib)


def build_identity() -> dict:
    """The files of the libraries loaded now (their names hash the sources, flags, compiler and CPU they were
    built from) and the modes they run in: what a timing of the kernels depends on besides the shapes
    (shards/warmup_timings.py keys its stored timings on it)."""
    return {"libraries": sorted(Path(lib._name).name for lib in _loaded.values()), "modes": dict(_choice)}


def forget_loaded() -> None:
    """Drop the loaded libraries and the functions looked up in them: the next use builds (or finds in
    the cache) each library under the MIXSERVE_KERNEL_CFLAGS of then. How tests run the narrower
    vector paths on a machine that has the wider ones; the ops must be selected again after it."""
    _loaded.clear()
    _functions.clear()


def _chosen_library(library: str) -> ctypes.CDLL | None:
    """`library` under the current choice: None where torch is chosen, or (auto) it does not build;
    raises KernelUnavailable where native is chosen and it does not."""
    if _choice["mode"] == "torch":
        return None
    try:
        return load(library)
    except KernelUnavailable as e:
        if _choice["mode"] == "native":
            raise
        log.warning("event=kernel_unavailable name=%s fallback=torch reason=%r", library, str(e))
        return None


def select(mode: str, libraries: tuple[str, ...] = ()) -> bool:
    """Choose whether the C kernels run, and build `libraries` now (not on the first request) unless
    `mode` is torch. Returns whether they will run for fp32 CPU tensors; raises KernelUnavailable if
    `mode` is native and one cannot be built."""
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {', '.join(MODES)}, got {mode!r}")
    _choice["mode"] = mode
    _functions.clear()
    return mode != "torch" and all(_chosen_library(library) is not None for library in libraries)


def function(library: str, name: str, argtypes: list | None = None) -> "ctypes._CFuncPtr | None":
    """C function `name` of `<library>.c` under the current choice (argtypes set on first use, int
    result), or None where the torch path should run: torch chosen, or (auto) it does not build."""
    key = f"{library}.{name}"
    if key not in _functions:
        lib = _chosen_library(library)
        fn = None if lib is None else getattr(lib, name)
        if fn is not None:
            if argtypes is not None:
                fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        _functions[key] = fn
    return _functions[key]
