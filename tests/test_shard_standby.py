"""Shards started beside the launcher's host check (router/shard_standby.py, shards/standby.py): the check
answered in shard 0, the start on the launcher's word, and fresh shards where the plan is not the guess."""

import argparse
import io
import json
import os
import urllib.request

import pytest
from process_table import children

from launched_server import get_json
from mixserve.router import shard_standby
from mixserve.router.shard_standby import guessed_num_shard, surely_cpu
from mixserve.shards.demo.checkpoint import DemoConfig, write_demo_checkpoint
from mixserve.shards.standby import wait_for_go


def check_line(*flags: str) -> str:
    return json.dumps({"host_check": list(flags)}) + "\n"


def test_a_standby_answers_the_host_check_and_starts_on_go_only(demo_dir):
    out = io.StringIO()
    stdin = io.StringIO(check_line("--device", "cpu", "--model", str(demo_dir)) + '{"go": true}\n')
    assert wait_for_go(stdin, out)
    answer = json.loads(out.getvalue())
    assert answer["ok"] and answer["device_type"] == "cpu" and answer["model_dir"] == str(demo_dir)
    # Refused: the reason is the answer; stdin ending without go ends the standby.
    out = io.StringIO()
    assert not wait_for_go(io.StringIO(check_line("--dtype", "fp64", "--model", str(demo_dir))), out)
    answer = json.loads(out.getvalue())
    assert not answer["ok"] and "--dtype fp64: not one of auto" in answer["error"]
    assert not wait_for_go(io.StringIO(""), io.StringIO())


def test_shards_start_beside_the_check_only_where_the_host_has_no_gpu(tmp_path, monkeypatch):
    node = tmp_path / "nvidiactl"
    monkeypatch.setattr(shard_standby, "GPU_DEVICE_NODES", (str(node),))
    assert surely_cpu("auto") and surely_cpu("cpu") and not surely_cpu("cuda") and not surely_cpu("cuda:1")
    args = argparse.Namespace(device="auto", num_shard=None, replicas=2)
    guesses = {}
    for cores in (1, 2, 8, 12, 16, 17, 32):
        monkeypatch.setattr(shard_standby, "usable_cores", lambda cores=cores: cores)
        guesses[cores] = guessed_num_shard(args)
    # A core each, shared by the replicas, in a power of two up to 8: past that, no guess.
    assert guesses == {1: 1, 2: 1, 8: 4, 12: 4, 16: 8, 17: 8, 32: None}
    args.num_shard = 3  # as given
    assert guessed_num_shard(args) == 3
    node.touch()  # a GPU may be there: the check runs alone, and the shards start after it
    assert not surely_cpu("auto") and surely_cpu("cpu") and guessed_num_shard(args) is None


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores, for a guess of 2 shards")
def test_shards_start_afresh_where_the_plan_is_not_the_guess(launch, tmp_path):
    # One KV head splits over one shard only: the launcher guesses a shard per core, the check plans one.
    model = write_demo_checkpoint(tmp_path / "one-kv-head", DemoConfig(num_key_value_heads=1))
    server = launch("--model", str(model), "--device", "cpu")
    assert get_json(f"{server.url}/info")["num_shard"] == 1
    (shard,) = server.shards()
    assert "--standby" not in shard.argv
    assert children(server.process.pid) == [shard.pid], "a standby shard outlived the plan"
    body = json.dumps({"prompt": "stone", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"{server.url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] == 4
