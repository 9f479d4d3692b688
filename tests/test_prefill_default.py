"""--max-batch-prefill-tokens: given, it is used as is; not given, it follows the shards' device."""

from mixserve.router.shard_processes import DEFAULT_PREFILL_TOKENS_ELSEWHERE, prefill_tokens_per_step


def test_a_given_value_wins_on_any_device():
    assert prefill_tokens_per_step(1000, "cpu") == 1000
    assert prefill_tokens_per_step(64, "cuda:0") == 64


def test_the_default_is_small_on_cpu_and_large_on_gpus():
    assert prefill_tokens_per_step(None, "cpu") == 256
    assert prefill_tokens_per_step(None, "cuda:3") == DEFAULT_PREFILL_TOKENS_ELSEWHERE == 4096
    assert prefill_tokens_per_step(None, "mps") == 4096
