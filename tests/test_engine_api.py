"""The engine interface the fronts use (`Replicas` as `EngineAPI`) and the validation step, without shards:
the shard groups' channels are never used by what these tests call."""

import asyncio

import pytest

from mixserve.router.engine_api import EngineAPI, Limits
from mixserve.router.errors import Overloaded, ShardUnavailable, ValidationError
from mixserve.router.params import GenerationParams, GenerationRequest
from mixserve.router.replicas import build_replicas
from mixserve.router.scheduler import SchedulerConfig
from mixserve.router.shard_client import ShardGroup
from mixserve.router.validation import check_lengths, room, validate

LIMITS = Limits(max_concurrent_requests=2, max_input_tokens=40, max_total_tokens=64)


@pytest.fixture
async def replicas(demo_tokenizer, tmp_path):
    """Two groups of different cache sizes: 10 blocks of 4 tokens, and 6 blocks (of which a sequence may
    hold 5: --max-batch-total-tokens 20)."""
    groups = [
        (ShardGroup([f"unix:{tmp_path}/a.sock"]), SchedulerConfig(num_blocks=10, block_size=4)),
        (
            ShardGroup([f"unix:{tmp_path}/b.sock"]),
            SchedulerConfig(num_blocks=6, block_size=4, max_batch_total_tokens=20),
        ),
    ]
    yield build_replicas(groups, demo_tokenizer, LIMITS, (2,), 1)
    for group, _ in groups:
        await group.close()


async def test_replicas_are_the_engine_interface(replicas):
    assert isinstance(replicas, EngineAPI)


async def test_stats_sum_the_groups_and_size_a_sequence_to_the_smallest(replicas):
    stats = replicas.stats()
    # Free: what the batch may still take, so group 1 counts 5 of its 6.
    assert (stats.kv_blocks_total, stats.kv_blocks_free, stats.kv_blocks_used) == (16, 15, 0)
    assert (stats.max_sequence_blocks, stats.max_sequence_tokens, stats.block_size) == (5, 20, 4)
    assert stats.limits is LIMITS and stats.eos_token_ids == (2,)
    assert [(g.group, g.kv_blocks_total, g.error) for g in stats.groups] == [(0, 10, None), (1, 6, None)]


async def test_submit_routes_to_the_least_loaded_group_and_caps_requests_over_all(replicas):
    params = GenerationParams(max_new_tokens=4)
    first = replicas.submit([1, 5, 6], params)
    second = replicas.submit([1, 5, 6], params)
    assert replicas.routed == [1, 1]
    assert replicas.stats().requests_waiting == 2
    with pytest.raises(Overloaded, match="2 requests in flight, the limit is 2"):
        replicas.submit([1, 5, 6], params)
    replicas.cancel(first)
    replicas.cancel(second)
    assert replicas.stats().requests_waiting == 0 and replicas.stats().cancelled_requests == 2


async def test_with_every_group_failed_requests_and_health_get_the_reasons(replicas):
    for i, engine in enumerate(replicas.engines):
        engine.fail(f"shard {i} exited")
    replicas.engines[1].retry_after_s = 7
    assert not replicas.serving
    with pytest.raises(ShardUnavailable, match="group 0: shard 0 exited; group 1: restarting .* shard 1 exited") as e:
        replicas.submit([1, 5], GenerationParams())
    assert e.value.retry_after_s == 7
    report = await replicas.health()
    assert report.unavailable is not None and report.unavailable.retry_after_s == 7
    assert [g.error for g in replicas.stats().groups] == ["shard 0 exited", "shard 1 exited"]


@pytest.mark.parametrize(
    ("prompt_len", "max_new_tokens", "message"),
    [
        (0, 1, "the prompt is empty"),
        (41, 1, "the prompt has 41 tokens, more than max_input_tokens 40"),
        (30, 35, r"prompt tokens \(30\) \+ max_new_tokens \(35\) = 65 exceeds max_total_tokens 64"),
        (10, 12, r"do not fit the KV cache \(5 blocks of 4 tokens\)"),
    ],
)
async def test_lengths_past_a_limit_are_refused_naming_it(replicas, prompt_len, max_new_tokens, message):
    with pytest.raises(ValidationError, match=message):
        check_lengths(replicas.stats(), prompt_len, max_new_tokens)


async def test_room_is_what_the_smallest_cache_and_max_total_tokens_leave(replicas):
    stats = replicas.stats()
    # The last sampled token is never written: 20 tokens of K/V serve a 10-token prompt 11 new tokens.
    assert room(stats, 10) == 11
    check_lengths(stats, 10, room(stats, 10))
    assert room(stats, 40) == 1


async def test_validate_tokenizes_a_prompt_with_bos_and_keeps_the_last_truncate_tokens(replicas, demo_tokenizer):
    request = GenerationRequest(prompt="the old river", messages=None, params=GenerationParams(max_new_tokens=2))
    ids = demo_tokenizer("the old river")["input_ids"]
    assert (await validate(replicas, request)).prompt_ids == ids and ids[0] == demo_tokenizer.bos_token_id
    assert (await validate(replicas, request, truncate=2)).prompt_ids == ids[-2:]
    chat = GenerationRequest(
        prompt=None, messages=[{"role": "user", "content": "hi"}], params=GenerationParams(max_new_tokens=2)
    )
    rendered = demo_tokenizer.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
    valid = await validate(replicas, chat)
    assert valid.prompt_ids == demo_tokenizer(rendered, add_special_tokens=False)["input_ids"]


class BrokenGroup(ShardGroup):
    """A shard group whose step fails with a bug of the router's own (not a RouterError)."""

    async def step(self, step):
        raise TypeError("a field the step cannot carry")


async def test_a_bug_in_the_step_loop_fails_the_requests_instead_of_hanging_them(demo_tokenizer, tmp_path):
    group = BrokenGroup([f"unix:{tmp_path}/c.sock"])
    replicas = build_replicas([(group, SchedulerConfig(num_blocks=10, block_size=4))], demo_tokenizer, LIMITS, (2,), 1)
    engine = replicas.engines[0]
    engine.start()
    try:
        generation = replicas.submit([1, 5, 6], GenerationParams(max_new_tokens=4))
        with pytest.raises(ShardUnavailable, match="internal error in the router's step loop"):
            async with asyncio.timeout(10):
                async for _ in generation.stream():
                    pass
        assert "TypeError" in engine.failure
    finally:
        await engine.stop()
        await group.close()
