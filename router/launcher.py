"""`mixserve launch`: start the shards, wait for them, warm them up, and serve the router.

The shards are child processes on unix sockets in a private temp dir (with --shard-addresses, none
are started: the router serves a group already running on TCP, e.g. under torchrun on other hosts).
With --replicas N or --shard-group repeated, the router fronts several such groups (router/replicas.py),
each started, watched and restarted on its own as below; the server fails only once every group has.
The launcher watches them: if one dies or misses the step deadline, every request in flight or
queued ends with an error (503 with Retry-After before its first token), /health answers 503 with
the reason, and the launcher restarts the whole group (new processes, new rendezvous, new KV cache),
up to --max-restarts times; past that it stops everything and exits non-zero. SIGINT/SIGTERM, at any
time, stop accepting, let in-flight streams finish up to --graceful-timeout, stop the shards and
exit 0. With --grpc-port, the public gRPC service runs on the same loop and drains the same way.

This module checks the flags and the host (router/host_check.py) and hands over to the serving half
(router/launch_serving.py), whose imports run while the host check does.
"""

import argparse
import asyncio
import logging

from mixserve.router.host_check import HostCheckFailed, check_model_dir, preflight_plan, start_preflight
from mixserve.router.launch_args import add_arguments as add_arguments  # the subcommand's flags (cli.py)

log = logging.getLogger("mixserve.launcher")


def check_speculation(args: argparse.Namespace) -> None:
    """ValueError where --speculative-model comes without the number of tokens to propose (--speculate K), or
    --speculate-history-tokens without n-gram speculation."""
    if args.speculative_model and not args.speculate:
        raise ValueError(
            f"--speculative-model {args.speculative_model} needs --speculate K, the tokens it proposes per decode"
        )
    if args.speculate_history_tokens and (not args.speculate or args.speculative_model):
        raise ValueError(
            "--speculate-history-tokens is for n-gram speculation: it needs --speculate K and no --speculative-model"
        )


def shard_group_addresses(args: argparse.Namespace) -> list[str | None]:
    """Each shard group's addresses (`host:port,...`), or None for a group the launcher starts itself."""
    given = args.shard_groups or []
    if args.shard_addresses and given:
        raise ValueError("--shard-addresses is one --shard-group; give every group with --shard-group")
    given = given or ([args.shard_addresses] if args.shard_addresses else [])
    if given and args.replicas != 1:
        raise ValueError("--replicas starts shard groups; groups already running are one --shard-group each")
    return given or [None] * args.replicas


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s router %(levelname)s %(message)s"
    )
    try:
        check_speculation(args)
        group_addresses = shard_group_addresses(args)
    except ValueError as e:
        log.error("event=startup_failed error=%s", e)
        return 1
    plan = None
    try:
        # Shards start here: every flag is checked against this host first, in one line if it fails.
        check = start_preflight(args) if None in group_addresses else None
        # The serving half's imports (aiohttp, grpc, the engine: ~1 s) while the host check imports torch.
        from mixserve.router.launch_serving import serve

        if check is not None:
            plan = preflight_plan(check)
            args.num_shard = plan.num_shard
            log.info(
                "event=host_checked num_shard=%d replicas=%d device=%s device_count=%d dtype=%s cpu_count=%d demo=%s",
                plan.num_shard,
                args.replicas,
                plan.device_type,
                plan.device_count,
                plan.dtype,
                plan.cpu_count,
                plan.demo,
            )
        elif args.model is not None:
            check_model_dir(args.model)
    except HostCheckFailed as e:
        log.error("event=startup_refused error=%s", e)
        return 2
    return asyncio.run(serve(args, group_addresses, plan))
