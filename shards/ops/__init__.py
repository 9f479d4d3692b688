"""The shard's ops, and the one place that picks which implementation of each runs.

`select(mode, device, dtype)` runs once per shard at start-up (from `--kernels`) and returns an `Ops`:
one function per op, the same signature in every backend. Layers and the model call ops by name on
`current()` and never ask whether a kernel is usable; an op whose kernel has shape limits (heads,
tokens, rows) checks them itself and takes the torch reference past them.

Backends, per op, over the torch reference (`shards.ops.reference`, any dtype and device):
- `cpu` (shards/ops/cpu.py): the C kernels, for fp32 or bf16 models on the CPU (`auto` where they
  build, `native` or fail). In bf16 the kernels that read weights and the KV cache take them in bf16
  with fp32 activations (rounded to bf16 into a matmul where the CPU has the bf16 dot product) and
  fp32 accumulation; rotary takes the torch path (see shards/ops/cpu.py). `kernels_report` says
  which path the C kernels took on this CPU (start-up log, /info).
- `triton`: the functions named like the ops in the `shards.triton` package, for CUDA (`auto` where
  it imports) and, under TRITON_INTERPRET=1, for CPU tests (`--kernels triton`).
Adding a kernel for an op is one function of the op's name in its backend.
"""

import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from mixserve.shards.kernels import moe, native
from mixserve.shards.kernels.native import KernelUnavailable
from mixserve.shards.ops import cpu, reference

log = logging.getLogger(__name__)

MODES = ("auto", "native", "triton", "torch")
MODE_HELP = (
    "which implementation runs each op (attention, MoE routing and experts, norms, rotary, LM head, greedy): "
    "auto (the C kernels for fp32 and bf16 on CPU where a C compiler builds them, the Triton kernels on CUDA "
    "where shards.triton imports, else torch), native (the C kernels, or fail at start; fp32 or bf16 "
    "on CPU only), triton (the Triton kernels, or fail; on CPU under TRITON_INTERPRET=1, for tests), "
    "torch (the torch reference everywhere)"
)


@dataclass(frozen=True, slots=True)
class Ops:
    """One implementation per op, chosen by `select`; see shards.ops.reference for each signature."""

    rms_norm: Callable
    rotary: Callable
    write_kv: Callable
    rotary_write_kv: Callable
    paged_decode_attention: Callable
    paged_prefill_attention: Callable
    topk_softmax: Callable
    fused_moe: Callable
    linear_rows: Callable
    decoder_layers: Callable
    causal_lm: Callable
    row_argmax_logsumexp: Callable
    slice_greedy_stats: Callable
    combine_greedy: Callable
    apply_token_bitmask: Callable
    draw_tokens: Callable
    # Each op's backend: torch (the reference), native (the C kernels) or triton.
    backends: dict[str, str]
    # The most tokens a step may have for `decoder_layers` to run it in the CPU decoder layer kernel
    # (the runner then builds per-token block tables); 0 where another implementation runs it.
    decoder_layers_max_tokens: int = 0
    # Whether a step past that cap runs in the kernel too, in tiles of that many tokens one after another
    # (shards/kernel_tokens.py sets it where the kernel was clearly ahead of torch's layers at the cap).
    decoder_layers_tiles: bool = False

    @property
    def per_token_max(self) -> int:
        """The most tokens of a step the runner builds per-token block tables for."""
        return sys.maxsize if self.decoder_layers_tiles else self.decoder_layers_max_tokens


OP_NAMES = tuple(f.name for f in fields(Ops) if f.type is Callable)
_REFERENCE = {name: getattr(reference, name) for name in OP_NAMES}
_current: list[Ops] = []


def select(mode: str, device: torch.device, dtype: torch.dtype, amx_tiles: bool = True) -> Ops:
    """Choose each op's implementation for a shard on `device` computing in `dtype`, make it the
    process's `current()` and return it. Builds the C kernels now (not on the first request) unless
    torch or triton is chosen; raises KernelUnavailable where `native` or `triton` is asked for and
    cannot run, ValueError for an unknown mode. `amx_tiles` (`--cpu-tiles`): whether the C kernels' larger
    bf16 products may run in AMX's tiles where the CPU has them."""
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {', '.join(MODES)}, got {mode!r}")
    chosen = dict(_REFERENCE)
    backends = dict.fromkeys(OP_NAMES, "torch")
    max_tokens = 0
    # The C collectives (shm_exchange) follow the mode too, whatever the model's dtype.
    native.select({"native": "native", "auto": "auto"}.get(mode, "torch"), native.LIBRARIES)
    # A bf16 model's int8 weights meet its bf16 activations in the CPU's bf16 dot product, as bf16 weights do.
    native.set_int8_bf16_activations(dtype is torch.bfloat16)
    native.set_amx_tiles(amx_tiles)
    cpu_kernels = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    if mode == "native" and not cpu_kernels:
        raise KernelUnavailable(f"the C kernels run fp32 or bf16 on the CPU, not {dtype} on {device}")
    if mode in ("auto", "native") and cpu_kernels:
        built = cpu.available()
        for name in (
            name for name, ok in built.items() if ok and (dtype == torch.float32 or name not in cpu.FP32_ONLY_OPS)
        ):
            chosen[name], backends[name] = getattr(cpu, name), "native"
        if built["decoder_layers"]:
            max_tokens = cpu.decoder_layer.max_tokens()
    if mode == "triton" or (mode == "auto" and device.type == "cuda"):
        for name, fn in _triton_ops(device, required=mode == "triton").items():
            chosen[name], backends[name] = fn, "triton"
    ops = Ops(**chosen, backends=backends, decoder_layers_max_tokens=max_tokens)
    _current[:] = [ops]
    report = kernels_report(ops, dtype)
    int16_codes = "native" in backends.values() and dtype is torch.bfloat16 and moe.int8_int16_dot_products()
    log.info(
        "event=ops kernels=%s device=%s dtype=%s vector_floats=%d bf16_dot_products=%s amx_tile_products=%s "
        "int8_int16_dot_products=%s %s",
        mode,
        device,
        str(dtype).removeprefix("torch."),
        report["vector_floats"],
        str(report["bf16_dot_products"]).lower(),
        str(report["amx_tile_products"]).lower(),
        str(int16_codes).lower(),
        " ".join(f"{name}={backend}" for name, backend in backends.items()),
    )
    return ops


def kernels_report(chosen: Ops, dtype: torch.dtype) -> dict:
    """What the start-up log and /info say of `chosen` for a model in `dtype`: each op's backend, the C
    kernels' vector width in floats (16 AVX-512, 8 AVX2, 1 plain C; 0 where no op runs them) and whether
    the model's bf16 weights (and int8 codes) meet their inputs in the CPU's bf16 dot product, and its
    larger bf16 products in AMX's tiles (both False for other dtypes)."""
    runs_c = "native" in chosen.backends.values()
    bf16_dot = runs_c and dtype is torch.bfloat16 and moe.bf16_dot_products()
    return {
        "backends": dict(chosen.backends),
        "vector_floats": moe.vector_floats() if runs_c else 0,
        "bf16_dot_products": bf16_dot,
        "amx_tile_products": bf16_dot and moe.amx_tile_products(),
    }


def _triton_ops(device: torch.device, required: bool) -> dict[str, Callable]:
    """The ops the shards.triton package implements (functions of the ops' names): compiled for a
    CUDA device, interpreted for the CPU (the tests' mode, ~20-30 ms a kernel program)."""
    if device.type == "cpu":
        # Read when triton is imported: the interpreter runs the kernels on CPU tensors. Set here, in
        # the shard itself, since a launcher's environment need not carry it.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        importlib.import_module("triton")
        module = importlib.import_module("mixserve.shards.triton")
    except ImportError as e:
        return _triton_unavailable(f"the Triton kernels are not available: {e}", required)
    if (device.type == "cpu") != module.interpreted():
        # Compiled kernels refuse CPU tensors and interpreted ones CUDA tensors: every op would take the
        # torch reference while the table says triton (and a captured decode step would sync).
        mode = "interpreted" if module.interpreted() else "compiled"
        return _triton_unavailable(
            f"the Triton kernels are {mode} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} when triton "
            f"was imported), which {device.type} tensors cannot run",
            required,
        )
    return {name: getattr(module, name) for name in OP_NAMES if callable(getattr(module, name, None))}


def _triton_unavailable(reason: str, required: bool) -> dict[str, Callable]:
    if required:
        raise KernelUnavailable(reason)
    log.warning("event=kernel_unavailable name=triton fallback=torch reason=%r", reason)
    return {}


def set_decoder_layer_tokens(tokens: int, tiles: bool = False) -> Ops:
    """Set the current ops' `decoder_layers_max_tokens` to `tokens`, and whether longer steps run in tiles
    of it (`decoder_layers_tiles`), where the kernel runs them at all (shards/kernel_tokens.py measures
    both)."""
    ops = current()
    if ops.decoder_layers_max_tokens:
        _current[:] = [replace(ops, decoder_layers_max_tokens=tokens, decoder_layers_tiles=tiles)]
    return _current[0]


def current() -> Ops:
    """The ops `select` chose for this process; before any choice, `auto` for fp32 on the CPU."""
    if not _current:
        select("auto", torch.device("cpu"), torch.float32)
    return _current[0]
