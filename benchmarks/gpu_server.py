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
import shutil
import subprocess
import time
from pathlib import Path

from mixserve.benchmarks.processes import PYTHON, ServerProcess, child_env, free_port

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
    from mixserve.shards.demo.checkpoint import BOS_TOKEN_ID, EOS_TOKEN_ID, DemoConfig, generation_config
    from mixserve.shards.demo.tokenizer import write_tokenizer_files

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


def launch_help() -> tuple[bool, str]:
    """(whether `mixserve launch --help` ran, its help text or its error's last line): the router's
    imports (the gRPC stubs against the installed protobuf, too) load as they would at start-up."""
    try:
        done = subprocess.run(
            [PYTHON, "-m", "mixserve.cli", "launch", "--help"],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return False, "`mixserve launch --help` did not answer within 120 s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return False, lines[-1]
    return True, done.stdout


def launch_supports_dummy_weights() -> bool:
    """Whether the installed mixserve's `launch` takes `--load-format` (its help lists it)."""
    ran, text = launch_help()
    return ran and "--load-format" in text


def skip_reason(device_type: str) -> str | None:
    """Why the server part cannot run here, or None."""
    if device_type != "cuda":
        return "no CUDA device: the server part runs Mixtral-8x7B's real shapes on one GPU"
    missing = missing_modules()
    if missing:
        return f"the server's imports are not installed: {', '.join(missing)} (carry them as wheels)"
    ran, text = launch_help()
    if not ran:
        return f"mixserve launch cannot start here: {text}"
    if "--load-format" not in text:
        return "this mixserve's launch has no --load-format (random weights from a config-only directory)"
    return None


def mixtral_launch_args(scratch: Path) -> list[str]:
    """The GPU run's model: Mixtral-8x7B's config (written under scratch) with random bf16 weights made
    on one GPU."""
    model_dir = write_model_dir(scratch / "mixtral-8x7b-config")
    return ["--model", str(model_dir), "--load-format", "dummy", "--device", "cuda", "--dtype", "bfloat16"]


# A dry run's server: its KV cache capped (sized from memory it is 2 GiB, whose zeroing is ~2 s of a start).
DRY_RUN_CPU = ("--device", "cpu", "--max-kv-blocks", "2048")


def demo_launch_args(scratch: Path) -> list[str]:
    """The dry run's model: the demo on the CPU, through the GPU run's path where this mixserve has it
    (its config.json and tokenizer alone, random weights), else from its checkpoint."""
    from mixserve.shards.demo.checkpoint import ensure_demo_checkpoint

    demo = ensure_demo_checkpoint()
    if not launch_supports_dummy_weights():
        return ["--model", str(demo), *DRY_RUN_CPU]
    config_only = scratch / "demo-config"
    config_only.mkdir(parents=True, exist_ok=True)
    for path in demo.iterdir():
        if path.is_file() and path.suffix == ".json":
            shutil.copy(path, config_only / path.name)
    (config_only / "model.safetensors.index.json").unlink(missing_ok=True)
    return ["--model", str(config_only), "--load-format", "dummy", *DRY_RUN_CPU]


def decode_ms(summary: dict) -> float | None:
    """A level's decode time a token from the server's token counts: (E2E p50 - TTFT p50) over a request's
    tokens less one. The client's ITL and TPOT count streamed chunks that carry text, and random weights
    make many tokens decode to none (the demo tokenizer's 8192 pieces against Mixtral's 32000 ids): on
    the first H200 run they read 2-3x this."""
    per_request = summary["output_tokens_server"] / max(summary["requests"], 1)
    if per_request < 2 or summary["e2e_ms"]["p50"] is None or summary["ttft_ms"]["p50"] is None:
        return None
    return round((summary["e2e_ms"]["p50"] - summary["ttft_ms"]["p50"]) / (per_request - 1), 3)


def run_server(
    out_dir: Path,
    model_args: list[str],
    budget_s: float,
    concurrency: list[int],
    input_len: int,
    output_len: int,
    *,
    workload: str = "random",
    num_prompts: int = 0,
    name: str = "server",
) -> dict:
    """Start one shard's server on `model_args` (`--model DIR ...`), sweep the levels within budget_s
    (start-up included), stop it; the levels' summaries, the speculation counters where it speculates, and
    a predicted-outputs check after them (benchmarks/prediction_check.py).

    Each level sends max(num_prompts, level, 2) prompts of the `workload` kind; the log is `<name>.log`."""
    # The load generator's imports (aiohttp, tokenizers) load only here: the kernel part runs without them.
    from mixserve.benchmarks.compare import read_speculation
    from mixserve.benchmarks.prediction_check import check_prediction
    from mixserve.benchmarks.serve import ServeConfig, run_benchmark
    from mixserve.benchmarks.workload import WorkloadConfig

    model_dir = model_args[model_args.index("--model") + 1]
    port = free_port()
    cmd = [
        *(PYTHON, "-m", "mixserve.cli", "launch", *model_args, "--num-shard", "1"),
        *("--port", str(port), "--max-batch-size", str(max(concurrency))),
        # Sequences no longer than the workload's (with room for BOS and the template): the start-up
        # warm-up and KV sizing see the steps this load makes, not the model's 32k context.
        *("--max-total-tokens", str(2 * (input_len + output_len))),
    ]
    started = time.monotonic()
    env = child_env()
    env.pop("TRITON_INTERPRET", None)  # the dry run's interpreter is for the kernel part, not the server's shards
    server = ServerProcess(name, cmd, out_dir / f"{name}.log", env)
    result: dict = {"status": "failed", "command": " ".join(["mixserve", *cmd[3:]]), "levels": []}
    url = f"http://127.0.0.1:{port}"
    try:
        result["startup_s"] = server.wait_http_ready(f"{url}/health", timeout_s=budget_s * 0.6)
        for level in concurrency:
            if time.monotonic() - started > budget_s:
                result["levels"].append({"concurrency": level, "skipped": "time budget spent"})
                continue
            config = ServeConfig(
                url=url,
                model_dir=model_dir,
                concurrency=[level],
                num_prompts=max(num_prompts, level, 2),
                warmup=1,
                workload=WorkloadConfig(input_len, output_len, 0.0, 0, workload),
                timeout_s=max(30.0, budget_s - (time.monotonic() - started)),
                progress=False,
            )
            levels = asyncio.run(run_benchmark(config, name))["levels"]
            summary = levels[0]["summary"]
            result["levels"].append({"concurrency": level, **summary, "decode_ms": decode_ms(summary)})
        result["speculation"] = read_speculation(url)
        # After the counters: a request with a prediction speculates on any server.
        result["prediction"] = check_prediction(url, output_len, timeout_s=max(30.0, budget_s / 4))
        log.info("event=prediction_check %s", " ".join(f"{k}={v}" for k, v in result["prediction"].items()))
        result["status"] = "ran"
    except (RuntimeError, TimeoutError, OSError) as error:
        result["error"] = str(error).splitlines()[0]
        log.warning("event=server_failed error=%s", result["error"])
    finally:
        server.stop()
    result["log"] = f"{name}.log"
    return result
