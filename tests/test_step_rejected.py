"""A step every shard refuses (validation) ends only that step's requests; the group keeps serving.

The engine runs against a real shard process; the refused step is one whose prompt holds a token
id past the vocabulary, which no tokenizer produces but the shards must still refuse cleanly.
"""

import pytest
from transformers import PreTrainedTokenizerFast

from child_processes import start_shards
from mixserve.router.engine import Engine
from mixserve.router.generation import Limits
from mixserve.router.params import GenerationParams
from mixserve.router.scheduler import SchedulerConfig
from mixserve.router.shard_client import ShardGroup, ShardRejected

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shard(demo_dir, tmp_path_factory):
    sockets = tmp_path_factory.mktemp("uds")
    procs, _ = start_shards(demo_dir, sockets, 1)
    yield f"unix:{sockets / 's0'}"
    for p in procs:
        p.kill()
        p.wait()


async def collect(generation) -> list[int]:
    return [event.token_id async for event in generation.stream()]


async def test_a_refused_step_fails_its_requests_not_the_group(shard, demo_dir):
    group = ShardGroup([shard])
    warm = await group.warmup(64, 4, 64)
    info = await group.info()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(demo_dir)
    engine = Engine(
        group, tokenizer, SchedulerConfig(num_blocks=warm.num_blocks, block_size=warm.block_size), Limits(), (2,)
    )
    engine.start()
    try:
        greedy = GenerationParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
        refused = engine.submit([1, info.vocab_size + 5], greedy)
        with pytest.raises(ShardRejected, match="vocab size"):
            await collect(refused)
        assert engine.failure is None
        assert len(await collect(engine.submit([1, 523, 77], greedy))) == 5
        assert engine.scheduler.num_blocks_used == 0
    finally:
        await engine.stop()
        await group.close()
