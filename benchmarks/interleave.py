"""Interleaved sweeps (`mixserve bench compare --interleave N`): several running servers measured in
alternating blocks of each level's requests, instead of one server after another.

On a machine shared with other tenants, bandwidth and cache share drift by tens of percent within
minutes (benchmarks/RESULTS.md), so two systems measured ten minutes apart differ by the drift as
much as by themselves. Here every system's level is cut into the same N blocks of the same
requests; block i of every system runs before block i + 1 of any, the systems' order reversed on
every other block (A B, B A, A B, ...), so a drift that is smooth over a level weighs on each
system alike. One server works at a time; the others sit idle, which costs no CPU.

A block holds at least the level's concurrency in requests (fewer blocks where the level has too
few: 32 requests at c=32 run as one block, not interleaved), and each block ends in a drain, as a
sequential level does once, so levels want several times c requests per block. A system's figures
for a level are its blocks together: the records of all of them, over the sum of their wall times.
Before its first block of a level a system gets the level's warm-up requests (as in a sequential
sweep); before each later block one more request, uncounted, to bring its weights back into the
caches the other systems' blocks used.

It evens out drift over time, not differences between the servers themselves. The servers start one
after another, and on a 2-core AMD EPYC VM three identical servers measured 214, 222 and 279 tok/s at
one stream, the last started fastest in every block (benchmarks/results/compare-aaa-position-bias):
list one system twice (two --mixserve names, the same flags) as a control before reading a ratio.
"""

import contextlib
import logging

from mixserve.benchmarks.serve import ServeConfig, level_requests, level_result, run_level
from mixserve.benchmarks.workload import load_tokenizer

log = logging.getLogger("mixserve.bench")


def block_order(names: list[str], blocks: int) -> list[tuple[int, str]]:
    """(block, system) in running order: every system's block i before block i + 1, the systems'
    order reversed on odd blocks."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    order = []
    for block in range(blocks):
        for name in names if block % 2 == 0 else reversed(names):
            order.append((block, name))
    return order


def split_blocks(items: list, blocks: int) -> list[list]:
    """`items` cut into `blocks` contiguous parts of sizes differing by at most one (fewer parts when
    there are fewer items), none empty."""
    blocks = max(1, min(blocks, len(items)))
    size, extra = divmod(len(items), blocks)
    parts, start = [], 0
    for i in range(blocks):
        end = start + size + (i < extra)
        parts.append(items[start:end])
        start = end
    return parts


async def run_interleaved(configs: dict[str, ServeConfig], blocks: int) -> dict[str, dict]:
    """Every system's sweep, in interleaved blocks; one result per system in run_benchmark's form
    ({"levels": [...]}, each level with its summary, requests and `_records`). The configs must
    share the workload and the concurrency levels."""
    first = next(iter(configs.values()))
    for name, config in configs.items():
        if config.workload != first.workload or config.concurrency != first.concurrency:
            raise ValueError(f"{name}'s workload or levels differ from the others'")
    tokenizer = load_tokenizer(first.model_dir)
    names = list(configs)
    levels: dict[str, list[dict]] = {name: [] for name in names}
    async with contextlib.AsyncExitStack() as stack:
        targets = {name: await stack.enter_async_context(config.make_target()) for name, config in configs.items()}
        for level, concurrency in enumerate(first.concurrency):
            warm, requests = level_requests(tokenizer, first, level, concurrency)
            # A block runs at the level's concurrency only if it holds at least that many requests.
            parts = split_blocks(requests, max(1, min(blocks, len(requests) // concurrency)))
            if len(parts) < blocks:
                log.warning(
                    "event=fewer_blocks concurrency=%d requests=%d blocks=%d (a block needs >= c requests)",
                    concurrency,
                    len(requests),
                    len(parts),
                )
            records = {name: [] for name in names}
            duration = dict.fromkeys(names, 0.0)
            server_tokens: dict[str, int | None] = dict.fromkeys(names, 0)
            for block, name in block_order(names, len(parts)):
                config, target = configs[name], targets[name]
                refill = warm if block == 0 else warm[:1]
                if refill:
                    await run_level(config, target, refill, concurrency)
                before = await target.generated_tokens()
                got, seconds = await run_level(config, target, parts[block], concurrency, f"{name} c={concurrency}")
                after = await target.generated_tokens()
                records[name] += got
                duration[name] += seconds
                counted = server_tokens[name]
                server_tokens[name] = None if None in (counted, before, after) else counted + after - before
            for name in names:
                levels[name].append(
                    level_result(
                        name, concurrency, records[name], duration[name], server_tokens[name], blocks=len(parts)
                    )
                )
    return {name: {"levels": levels[name]} for name in names}
