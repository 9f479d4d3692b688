"""--stream-interval-ms: the shard's model thread wakes the thread that sends a run's steps at most once per
interval, so the steps a fast run finishes meanwhile travel together (ModelThread.stream's lists, then one
DecodeSteps answer with `following`: tests/test_multi_step.py)."""

import argparse
import threading
import time

import pytest
import torch

from mixserve.router import launch_args as flags
from mixserve.shards.model_thread import ModelThread


def launch_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_flag_defaults_to_ten_ms_and_refuses_what_a_stream_cannot_be(capsys):
    assert launch_args().stream_interval_ms == flags.DEFAULT_STREAM_INTERVAL_MS == 10.0
    assert launch_args("--stream-interval-ms", "0").stream_interval_ms == 0
    for bad in ("-1", "1001", "soon"):
        with pytest.raises(SystemExit):
            launch_args("--stream-interval-ms", bad)
        assert "--stream-interval-ms" in capsys.readouterr().err


@pytest.fixture
def model_thread():
    thread = ModelThread(torch.device("cpu"))
    yield thread
    thread.close()


def test_a_long_interval_hands_a_quick_producers_items_over_together(model_thread):
    """The first item wakes the reader at once; the rest wait for the end, or for the reader to come back
    for them."""

    def produce(abandoned: threading.Event):
        yield from range(50)

    lists = list(model_thread.stream(produce, interval_s=60.0))
    assert [item for items in lists for item in items] == list(range(50))
    assert len(lists) < 50 and lists[0][0] == 0


def test_items_half_the_interval_apart_are_each_handed_over(model_thread):
    """A producer as slow as a GPU's Mixtral decode step under the default interval (9.4 ms against 10):
    each item goes out as it is made. Waiting for the next item would hand them over in pairs, twice as
    far apart as they are made (scaled up here, 0.2 s items under a 0.3 s interval, so a slow machine
    still reads each list before the next item)."""

    def produce(abandoned: threading.Event):
        for item in range(5):
            time.sleep(0.2)
            yield item

    lists = list(model_thread.stream(produce, interval_s=0.3))
    assert [item for items in lists for item in items] == list(range(5))
    assert len(lists) >= 4, lists  # waiting for the next item gives [[0], [1, 2], [3, 4]]


def test_no_interval_hands_every_item_over_in_order(model_thread):
    def produce(abandoned: threading.Event):
        yield from range(50)

    lists = list(model_thread.stream(produce))
    assert [item for items in lists for item in items] == list(range(50))
    assert all(lists)


def test_the_items_made_before_an_error_arrive_before_it(model_thread):
    def produce(abandoned: threading.Event):
        yield 1
        yield 2
        raise RuntimeError("step failed")

    seen = []
    with pytest.raises(RuntimeError, match="step failed"):
        for items in model_thread.stream(produce, interval_s=60.0):
            seen += items
    assert seen == [1, 2]
