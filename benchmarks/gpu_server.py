"""`bench gpu` part (b): the whole server at TP 1 on Mixtral-8x7B's shapes with random weights, under load.

A directory with Mixtral-8x7B's config.json and the demo tokenizer's files (no weights) is served by
`mixserve launch --load-format dummy --num-shard 1 --device cuda` (bf16: ~93 GB on one GPU) and
driven by `bench serve` at a few concurrency levels. Anything that stops the server from starting
(a missing package, a mixserve without `--load-format`, no GPU) becomes one `skipped` line in the
results instead of an error: the kernel figures of part (a) stand without it.
"""

import asyncio
import importlib.util
import json
import logging
import subprocess
import time
from pathlib import Path

from benchmarks.processes import PYTHON, ServerProcess, child_env, free_port
from benchmarks.serve import ServeConfig, run_benchmark
from benchmarks.workload import WorkloadConfig

log = logging.getLogger("mixserve.bench")

# config.json of mistralai/Mixtral-8x7B-v0.1 (transformers 5 field names).
MIXTRAL_8X7B_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "bfloat16",
    "eos_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "router_aux_loss_coef": 0.02,
    "router_jitter_noise": 0.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 32000,
}

# What the router and a shard import at start-up beyond torch (pyproject's dependencies).
SERVER_MODULES = (
    "aiohttp",
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "google.protobuf",
    "prometheus_client",
    "jinja2",
    "tokenizers",
    "transformers",
    "safetensors",
    "accelerate",
)


def write_model_dir(out_dir: Path) -> Path:
    """Mixtral-8x7B's config.json with the demo tokenizer's files (ids below its 32000 vocab), no weights.

    The demo tokenizer's BOS and EOS ids are the config's, so prompts and stops mean the same."""
    from shards.demo.checkpoint import BOS_TOKEN_ID, EOS_TOKEN_ID, DemoConfig, generation_config
    from shards.demo.tokenizer import write_tokenizer_files

    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(MIXTRAL_8X7B_CONFIG, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    write_tokenizer_files(out_dir, DemoConfig().vocab_size, config["max_position_embeddings"])
    return out_dir


def missing_modules() -> list[str]:
    """The server's start-up imports that are not installed here."""
    missing = []
    for name in SERVER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def launch_supports_dummy_weights() -> bool:
    """Whether the installed mixserve's `launch` takes `--load-format` (its help lists it)."""
    try:
        help_text = subprocess.run(
            [PYTHON, "-m", "mixserve.cli", "launch", "--help"],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except subprocess.TimeoutExpired:
        return False
    return "--load-format" in help_text


def skip_reason(device_type: str) -> str | None:
    """Why the server part cannot run here, or None."""
    if device_type != "cuda":
        return "no CUDA device: the server part runs Mixtral-8x7B's real shapes on one GPU"
    missing = missing_modules()
    if missing:
        return f"the server's imports are not installed: {', '.join(missing)} (carry them as wheels)"
    if not launch_supports_dummy_weights():
        return "this mixserve's launch has no --load-format (random weights from a config-only directory)"
    return None


def run_server(
    out_dir: Path,
    budget_s: float,
    concurrency: list[int],
    input_len: int,
    output_len: int,
) -> dict:
    """Start the server, sweep the levels within budget_s (start-up included), stop it; the summaries."""
    model_dir = write_model_dir(out_dir / "mixtral-8x7b-config")
    port = free_port()
    cmd = [
        *(PYTHON, "-m", "mixserve.cli", "launch"),
        *("--model", str(model_dir), "--load-format", "dummy", "--num-shard", "1", "--device", "cuda"),
        *("--dtype", "bfloat16", "--port", str(port), "--max-batch-size", str(max(concurrency))),
    ]
    started = time.monotonic()
    server = ServerProcess("mixserve", cmd, out_dir / "server.log", child_env())
    result: dict = {"status": "failed", "command": " ".join(cmd[1:]), "levels": []}
    url = f"http://127.0.0.1:{port}"
    try:
        result["startup_s"] = server.wait_http_ready(f"{url}/health", timeout_s=budget_s * 0.6)
        for level in concurrency:
            if time.monotonic() - started > budget_s:
                result["levels"].append({"concurrency": level, "skipped": "time budget spent"})
                continue
            config = ServeConfig(
                url=url,
                model_dir=str(model_dir),
                concurrency=[level],
                num_prompts=max(level, 4),
                warmup=1,
                workload=WorkloadConfig(input_len, output_len, 0.0, 0),
                timeout_s=max(30.0, budget_s - (time.monotonic() - started)),
                progress=False,
            )
            levels = asyncio.run(run_benchmark(config, "mixserve-tp1"))["levels"]
            result["levels"].append({"concurrency": level, **levels[0]["summary"]})
        result["status"] = "ran"
    except (RuntimeError, TimeoutError, OSError) as error:
        result["error"] = str(error).splitlines()[0]
        log.warning("event=server_failed error=%s", result["error"])
    finally:
        server.stop()
    result["log"] = "server.log"
    return result
