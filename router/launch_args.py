"""`mixserve launch`'s flags: what each means, its default, and the checks on its value.

Parsing only: router/launcher.py reads the parsed flags and starts the shards and the router.
"""

import argparse
import os
from pathlib import Path
from urllib.parse import urlsplit

from mixserve.router.chat_template import ChatTemplate, read_chat_template
from mixserve.router.engine_api import SCHEDULING_POLICIES
from mixserve.router.params import MAX_BEST_OF, MAX_CHOICES, MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS
from mixserve.router.speculation import MAX_BATCH
from mixserve.shards import proposal_length, warmup_timings
from mixserve.shards.kernels import native
from mixserve.shards.quant.config import QUANTIZE_MODES

# --stream-interval-ms: its default, and its ceiling (the proto's microseconds are a uint32; past a
# second, a stream would no longer look like one). The default is under a display frame (16.7 ms at
# 60 Hz), so a stream still reads as continuous, while a model stepping in ~1 ms wakes its sender once
# every several steps instead of every other.
DEFAULT_STREAM_INTERVAL_MS = 10.0
MAX_STREAM_INTERVAL_MS = 1000.0


def _seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}")
    return seconds


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def _chat_template(value: str) -> ChatTemplate:
    try:
        return read_chat_template(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_origin(value: str) -> str:
    """`value` as --cors-allow-origin takes it (router/cors.py): `*`, or an origin as browsers send it
    (`scheme://host[:port]`, no path, no trailing slash). Raises ArgumentTypeError otherwise."""
    if value == "*":
        return value
    parts = urlsplit(value)
    if not parts.scheme or not parts.netloc or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        hint = f" (without the trailing slash: {value.rstrip('/')!r})" if parts.path == "/" else ""
        raise argparse.ArgumentTypeError(f"{value!r} is not an origin: scheme://host[:port], as browsers send it{hint}")
    return value


def _stream_interval_ms(value: str) -> float:
    ms = float(value)
    if not 0 <= ms <= MAX_STREAM_INTERVAL_MS:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_STREAM_INTERVAL_MS:g} ms, got {value}")
    return ms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument(
        "--model",
        help="checkpoint directory, as `hf download ID --local-dir DIR` writes it (default: the built-in demo "
        "model, cached; its weights are random, so its text is meaningless)",
    )
    parser.add_argument(
        "--num-shard",
        type=int,
        help="tensor-parallel shard processes per group (default: on a CUDA host one per GPU, divided among "
        "--replicas; on CPU one per core, as one single-threaded shard per core serves fastest; either way the "
        "most that the model's heads, KV heads and experts divide evenly)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the router binds")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port the router binds")
    parser.add_argument("--grpc-port", type=int, default=0, help="public gRPC generation service port (0: off)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16, float16 or auto (bfloat16 on CPUs with avx512_bf16 and on GPUs with bf16, else "
        "float32 on CPU, float16 on GPU)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="the KV cache's dtype: auto (the model's, --dtype), float32 or bfloat16 (the host check refuses "
        "others). On CPU, bfloat16 under a "
        "float32 model holds twice the tokens in the same memory and halves the bytes a decode's attention "
        "reads; on a GPU only the model's dtype",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="shard device: auto (cuda where torch sees a GPU, else cpu), cpu, cuda (shard r of group g on GPU "
        "g x num-shard + r), or cuda:N (one shard)",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="bitsandbytes LLM.int8 or 4-bit shards, or int8-wo (weight-only int8 with per-channel scales, CPU "
        "only, read in place by the C kernels) (default: not quantized)",
    )
    parser.add_argument(
        "--moe-parallel",
        choices=["tp", "ep"],
        default="tp",
        help="experts split on the intermediate dimension (tp) or whole experts per shard (ep)",
    )
    parser.add_argument(
        "--kernels",
        choices=["auto", "native", "triton", "torch"],
        default="auto",
        help="which implementation runs each of the shards' ops: the C kernels for fp32 on CPU where they build and "
        "the Triton kernels on CUDA where triton imports (auto), the C kernels or refuse (native), the Triton kernels "
        "or refuse (triton; on CPU under Triton's interpreter, for tests), the torch reference (torch)",
    )
    parser.add_argument("--cpu-tiles", choices=native.TILE_MODES, default="auto", help=native.TILE_HELP)
    parser.add_argument(
        "--warmup-timings", choices=warmup_timings.MODES, default="stored", help=warmup_timings.MODE_HELP
    )
    parser.add_argument(
        "--cuda-graphs",
        choices=["auto", "off", "eager"],
        default="auto",
        help="decode steps replayed as CUDA graphs, one per batch-size bucket: on CUDA without --quantize (auto), "
        "never (off), or their static buffers without capture on any device (eager)",
    )
    parser.add_argument(
        "--max-graph-batch",
        type=_non_negative_int,
        default=0,
        help="most tokens a step replayed from a CUDA graph has (decodes, speculative verifications); larger steps run "
        "uncaptured (0: --max-batch-size, at least 32)",
    )
    parser.add_argument(
        "--load-format",
        choices=["auto", "dummy"],
        default="auto",
        help="shards' weights: the safetensors checkpoint (auto) or random ones of its shapes, made on the device "
        "from config.json alone (dummy)",
    )
    parser.add_argument(
        "--shard-addresses",
        help="host:port,... of a shard group already running, in rank order: start no shards, serve those "
        "(default: start the shards here)",
    )
    parser.add_argument(
        "--shard-group",
        action="append",
        dest="shard_groups",
        metavar="ADDRS",
        help="host:port,... of one shard group already running, as --shard-addresses; repeat it for several groups "
        "(default: none)",
    )
    parser.add_argument(
        "--replicas", type=_positive_int, default=1, help="shard groups of --num-shard shards each to start"
    )
    parser.add_argument(
        "--shard-token", default=env.get("MIXSERVE_SHARD_TOKEN") or None, help="default: $MIXSERVE_SHARD_TOKEN"
    )
    parser.add_argument(
        "--shard-ca", type=Path, help="PEM CA certificate(s): reach TCP shards over TLS (default: plain TCP)"
    )
    parser.add_argument("--block-size", type=int, default=16, help="KV cache tokens per block")
    parser.add_argument("--max-kv-blocks", type=int, default=0, help="cap on KV cache blocks (0: from memory)")
    parser.add_argument("--max-concurrent-requests", type=int, default=128, help="queued + running (429 past it)")
    parser.add_argument(
        "--scheduling-policy",
        choices=SCHEDULING_POLICIES,
        default="fcfs",
        help="fcfs: first come, first served; priority: a request's priority (lower first, vLLM's) orders the "
        "queue, and a better request preempts worse running ones when it finds no room",
    )
    parser.add_argument("--max-input-tokens", type=int, default=None, help="default: max-total-tokens - 1")
    parser.add_argument("--max-total-tokens", type=int, default=None, help="prompt + new tokens (default: model max)")
    parser.add_argument(
        "--max-batch-prefill-tokens",
        type=int,
        default=None,
        help="prompt tokens per step (default: 256 on CPU shards, 4096 on GPUs)",
    )
    parser.add_argument(
        "--max-batch-total-tokens", type=int, default=None, help="KV tokens the batch may hold (default: the KV cache)"
    )
    parser.add_argument("--max-batch-size", type=int, default=256, help="sequences running at once")
    parser.add_argument(
        "--max-decode-steps",
        type=int,
        default=64,
        help="decode steps the shards may run per call when nothing waits (1: one per call)",
    )
    parser.add_argument(
        "--stream-interval-ms",
        type=_stream_interval_ms,
        default=DEFAULT_STREAM_INTERVAL_MS,
        help="the shards send a multi-step run's steps at most once per this many ms, the steps finished "
        "meanwhile in one message: a step finishing sooner waits for the next one (0: each step as it finishes)",
    )
    parser.add_argument(
        "--speculate",
        type=_non_negative_int,
        default=0,
        help="tokens proposed per decode, verified in one step (0: off, but for requests with an OpenAI "
        "prediction, which propose from it either way); by n-gram lookup in the request's own tokens unless "
        "--speculative-model is given; structured output proposes the tokens its grammar forces",
    )
    parser.add_argument(
        "--speculative-model",
        metavar="DIR",
        help="draft model checkpoint with the model's tokenizer, run whole on every shard to propose the --speculate "
        "tokens (default: n-gram proposals); shards started elsewhere need the same flag",
    )
    parser.add_argument(
        "--speculate-history-tokens",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="n-gram speculation also looks up the tokens of recently finished requests, up to N of them, where a "
        "request's own tokens hold no match (0: off; other requests' text then shapes a request's timing)",
    )
    parser.add_argument(
        "--speculate-length",
        choices=proposal_length.MODES,
        default="adaptive",
        help="adaptive: each request's n-gram proposals per step start at --speculate K and follow what its "
        "verifications kept (two more after one that kept all, one fewer after one that did not, 1 to K); "
        "fixed: K every step. Shards started elsewhere take `mixserve shard --speculate-length`",
    )
    parser.add_argument(
        "--speculate-max-batch",
        type=_positive_int,
        default=MAX_BATCH,
        help="running requests above which decodes do not speculate (verification then costs more than it saves)",
    )
    parser.add_argument(
        "--speculate-constrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="without --speculate, grammar-constrained requests (JSON schemas, regular expressions, choices, forced "
        "tool calls) still speculate: the tokens their grammar forces (keys, quotes, separators), else n-gram "
        "lookup their grammar allows, up to 8 a step while at most --speculate-max-batch requests run, in steps "
        "whose every decode is constrained or has a prediction (--no-speculate-constrained: one token a step). "
        "With --speculate K they speculate in every step either way",
    )
    parser.add_argument(
        "--speculate-cost-back-off",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a request whose proposals gain it fewer tokens a step than its speculating steps cost in plain steps "
        "(the shards' own step times) pauses speculating, for longer at each pause in a row (default: on with "
        "--speculative-model, whose forwards can cost more than they gain; off for n-gram lookup)",
    )
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of prompt prefixes seen before",
    )
    parser.add_argument("--api-key", default=env.get("MIXSERVE_API_KEY"), help="default: $MIXSERVE_API_KEY")
    parser.add_argument(
        "--ssl-certfile",
        type=Path,
        help="PEM certificate chain: serve HTTP (and --grpc-port) over TLS, with --ssl-keyfile (default: plain text)",
    )
    parser.add_argument("--ssl-keyfile", type=Path, help="the certificate's PEM private key, unencrypted")
    parser.add_argument(
        "--ssl-ca-certs",
        type=Path,
        help="PEM CA certificates: mutual TLS, every client (probes too) presents a certificate they signed",
    )
    parser.add_argument(
        "--cors-allow-origin",
        type=check_origin,
        nargs="+",
        action="extend",
        default=[],
        metavar="ORIGIN",
        help="web origins (scheme://host[:port]) whose pages may call the API from a browser, or * for any "
        "(default: none)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=2 << 20, help="largest request body (413 past it)")
    parser.add_argument(
        "--read-timeout", type=_seconds, default=60.0, help="seconds a client has to send its headers, and its body"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=0.0, help="seconds from admission to the last token (0: no deadline)"
    )
    parser.add_argument("--max-stop-sequences", type=int, default=MAX_STOP_SEQUENCES, help="stop strings per request")
    parser.add_argument(
        "--max-top-n-tokens", type=int, default=MAX_TOP_N_TOKENS, help="alternatives per token (top_logprobs too)"
    )
    parser.add_argument("--max-choices", type=int, default=MAX_CHOICES, help="OpenAI n (x prompts) per request")
    parser.add_argument("--max-best-of", type=int, default=MAX_BEST_OF, help="TGI best_of: sequences per request")
    parser.add_argument("--log-prompts", action="store_true", help="log prompts and generated text (user data)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to let streams finish on stop")
    parser.add_argument("--shard-timeout", type=float, default=300.0, help="seconds to wait for shards to start")
    parser.add_argument("--step-timeout", type=float, default=60.0, help="seconds before a step counts as failed")
    parser.add_argument(
        "--max-restarts", type=int, default=3, help="shard group restarts after failures (0: exit non-zero at once)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="names the OpenAI API answers to and reports (the first by default; default: the --model path)",
    )
    parser.add_argument(
        "--chat-template",
        type=_chat_template,
        default=None,
        metavar="FILE_OR_TEMPLATE",
        help="the chat template (Jinja) chat requests are rendered with, in place of the checkpoint's: a file, or "
        "the template's text (backslash escapes unescaped); for checkpoints without one (default: the checkpoint's)",
    )
    parser.add_argument(
        "--strict-model-name",
        action="store_true",
        help="answer 404 to a request naming another model (default: serve it with this one)",
    )
    parser.add_argument(
        "--vllm-metrics",
        action="store_true",
        help="also expose /metrics under vLLM's names (vllm:num_requests_waiting, ...) for dashboards written for vLLM",
    )
