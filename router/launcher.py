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

This module checks the flags and the host (router/host_check.py; on a CPU host in shard 0, the shards
importing beside it: router/shard_standby.py) and hands over to the serving half
(router/launch_serving.py), whose imports run meanwhile.
"""

import argparse
import asyncio
import logging
import os
import signal
import tempfile
from pathlib import Path

from mixserve.router.host_check import HostCheckFailed, check_model_dir
from mixserve.router.launch_args import add_arguments as add_arguments  # the subcommand's flags (cli.py)
from mixserve.router.server_tls import ServerTLS, server_tls
from mixserve.router.shard_standby import HostCheck
from mixserve.router.stopping import unless_stopped

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
        tls = server_tls(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs)
    except ValueError as e:
        log.error("event=startup_failed error=%s", e)
        return 1
    return asyncio.run(check_and_serve(args, group_addresses, tls))


async def check_and_serve(args: argparse.Namespace, group_addresses: list[str | None], tls: ServerTLS | None) -> int:
    """Check the flags against the host (router/shard_standby.py), then serve (over `tls` where given); 2 where
    the check refuses, 0 where SIGINT or SIGTERM came first."""
    # Handled from the first moment: a stop during start-up must stop the shards started so far.
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="mixserve-") as tmp:
        socket_root = Path(tmp)
        os.chmod(socket_root, 0o700)
        check = None
        plan = None
        try:
            # Shards start here: every flag is checked against this host first, in one line if it fails.
            launched = [i for i, address in enumerate(group_addresses) if address is None]
            if launched:
                check = await HostCheck.start(args, socket_root, launched)
            # The serving half's imports (aiohttp, grpc, the engine: ~1 s) while the check imports torch.
            from mixserve.router.launch_serving import serve

            if check is not None:
                plan = await unless_stopped(check.plan(), stop)
                if plan is None:
                    await check.dismiss()
                    log.info("event=stopped_during_startup")
                    return 0
                args.num_shard = plan.num_shard
                log.info(
                    "event=host_checked num_shard=%d replicas=%d device=%s device_count=%d dtype=%s cpu_count=%d "
                    "demo=%s",
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
            if check is not None:
                await check.dismiss()
            log.error("event=startup_refused error=%s", e)
            return 2
        return await serve(args, group_addresses, plan, socket_root, stop, check, tls)
