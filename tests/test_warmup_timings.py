"""Warm-up timings kept between starts (shards/warmup_timings.py, `--warmup-timings`): the store itself, a
warm-up that reuses what an earlier one stored under the same key and times afresh under another, and a
served group whose ranks time together where one of them lacks its stored timings."""

import json
import time
from pathlib import Path

import pytest
import torch
from test_kernel_tokens import demo_runner

from mixserve.shards import head_rows, kernel_tokens, ops
from mixserve.shards.cache_dir import cache_root
from mixserve.shards.kernels import linear, moe
from mixserve.shards.warmup_timings import TimingsStore

KEY = {"cpu": "x86_64 test", "sizes": [16, 32], "shapes": {"config": {"eos_token_ids": (2,)}}}
TIMINGS = [(16, 0.002, 0.004), (32, 0.003, 0.005)]


def test_timings_come_back_under_their_key_only(tmp_path):
    store = TimingsStore(tmp_path)
    store.entry("kernel_tokens", KEY).save(TIMINGS)
    assert store.entry("kernel_tokens", KEY).load() == TIMINGS  # tuples in the key: compared as JSON keeps them
    assert store.entry("kernel_tokens", {**KEY, "sizes": [16]}).load() is None
    assert store.entry("head_rows", KEY).load() is None
    assert TimingsStore(tmp_path, reuse=False).entry("kernel_tokens", KEY).load() is None
    assert [path.name for path in tmp_path.iterdir()] == [store.entry("kernel_tokens", KEY).path.name]


def test_a_damaged_or_foreign_file_is_a_miss_and_an_unwritable_store_no_error(tmp_path):
    entry = TimingsStore(tmp_path).entry("kernel_tokens", KEY)
    entry.save(TIMINGS)
    entry.path.write_text(entry.path.read_text()[:20])
    assert entry.load() is None
    entry.path.write_text(json.dumps({"key": {**KEY, "cpu": "another"}, "timings": TIMINGS}))
    assert entry.load() is None  # a file whose name matches and whose key does not
    entry.path.write_text(json.dumps({"key": KEY, "timings": [[16, 0.002]]}))
    assert entry.load() is None
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    TimingsStore(blocked / "warmup").entry("kernel_tokens", KEY).save(TIMINGS)  # logged, not raised
    assert blocked.read_text() == ""


@pytest.fixture
def runner(native, demo_dir):  # noqa: F811 - the conftest fixture that chooses the C kernels
    if native.backends["decoder_layers"] != "native" or native.backends["linear_rows"] != "native":
        pytest.skip("the decoder layer and linear kernels do not build here")
    yield demo_runner(demo_dir, torch.float32)
    moe.set_measured_cap(None)
    linear.set_measured_rows(None)


def never_timed(*args):
    raise AssertionError("timed where stored timings were to be reused")


def test_a_warm_up_reuses_the_stored_ladder_and_times_afresh_under_another_key(runner, tmp_path, monkeypatch):
    store = TimingsStore(tmp_path)
    cap, timings = kernel_tokens.measure_and_cap(runner, 32, store)
    [path] = tmp_path.glob("kernel_tokens-*.json")
    assert json.loads(path.read_text())["key"]["sizes"] == [16, 32]
    ops.set_decoder_layer_tokens(16)
    moe.set_measured_cap(16)
    with monkeypatch.context() as patched:
        patched.setattr(kernel_tokens, "_time_both", never_timed)
        assert kernel_tokens.measure_and_cap(runner, 32, store) == (cap, timings)
    assert ops.current().decoder_layers_max_tokens == cap and moe.fits(cap) and not moe.fits(cap + 1)

    timed = []

    def counted(r, tokens, top):
        timed.append(tokens)
        return 0.001, 0.002

    monkeypatch.setattr(kernel_tokens, "_time_both", counted)
    kernel_tokens.measure_and_cap(runner, 16, store)  # the router's largest step changed: another key
    assert timed == [16] and len(list(tmp_path.glob("kernel_tokens-*.json"))) == 2
    kernel_tokens.measure_and_cap(runner, 32, TimingsStore(tmp_path, reuse=False))  # `fresh`
    assert timed == [16, 16, 32]
    assert json.loads(path.read_text())["timings"] == [[16, 0.001, 0.002], [32, 0.001, 0.002]]


def test_the_head_s_rows_are_reused_as_stored(runner, tmp_path, monkeypatch):
    store = TimingsStore(tmp_path)
    cap, timings = head_rows.measure_head_rows(runner, 64, store)
    linear.set_measured_rows(None)
    monkeypatch.setattr(head_rows, "fastest_of_both", never_timed)
    assert head_rows.measure_head_rows(runner, 64, store) == (cap, timings)
    assert linear.max_rows() == cap


def rank_files(since_ns: int) -> dict[tuple[str, int], Path]:
    """The stored timings files written since `since_ns`, by measurement and rank."""
    found = {}
    for path in (cache_root() / "warmup").glob("*.json"):
        if path.stat().st_mtime_ns >= since_ns:
            key = json.loads(path.read_text())["key"]
            found[path.name.split("-")[0], key["parallel"]["rank"]] = path
    return found


@pytest.mark.slow
def test_ranks_time_together_where_one_lacks_its_stored_timings(launch, demo_dir):
    """A 2-shard group (an unusual largest step, 48 tokens, so that its ladder's key is its own) stores its
    timings; with rank 1's ladder gone, the next start times the ladder on both ranks (a rank that reused
    alone would wait for the other's collectives) and reuses both heads' rows."""
    flags = ("--model", str(demo_dir), "--num-shard", "2", "--max-batch-prefill-tokens", "48")
    started = time.time_ns()
    launch(*flags, "--warmup-timings", "fresh").stop()
    first = rank_files(started)
    assert sorted(first) == [("head_rows", 0), ("head_rows", 1), ("kernel_tokens", 0), ("kernel_tokens", 1)]
    written = {name: path.stat().st_mtime_ns for name, path in first.items()}
    first["kernel_tokens", 1].unlink()
    launch(*flags).stop()
    second = {name: path.stat().st_mtime_ns for name, path in rank_files(started).items()}
    assert second["kernel_tokens", 0] > written["kernel_tokens", 0] and ("kernel_tokens", 1) in second
    assert second["head_rows", 0] == written["head_rows", 0] and second["head_rows", 1] == written["head_rows", 1]
