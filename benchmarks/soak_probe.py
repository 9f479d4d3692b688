"""What the soak watches on the server while it runs: process RSS, KV blocks, request counters, load.

RSS is VmRSS from /proc/PID/status (the router is the `mixserve launch` process itself; shard pids
come from the launcher's `event=shard_started rank pid` log lines). KV blocks and queue depth come
from `/info`, the request, cancellation and restart counters from `/metrics`.
"""

import asyncio
import os
import re
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mixserve.benchmarks.soak_load import ROUTES

_SHARD_STARTED = re.compile(r"event=shard_started rank=(\d+) pid=(\d+)(?: address=\S+ group=(\d+))?")


def rss_kib(pid: int) -> int | None:
    """Resident set size of `pid` in KiB, None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def shard_pids(launcher_log: str) -> dict[str, int]:
    """`shard-<rank>` (`g<group>-shard-<rank>` past the first of several shard groups) → pid, from a
    launcher's log; a restarted group's later lines win."""
    return {
        f"g{group}-shard-{rank}" if group not in ("", "0") else f"shard-{rank}": int(pid)
        for rank, pid, group in _SHARD_STARTED.findall(launcher_log)
    }


def request_counts(metrics_text: str) -> dict[str, float]:
    """HTTP requests the server answered on the soak's routes, by status, and its cancelled
    generations and shard restarts, from a /metrics exposition."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "mixserve_requests_total" and labels.get("api") == "http":
                if labels.get("route") in ROUTES:
                    key = f"status_{labels['status']}"
                    counts[key] = counts.get(key, 0.0) + sample.value
            elif sample.name == "mixserve_request_end_total" and labels.get("reason") == "cancelled":
                counts["generations_cancelled"] = sample.value
            elif sample.name == "mixserve_shard_restarts_total":
                counts["shard_restarts"] = sample.value
    return counts


def counts_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """`after - before` for every key of either (a counter first seen after counts from 0)."""
    return {k: int(after.get(k, 0.0) - before.get(k, 0.0)) for k in sorted(set(before) | set(after))}


class ServerProbe:
    """Reads /info, /metrics and the processes' RSS of one server."""

    def __init__(self, session: aiohttp.ClientSession, url: str, pids: dict[str, int]) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.pids = pids

    async def info(self) -> dict:
        async with self.session.get(f"{self.url}/info") as response:
            response.raise_for_status()
            return await response.json(content_type=None)

    async def counts(self) -> dict[str, float]:
        async with self.session.get(f"{self.url}/metrics") as response:
            response.raise_for_status()
            return request_counts(await response.text())

    async def sample(self, elapsed_s: float) -> dict:
        """One sample: seconds since the soak began, load average, KV blocks, queue, RSS per process."""
        info = await self.info()
        return {
            "t_s": round(elapsed_s, 2),
            "load_1m": round(os.getloadavg()[0], 2),
            "kv_blocks_used": info.get("kv_blocks_used"),
            "requests_running": info.get("requests_running"),
            "requests_waiting": info.get("requests_waiting"),
            "rss_kib": {name: rss_kib(pid) for name, pid in self.pids.items()},
        }

    async def settle(self, expected_requests: int | None, baseline: dict[str, float], timeout_s: float) -> tuple:
        """Wait until the KV blocks are back to 0 and (when counting) the server has answered as many
        requests as were sent since `baseline`; returns (last /info, counter delta) either way."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.info()
            delta = counts_delta(baseline, await self.counts())
            answered = sum(v for k, v in delta.items() if k.startswith("status_"))
            settled = info.get("kv_blocks_used") == 0 and info.get("requests_running") == 0
            if settled and expected_requests in (None, answered) or time.monotonic() > deadline:
                return info, delta
            await asyncio.sleep(0.2)
