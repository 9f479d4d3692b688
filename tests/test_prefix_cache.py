"""Prefix caching: block hashes, the allocator's shared and evictable blocks, the scheduler's reuse of
cached prompt prefixes, the shard's penalty history of a sequence that starts past position 0, and
greedy outputs of a real launched server with and without the cache."""

import asyncio

import aiohttp
import pytest
from test_scheduler import Harness

from conftest import LaunchedServer, free_port
from mixserve.router.block_allocator import BlockAllocator, BlockTable, OutOfBlocksError
from mixserve.router.prefix_cache import hash_block
from mixserve.router.step_plan import Sequence

# -- hashing and the cache table ---------------------------------------------------------------------


def test_block_hash_chains_on_the_parent_and_the_tokens_in_order():
    first = hash_block(None, [1, 2, 3])
    assert first == hash_block(None, [1, 2, 3]) and len(first) == 32
    assert first != hash_block(None, [3, 2, 1])
    # The same tokens after a different prefix are a different block.
    assert hash_block(first, [4, 5, 6]) != hash_block(hash_block(None, [9, 9, 9]), [4, 5, 6])
    assert hash_block(first, [4, 5, 6]) != hash_block(None, [4, 5, 6])


def cached_allocator(num_blocks: int, held: int) -> tuple[BlockAllocator, list[int], list[bytes]]:
    """An allocator with `held` blocks allocated and cached as one chain."""
    allocator = BlockAllocator(num_blocks, block_size=2, enable_prefix_caching=True)
    blocks = allocator.allocate(held)
    hashes: list[bytes] = []
    for i, block in enumerate(blocks):
        hashes.append(hash_block(hashes[-1] if hashes else None, [i, i]))
        assert allocator.cache_block(block, hashes[-1])
    return allocator, blocks, hashes


def test_match_takes_the_longest_cached_leading_run():
    allocator, blocks, hashes = cached_allocator(8, 3)
    assert allocator.match_prefix(hashes) == blocks
    assert allocator.match_prefix(hashes + [hash_block(hashes[-1], [7, 7])]) == blocks
    assert allocator.match_prefix([hash_block(None, [5, 5]), *hashes]) == []
    allocator.free([blocks[1]])
    allocator.allocate(6)  # the 5 never-cached blocks, then blocks[1], evicted
    assert allocator.match_prefix(hashes) == [blocks[0]]
    assert allocator.num_cached == 2


def test_freed_cached_blocks_stay_findable_and_count_as_free():
    allocator, blocks, hashes = cached_allocator(4, 3)
    assert (allocator.num_used, allocator.num_free, allocator.num_cached) == (3, 1, 3)
    allocator.free(blocks)
    assert (allocator.num_used, allocator.num_free, allocator.num_cached) == (0, 4, 3)
    assert allocator.match_prefix(hashes) == blocks
    assert allocator.can_allocate(4) and not allocator.can_allocate(5)


def test_allocation_takes_never_cached_blocks_first_then_evicts_least_recently_freed():
    allocator, blocks, hashes = cached_allocator(5, 3)
    allocator.free([blocks[1]])
    allocator.free([blocks[0]])
    allocator.free([blocks[2]])
    never_cached = allocator.allocate(2)
    assert sorted(never_cached) == [3, 4] and allocator.num_cached == 3
    assert allocator.allocate(1) == [blocks[1]]
    assert allocator.match_prefix(hashes) == [blocks[0]]  # the chain breaks at the evicted block
    assert allocator.allocate(2) == [blocks[0], blocks[2]]
    assert allocator.num_cached == 0 and allocator.num_free == 0
    # An evicted block comes back uncached: freed, it goes to the plain free list.
    allocator.free([blocks[0]])
    assert allocator.match_prefix(hashes) == [] and allocator.allocate(1) == [blocks[0]]


def test_held_blocks_are_never_evicted():
    allocator, blocks, hashes = cached_allocator(3, 3)
    allocator.free([blocks[2]])
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(2)
    assert allocator.match_prefix(hashes) == blocks
    assert allocator.allocate(1) == [blocks[2]]
    assert allocator.match_prefix(hashes) == blocks[:2]
    with pytest.raises(OutOfBlocksError):
        allocator.allocate(1)


def test_shared_blocks_are_reference_counted():
    allocator, blocks, hashes = cached_allocator(4, 2)
    allocator.share(blocks)  # a second sequence takes the held chain
    assert [allocator.ref_count(b) for b in blocks] == [2, 2] and allocator.num_used == 2
    allocator.free(blocks)
    assert [allocator.ref_count(b) for b in blocks] == [1, 1] and allocator.num_free == 2
    allocator.free(blocks)
    assert allocator.num_free == 4 and allocator.match_prefix(hashes) == blocks
    # Taking a parked block revives it: it is held again and no longer free.
    allocator.share(blocks[:1])
    assert allocator.ref_count(blocks[0]) == 1 and allocator.num_free == 3
    assert allocator.allocate(3) == [2, 3, blocks[1]]  # blocks[0] is held: never evicted
    assert allocator.match_prefix(hashes) == blocks[:1]


def test_share_and_cache_refuse_free_blocks():
    allocator = BlockAllocator(4, block_size=2, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="not cached"):
        allocator.share([1])
    # A bad list takes nothing, not even the cached blocks before the bad one.
    held, hashes = allocator.allocate(1), [hash_block(None, [0, 0])]
    allocator.cache_block(held[0], hashes[0])
    allocator.free(held)
    with pytest.raises(ValueError, match="not cached"):
        allocator.share([held[0], 1])
    assert allocator.ref_count(held[0]) == 0 and allocator.num_free == 4
    allocator.share(held)
    assert allocator.ref_count(held[0]) == 1 and allocator.num_free == 3
    with pytest.raises(ValueError, match="only a held block"):
        allocator.cache_block(1, hash_block(None, [1, 1]))
    table = BlockTable(block_size=2, blocks=list(held))
    with pytest.raises(ValueError, match="empty block table"):
        table.share(allocator, held)


def test_second_block_with_the_same_contents_is_not_cached():
    allocator, blocks, hashes = cached_allocator(4, 1)
    (twin,) = allocator.allocate(1)
    assert not allocator.cache_block(twin, hashes[0])
    allocator.free([twin, blocks[0]])
    assert allocator.match_prefix(hashes) == blocks
    assert allocator.allocate(3) == [2, 3, twin]  # the twin went to the plain free list


def test_release_evicts_a_chain_from_its_tail():
    allocator, blocks, hashes = cached_allocator(3, 3)
    BlockTable(block_size=2, blocks=list(blocks)).release(allocator)
    assert allocator.allocate(1) == [blocks[2]]
    assert allocator.match_prefix(hashes) == blocks[:2]
    assert allocator.allocate(2) == [blocks[1], blocks[0]]


def test_without_prefix_caching_nothing_is_cached():
    allocator = BlockAllocator(4, block_size=2)
    (block,) = allocator.allocate(1)
    assert not allocator.cache_block(block, hash_block(None, [1, 1]))
    assert allocator.match_prefix([hash_block(None, [1, 1])]) == [] and allocator.num_cached == 0


# -- the scheduler -----------------------------------------------------------------------------------

PREFIX = list(range(100, 118))  # 4 full blocks of 4 and 2 tokens


def add(h: Harness, seq_id: int, prompt: list[int], max_new_tokens: int) -> Sequence:
    return h.add(Sequence(seq_id=seq_id, prompt_ids=prompt, max_new_tokens=max_new_tokens))


def test_a_cached_prefix_is_shared_and_only_the_rest_is_computed():
    h = Harness(num_blocks=32, block_size=4)
    first = add(h, 1, PREFIX + [1, 2, 3], 3)
    h.step()
    prefix_blocks = first.block_table.blocks[:4]
    h.run_all()
    second = add(h, 2, PREFIX + [7, 8], 3)
    (entry,) = h.step().sequences
    assert (entry.start_position, entry.token_ids) == (16, [116, 117, 7, 8])
    assert entry.prefix_token_ids == PREFIX[:16]
    assert second.block_table.blocks[:4] == prefix_blocks
    assert (h.scheduler.prefix_query_tokens, h.scheduler.prefix_hit_tokens) == (21 + 20, 16)
    h.run_all()
    h.assert_complete()


def test_running_sequences_share_blocks_until_the_last_holder_leaves():
    h = Harness(num_blocks=32, block_size=4)
    first = add(h, 1, PREFIX, 10)
    h.step()
    second = add(h, 2, PREFIX + [5], 10)
    h.step()  # the harness checks every write goes to a block with one holder
    shared = second.block_table.blocks[:4]
    assert shared == first.block_table.blocks[:4]
    assert [h.scheduler.allocator.ref_count(b) for b in shared] == [2, 2, 2, 2]
    h.abort(1)
    assert [h.scheduler.allocator.ref_count(b) for b in shared] == [1, 1, 1, 1]
    h.run_all()
    h.assert_complete(aborted={1})
    assert h.scheduler.num_blocks_used == 0 and h.scheduler.num_blocks_cached >= 4
    assert h.scheduler.num_blocks_free == 32


def test_blocks_are_cached_after_the_step_that_fills_them_not_when_planned():
    h = Harness(num_blocks=32, block_size=4, max_batch_prefill_tokens=10)
    add(h, 1, PREFIX, 2)
    plan = h.schedule()  # positions 0-9: blocks 0 and 1 full, block 2 half
    assert h.scheduler.num_blocks_cached == 0
    h.complete(plan, h.shard.run(plan))
    assert h.scheduler.num_blocks_cached == 2
    # The same prompt admitted while the step that completes blocks 2 and 3 is planned gets only 0 and 1.
    add(h, 2, PREFIX, 2)
    plan = h.step()
    shape = [(e.seq.seq_id, e.start_position, len(e.token_ids)) for e in plan.sequences]
    assert shape == [(1, 10, 8), (2, 8, 2)]
    assert h.scheduler.num_blocks_cached == 4
    h.run_all()
    h.assert_complete()


@pytest.mark.parametrize(("prompt_len", "start"), [(1, 0), (4, 0), (5, 4), (12, 8), (13, 12), (18, 16)])
def test_the_last_token_is_always_computed(prompt_len: int, start: int):
    h = Harness(num_blocks=32, block_size=4)
    add(h, 1, PREFIX, 1)
    h.run_all()
    assert h.scheduler.num_blocks_cached == 4  # the partial fifth block is not cached
    seq = add(h, 2, PREFIX[:prompt_len], 2)
    (entry,) = h.step().sequences
    assert entry.start_position == start and entry.sample
    # The block the sequence computes into is its own, never the cached block of the same tokens.
    assert h.scheduler.allocator.ref_count(seq.block_table.blocks[-1]) == 1
    h.run_all()
    h.assert_complete()


def test_generated_tokens_fill_cached_blocks_too():
    h = Harness(num_blocks=32, block_size=4)
    first = add(h, 1, PREFIX[:6], 4)  # computes 6 prompt + 3 generated tokens: 2 full blocks
    h.run_all()
    assert h.scheduler.num_blocks_cached == 2
    add(h, 2, first.prompt_ids + first.output_ids, 2)
    (entry,) = h.step().sequences
    assert entry.start_position == 8 and entry.token_ids == first.output_ids[2:]
    assert h.scheduler.prefix_hit_tokens == 8
    h.run_all()
    h.assert_complete()


def test_preempted_sequence_resumes_from_its_cached_blocks():
    # 6 blocks of 4; four requests each want up to 16 tokens of K/V, so some are preempted.
    h = Harness(num_blocks=6, block_size=4)
    for seq_id in range(4):
        add(h, seq_id, [(seq_id * 7 + i * 3) % 1000 for i in range(5)], 12)
    plans = h.run_all()
    assert h.scheduler.num_preemptions > 0
    preempted = {seq.seq_id for plan in plans for seq in plan.preempted}
    resumed = [e for p in plans for e in p.sequences if e.seq.seq_id in preempted and e.prefix_token_ids]
    assert resumed, "no preempted sequence found its blocks again"
    h.assert_complete()


def test_preempted_sequence_cached_up_to_its_last_token_comes_back_as_a_prefill():
    # 5 blocks of 4. Both decode in step; at position 8 the older takes the last free block and the
    # younger, short of one, preempts itself with positions 0-7 cached. Readmitted, only its last
    # sampled token is left to compute.
    h = Harness(num_blocks=5, block_size=4, max_batch_prefill_tokens=4)
    add(h, 1, [1, 2, 3, 4], 9)
    younger = add(h, 2, [5, 6, 7, 8], 6)
    plans = h.run_all()
    (preempting,) = [p for p in plans if p.preempted]
    assert preempting.preempted == [younger]
    (resumed,) = [e for p in plans for e in p.sequences if e.seq is younger and e.prefix_token_ids]
    assert (resumed.start_position, resumed.token_ids) == (8, younger.output_ids[4:5])
    assert resumed.is_prefill and resumed.sample
    h.assert_complete()


def test_an_admission_pays_for_the_parked_blocks_it_revives():
    # 5 blocks of 4. A 17-token prompt leaves 4 cached blocks parked and one plain free block; the
    # same prompt again takes the 4 (hit 16) and needs 1 new block: exactly the cache.
    h = Harness(num_blocks=5, block_size=4)
    add(h, 1, PREFIX[:17], 1)
    h.run_all()
    assert h.scheduler.num_blocks_free == 5 and h.scheduler.num_blocks_cached == 4
    add(h, 2, PREFIX[:17], 4)
    (entry,) = h.step().sequences
    assert entry.start_position == 16 and h.scheduler.num_blocks_free == 0
    # A different prompt must wait for blocks: the parked ones are held now, not free.
    add(h, 3, [1, 2, 3], 1)
    plan = h.step()
    assert [e.seq.seq_id for e in plan.sequences] == [2]
    h.run_all()
    h.assert_complete()


def test_max_batch_total_tokens_counts_parked_blocks_as_free():
    h = Harness(num_blocks=20, block_size=4, max_batch_total_tokens=16)
    for seq_id in range(4):
        add(h, seq_id, [seq_id * 50 + i for i in range(9)], 3)
    h.run_all()
    assert h.scheduler.num_blocks_cached == 8 and h.scheduler.num_blocks_free == 4
    h.assert_complete()


def test_disabled_cache_recomputes_everything():
    h = Harness(num_blocks=32, block_size=4, enable_prefix_caching=False)
    add(h, 1, PREFIX, 2)
    h.run_all()
    add(h, 2, PREFIX, 2)
    (entry,) = h.step().sequences
    assert entry.start_position == 0 and entry.prefix_token_ids == []
    assert (h.scheduler.prefix_query_tokens, h.scheduler.prefix_hit_tokens, h.scheduler.num_blocks_cached) == (0, 0, 0)
    h.run_all()
    h.assert_complete()


# -- the shard: a sequence admitted past position 0 --------------------------------------------------


def test_runner_builds_the_penalty_history_from_the_prefix(demo_dir):
    import torch

    from mixserve.shards.config import ParallelConfig
    from mixserve.shards.distributed import TensorParallelGroup
    from mixserve.shards.loader import load_model
    from mixserve.shards.runner import ModelRunner
    from mixserve.shards.sampling_params import SamplingParams
    from mixserve.shards.sequence_step import InvalidStep, SequenceStep

    torch.set_num_threads(1)
    parallel = ParallelConfig()
    model = load_model(demo_dir, parallel, TensorParallelGroup(parallel))
    runner = ModelRunner(model, parallel, TensorParallelGroup(parallel), torch.device("cpu"), torch.float32, 4)
    runner.allocate_cache(16)
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1.8)
    prompt = [5, 9, 5, 9, 30, 31, 32, 33, 7, 9, 5]

    def step(seq_id, start, table, prefix=()):
        slots = [table[p // 4] * 4 + p % 4 for p in range(start, len(prompt))]
        return SequenceStep(seq_id, prompt[start:], start, slots, table, True, penalized, list(prefix))

    (alone,) = runner.step([step(1, 0, [0, 1, 2])])
    # Sequence 2 reuses sequence 1's first two blocks and computes the rest into its own block.
    (hit,) = runner.step([step(2, 8, [0, 1, 3], prefix=prompt[:8])])
    assert (hit.token_id, hit.logprob) == pytest.approx((alone.token_id, alone.logprob), abs=1e-5)
    assert runner.sequences[2].history.seen_ids().tolist() == runner.sequences[1].history.seen_ids().tolist()
    assert runner.sequences[2].seen_until == runner.sequences[1].seen_until
    with pytest.raises(InvalidStep, match="prefix tokens"):
        runner.step([step(3, 8, [0, 1, 4], prefix=prompt[:7])])


# -- end to end: a real launch with and without the cache ---------------------------------------------

BLOCK = 16
SYSTEM = " ".join(f"rule {i}: answer briefly and name the river stone light" for i in range(30))
QUESTIONS = ["What is green?", "Where is north?", "Count to seven.", "Describe the market.", "Why paper?"]


@pytest.fixture(scope="module")
def system_prompt_tokens(demo_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(demo_dir)(SYSTEM)["input_ids"])


@pytest.fixture(scope="module")
def servers(demo_dir, tmp_path_factory):
    """Two 2-shard launches started side by side: prefix caching on (the default) and off."""
    flags = ["--model", str(demo_dir), "--num-shard", "2", "--max-batch-prefill-tokens", "128"]
    flags += ["--max-kv-blocks", "256", "--block-size", str(BLOCK)]
    started = []
    for name, extra in (("cached", []), ("uncached", ["--no-prefix-caching"])):
        log = tmp_path_factory.mktemp(f"launch-{name}") / "server.log"
        started.append(LaunchedServer([*flags, *extra], log, free_port()))
    try:
        for server in started:
            server.wait_healthy()
        yield started
    finally:
        for server in started:
            server.stop()


async def generate(session: aiohttp.ClientSession, url: str, system: str, question: str, **params) -> str:
    body = {"prompt": f"{system}\nQ: {question}\nA:", "max_tokens": 12, "temperature": 0, "stream": False, **params}
    async with session.post(f"{url}/predict", json=body) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["output"]


async def workload(url: str) -> tuple[list[str], dict]:
    """One request alone (a miss), then the rest at once (hits), then a penalized hit; and /info."""
    async with aiohttp.ClientSession() as session:
        first = await generate(session, url, SYSTEM, QUESTIONS[0])
        # The model's own continuation early in the prompt: a repetition penalty then changes the answer,
        # but only if the shards know the cached prefix's tokens.
        echoed = f"{first.strip()} {SYSTEM}"
        outputs = [first]
        outputs += await asyncio.gather(
            *(generate(session, url, SYSTEM, q) for q in QUESTIONS[1:]),
            generate(session, url, echoed, QUESTIONS[0], repetition_penalty=1.3),
        )
        outputs.append(await generate(session, url, echoed, QUESTIONS[0], repetition_penalty=1.3))
        async with session.get(f"{url}/info") as response:
            info = await response.json()
    return outputs, info


@pytest.mark.slow
async def test_greedy_outputs_are_identical_with_and_without_the_cache(servers, system_prompt_tokens):
    cached, uncached = servers
    (with_cache, info), (without_cache, off_info) = await asyncio.gather(workload(cached.url), workload(uncached.url))
    assert with_cache == without_cache
    assert with_cache[-1] == with_cache[-2]  # the penalized prompt, a miss then a hit
    assert info["prefix_caching"] and not off_info["prefix_caching"]
    # The 4 other questions and the penalized prompt's second run find the system prompt's full blocks
    # (the last one may tokenize differently with the question after it).
    assert info["prefix_cache_hit_tokens"] >= 5 * (system_prompt_tokens // BLOCK - 1) * BLOCK
    assert info["prefix_cache_query_tokens"] > info["prefix_cache_hit_tokens"]
    assert off_info["prefix_cache_hit_tokens"] == off_info["prefix_cache_query_tokens"] == 0
    assert info["kv_blocks_used"] == 0 and info["kv_blocks_cached"] > 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cached.url}/metrics") as response:
            metrics = await response.text()
    assert f"mixserve_prefix_cache_hit_tokens_total {float(info['prefix_cache_hit_tokens'])}" in metrics
    assert "mixserve_prefix_cache_hit_rate" in metrics
