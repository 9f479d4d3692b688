"""Which device each shard gets (torch.cuda patched: no GPU here), the one model thread, and the
launcher's host check: too few GPUs, a GPU on a CPU-only torch, a bad dtype, a hub id, each one
line and exit code 2 before any shard starts; `launch --help` shows every default."""

import argparse
import subprocess
import threading

import pytest
import torch

from child_processes import PYTHON, free_port, subprocess_env
from mixserve.cli import DefaultsHelpFormatter
from mixserve.router import launch_serving, launcher
from mixserve.router.host_check import HostCheckFailed, HostPlan, check_model_dir, group_visible_devices
from mixserve.router.shard_spawn import shard_environment
from mixserve.shards import devices
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.devices import DeviceUnavailable, cpu_has_bf16, resolve_device, resolve_dtype
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.loader import load_model
from mixserve.shards.model_thread import ModelThread
from mixserve.shards.preflight import PreflightFailed, default_num_shard, plan
from mixserve.shards.runner import ModelRunner
from mixserve.shards.server import ShardServicer
from mixserve_pb import shard_pb2

BLOCK = 16


@pytest.fixture
def gpus(monkeypatch):
    """torch.cuda as on a host with `count` GPUs (bfloat16 or not); set_device calls recorded with
    the thread that made them."""
    calls: list[tuple[int, torch.device]] = []

    def host(count: int, bf16: bool = True) -> list[tuple[int, torch.device]]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((threading.get_ident(), d)))
        return calls

    return host


def test_each_rank_gets_its_local_gpu_or_the_one_named(gpus):
    gpus(4)
    assert resolve_device("cuda", 2) == torch.device("cuda", 2)
    assert resolve_device("auto", 1) == torch.device("cuda", 1)
    assert resolve_device("cuda:3", 0) == torch.device("cuda", 3)
    assert resolve_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(DeviceUnavailable, match="GPU 4 .local rank 4. is not among the 4"):
        resolve_device("cuda", 4)
    for bad in ("cuda:x", "tpu", "cuda:-1"):
        with pytest.raises(DeviceUnavailable, match="not one of auto, cpu, cuda or cuda:N"):
            resolve_device(bad, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused():
    assert resolve_device("auto", 0) == torch.device("cpu")
    with pytest.raises(DeviceUnavailable, match="sees no CUDA GPU here .* use --device cpu"):
        resolve_device("cuda", 0)


def test_dtype_auto_follows_the_device(gpus, monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(devices.native, "compiler_available", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(devices.native, "compiler_available", lambda: False)  # no kernels to read bf16 in place
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(DeviceUnavailable, match="--dtype fp64: not one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp64", torch.device("cpu"))
    gpus(1)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    gpus(1, bf16=False)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16
    with pytest.raises(DeviceUnavailable, match="GPU 0 .Test GPU. has no bfloat16"):
        resolve_dtype("bfloat16", torch.device("cuda", 0))


def test_cpu_has_bf16_reads_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    assert cpu_has_bf16() == ("avx512_bf16" in flags)


@pytest.mark.parametrize("replicas, num_shard", [(2, 4), (4, 2), (1, 8)])
def test_shard_r_of_group_g_runs_on_gpu_g_times_num_shard_plus_r(gpus, replicas, num_shard):
    # What the launcher gives each shard (its group's GPUs, LOCAL_RANK) and what the shard then picks.
    gpus(num_shard)  # each shard sees its group's GPUs only
    for group in range(replicas):
        visible = group_visible_devices(None, replicas * num_shard, num_shard, group)
        for rank in range(num_shard):
            env = shard_environment(num_shard, rank, 29500, visible)
            device = resolve_device("cuda", int(env["LOCAL_RANK"]))
            physical = int(env["CUDA_VISIBLE_DEVICES"].split(",")[device.index])
            assert physical == group * num_shard + rank
            assert (env["RANK"], env["WORLD_SIZE"]) == (str(rank), str(num_shard))


def test_groups_take_their_gpus_from_the_launchers_visible_ones():
    assert group_visible_devices("2,3,4,5", 4, 2, 1) == "4,5"
    assert group_visible_devices("GPU-a, GPU-b", 2, 1, 1) == "GPU-b"
    with pytest.raises(HostCheckFailed, match="group 1 needs GPUs 4..7"):
        group_visible_devices(None, 6, 4, 1)
    cuda = HostPlan("m", False, 2, "cuda", 4, "bfloat16", 8)
    args = argparse.Namespace(device="auto")
    assert launch_serving.group_devices(cuda, args, 2) == ["0,1", "2,3"]
    assert launch_serving.group_devices(HostPlan("m", False, 2, "cpu", 0, "float32", 8), args, 2) == [None, None]
    assert launch_serving.group_devices(cuda, argparse.Namespace(device="cuda:1"), 1) == [None]


def test_the_host_check_refuses_too_few_gpus_and_defaults_to_one_shard_per_gpu(gpus, demo_dir):
    gpus(4)
    with pytest.raises(PreflightFailed, match="--replicas 2 x --num-shard 4 needs 8 GPUs, one per shard; this host"):
        plan("cuda", "auto", None, 4, 2, "tp", str(demo_dir))
    assert plan("auto", "auto", None, None, 1, "tp", str(demo_dir)).num_shard == 4
    assert plan("cuda", "auto", None, None, 2, "tp", str(demo_dir)).num_shard == 2
    found = plan("cuda:3", "auto", None, None, 1, "tp", str(demo_dir))
    assert (found.num_shard, found.device_type, found.dtype) == (1, "cuda", "bfloat16")
    with pytest.raises(PreflightFailed, match="names one GPU, for one shard"):
        plan("cuda:0", "auto", None, 2, 1, "tp", str(demo_dir))
    gpus(3)
    # 3 GPUs: 2 shards, the most that the demo's 8 heads, 4 KV heads and 512 intermediate divide.
    assert plan("cuda", "auto", None, None, 1, "tp", str(demo_dir)).num_shard == 2


def test_cpu_default_is_one_shard_per_core_up_to_what_the_model_divides(demo_dir):
    config = ModelConfig.from_pretrained(demo_dir)  # 4 KV heads
    assert [default_num_shard(cores, config, "tp") for cores in (0, 1, 2, 3, 4, 64)] == [1, 1, 2, 2, 4, 4]
    for n in (1, 2, 4):
        ParallelConfig(0, n, "tp").check(config)


def test_set_device_runs_on_the_model_thread_that_runs_every_call(gpus):
    calls = gpus(2)
    model = ModelThread(torch.device("cuda", 1))
    try:
        thread = model.run(threading.get_ident)
        assert thread != threading.get_ident()
        assert calls == [(thread, torch.device("cuda", 1))]

        def produce(abandoned: threading.Event):
            for i in range(3):
                yield i, threading.get_ident()

        assert [item for items in model.stream(produce) for item in items] == [(i, thread) for i in range(3)]
        with pytest.raises(ZeroDivisionError):
            model.run(lambda: 1 / 0)
    finally:
        model.close()


def test_a_stream_read_no_further_tells_its_producer():
    model = ModelThread(torch.device("cpu"))
    seen = threading.Event()

    def produce(abandoned: threading.Event):
        step = 0
        while not abandoned.is_set():
            yield step
            step += 1
        seen.set()

    stream = model.stream(produce)
    assert next(stream)[0] == 0
    stream.close()
    model.close()  # waits for the producer to end: it would not without the flag
    assert seen.is_set()


@pytest.fixture(scope="module")
def servicer(demo_dir):
    parallel = ParallelConfig()
    group = TensorParallelGroup(parallel)
    model = load_model(demo_dir, parallel, group, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, parallel, group, torch.device("cpu"), torch.float32, BLOCK)
    servicer = ShardServicer(runner, str(demo_dir), 16)
    yield servicer
    servicer.model.close()


def test_every_model_call_of_the_shard_runs_on_its_model_thread(servicer, monkeypatch):
    runner = servicer.runner
    threads: dict[str, set[int]] = {}
    for name in ("allocate_cache", "step", "release", "clear"):
        real = getattr(runner, name)

        def spy(*args, name=name, real=real):
            threads.setdefault(name, set()).add(threading.get_ident())
            return real(*args)

        monkeypatch.setattr(runner, name, spy)
    servicer.Warmup(shard_pb2.WarmupRequest(max_batch_tokens=32, max_batch_size=2, max_blocks=16), None)
    prompt = shard_pb2.SequenceStep(
        seq_id=1, token_ids=[1, 20, 30], start_position=0, slot_mapping=[0, 1, 2], block_table=[0], sample=True
    )
    prompt.sampling.CopyFrom(shard_pb2.SamplingParams(temperature=0.0))
    token = servicer.Step(shard_pb2.StepRequest(sequences=[prompt]), None).results[0].token_id
    decode = shard_pb2.SequenceStep(
        seq_id=1, token_ids=[token], start_position=3, slot_mapping=[3], block_table=[0], sample=True
    )
    answers = list(servicer.DecodeSteps(shard_pb2.StepRequest(sequences=[decode], num_steps=3, run_id=1), None))
    assert [a.steps for m in answers for a in (m, *m.following)] == [1, 2, 3]
    servicer.Release(shard_pb2.ReleaseRequest(seq_ids=[1]), None)
    servicer.Clear(shard_pb2.ClearRequest(), None)
    model_thread = servicer.model.run(threading.get_ident)
    assert set(threads) == {"allocate_cache", "step", "release", "clear"}
    assert set().union(*threads.values()) == {model_thread}


def launch_refused(*flags: str) -> str:
    """Run the real `mixserve launch` with `flags`; assert it exits 2 having started nothing; its stderr."""
    cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--port", str(free_port()), *flags]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert "event=startup_refused" in done.stderr and "shard_started" not in done.stderr
    return done.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_launch_refuses_a_gpu_on_a_cpu_only_torch_in_one_line(demo_dir):
    assert "--device cuda: torch" in launch_refused("--model", str(demo_dir), "--device", "cuda")


@pytest.mark.slow
def test_launch_refuses_a_bad_dtype_and_an_unsplittable_shard_count_in_one_line(demo_dir):
    assert "--dtype fp64: not one of auto" in launch_refused("--model", str(demo_dir), "--dtype", "fp64")
    line = launch_refused("--model", str(demo_dir), "--num-shard", "3")
    assert "--num-shard 3: cannot shard over world size 3" in line


@pytest.mark.slow
def test_a_hub_id_gets_the_command_that_downloads_it(tmp_path):
    line = launch_refused("--model", "mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert "`hf download mistralai/Mixtral-8x7B-Instruct-v0.1 --local-dir Mixtral-8x7B-Instruct-v0.1`" in line
    with pytest.raises(HostCheckFailed, match="no config.json there"):
        check_model_dir(str(tmp_path))
    with pytest.raises(HostCheckFailed, match="no such directory$"):
        check_model_dir(str(tmp_path / "nothing" / "here"))


@pytest.mark.slow
def test_launch_help_shows_every_default():
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    launcher.add_arguments(parser)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in formatter._get_help_string(action).lower(), action.option_strings
    done = subprocess.run(
        [PYTHON, "-m", "mixserve.cli", "launch", "--help"], env=subprocess_env(), capture_output=True, text=True
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "HTTP port the router binds (default: 8080)" in text
    assert "default: $MIXSERVE_API_KEY" in text and "on CPU one per core" in text


@pytest.mark.slow
def test_the_launcher_keeps_torch_out_of_the_router_process():
    """And its first half imports neither aiohttp nor grpc: the serving half's imports are what run beside
    the host check's child."""
    code = (
        "import sys, router.launcher, router.host_check\n"
        "early = sorted(name for name in ('aiohttp', 'grpc') if name in sys.modules)\n"
        "assert not early, f'{early} imported before the host check starts'\n"
        "import router.launch_serving\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([PYTHON, "-c", code], env=subprocess_env(), check=True, timeout=120)
