"""The roofline's read (benchmarks/read_bandwidth.py): the C loop reads every element of its streams, each
method times a real read, and a machine without a compiler keeps torch's sum."""

import shutil

import pytest
import torch

from mixserve.benchmarks import read_bandwidth


@pytest.fixture
def compiler():
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the read is torch's sum alone")


@pytest.mark.parametrize("streams", [1, 4, 8, 16])
def test_read_streams_sums_each_streams_elements(compiler, streams):  # noqa: ARG001 - builds the C loop
    values = torch.arange(8 * 16 * 37 + 5, dtype=torch.float32) % 251  # exact in fp32 partial sums
    function = read_bandwidth._read_streams()
    chunk = values.numel() // streams // 8 * 8  # what the loop covers: whole vectors of each stream
    expected = sum(float(values[s * chunk : (s + 1) * chunk].double().sum()) for s in range(streams))
    assert function(values.data_ptr(), values.numel(), streams) == expected


def test_read_streams_refuses_stream_counts_it_cannot_hold(compiler):  # noqa: ARG001
    values = torch.ones(1024)
    function = read_bandwidth._read_streams()
    assert function(values.data_ptr(), values.numel(), 0) == 0.0
    assert function(values.data_ptr(), values.numel(), 17) == 0.0


@pytest.mark.parametrize("threads", [1, 2])
def test_every_method_times_a_read(compiler, threads):  # noqa: ARG001
    buffer = torch.ones(1 << 20)
    methods = read_bandwidth.read_methods()
    assert set(methods) == {"sum", *(f"{s} streams" for s in read_bandwidth.STREAMS)}
    for method in methods:
        assert read_bandwidth.read_once(buffer, method, threads) > 0
    assert read_bandwidth.read_seconds(buffer, threads) > 0


def test_without_a_compiler_the_read_is_torchs_sum(monkeypatch):
    from mixserve.shards.kernels import native

    monkeypatch.setattr(read_bandwidth, "_library", [])
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    assert list(read_bandwidth.read_methods()) == ["sum"]
    assert read_bandwidth.read_seconds(torch.ones(1024)) > 0
