"""Shared fixtures: a demo checkpoint written once per test session, free ports, shard groups."""

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process of the tests: one torch thread, repo importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "proto"), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The default demo checkpoint, written by the real writer into a session temp dir."""
    from shards.demo.checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "mixtral-demo")
