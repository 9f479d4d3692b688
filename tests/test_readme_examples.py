"""The README's examples run as written against a real server: every Python and shell block of its
"Use" section, with only the host and ports pointed at the server this test starts."""

import json
import re
import subprocess

import pytest

from child_processes import PYTHON, REPO, free_port, subprocess_env

pytestmark = pytest.mark.slow


def use_section_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Use\n") : text.index("\n## Flags\n")]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    grpc_port = free_port()
    return launch("--model", str(demo_dir), "--num-shard", "2", "--grpc-port", str(grpc_port)), grpc_port


def pointed(block: str, http_port: int, grpc_port: int) -> str:
    block = block.replace("localhost:8080", f"127.0.0.1:{http_port}")
    return block.replace("localhost:50051", f"127.0.0.1:{grpc_port}")


def test_the_readme_has_its_examples():
    assert len(use_section_blocks("python")) >= 3 and len(use_section_blocks("bash")) >= 1


@pytest.mark.parametrize("index", range(3))
def test_python_examples_run_as_written(server, index):
    launched, grpc_port = server
    block = use_section_blocks("python")[index]
    done = subprocess.run(
        [PYTHON, "-c", pointed(block, launched.port, grpc_port)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the example printed nothing"
    if "json_schema" in block:  # its last line is the structured reply: JSON that validates, as it says
        reply = json.loads(done.stdout.strip().splitlines()[-1])
        assert set(reply) == {"name"} and isinstance(reply["name"], str) and len(reply["name"]) <= 20


def test_shell_examples_run_as_written(server):
    launched, grpc_port = server
    for block in use_section_blocks("bash"):
        done = subprocess.run(
            ["bash", "-e", "-c", pointed(block, launched.port, grpc_port)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() and '"error"' not in done.stdout, done.stdout[-3000:]
