"""A shard group on TCP, as torchrun starts one, behind `mixserve launch --shard-addresses`.

Two `mixserve shard --port P` processes get torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and no rank flags; each listens on P + LOCAL_RANK with TLS and a shard
token, and their collectives go through gloo over loopback TCP (as between hosts). The router
started with their addresses must serve the same greedy text as the launcher's own unix-socket
group (here with expert parallelism, which must not change the text either), and a wrong token
must be refused.
"""

import socket
import subprocess

import grpc
import pytest
import requests

from child_processes import PYTHON, free_port, subprocess_env
from launched_server import get_json, wait_until
from mixserve_pb import shard_pb2, shard_pb2_grpc

pytestmark = pytest.mark.slow

TOKEN = "s3cret-shard-token"
PROMPTS = ["The stone ", "Once upon a time", "[INST] Hi [/INST]"]
# Both groups compared serve fp32: the TCP group sums over torch's collectives with the experts sliced,
# the Unix-socket group over shared memory with whole experts (ep). In bf16 the kernels round each
# matmul's input to bf16, where those different summation orders can move a near-tied greedy pick of
# the random demo; in fp32 they stay far below one.
FP32 = ["--dtype", "float32"]


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free on loopback."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def start_tcp_shards(demo_dir, tls, port: int, logs) -> list[subprocess.Popen]:
    """Two TCP shards on `port` and `port + 1`, as torchrun would start them on one host, in fp32 (FP32:
    the test compares their text with a group that splits and sums differently)."""
    cert, key = tls
    master_port = str(free_port())
    cmd = [PYTHON, "-m", "mixserve.cli", "shard", "--model", str(demo_dir), "--port", str(port), *FP32]
    cmd += ["--collectives", "torch", "--tls-cert", str(cert), "--tls-key", str(key)]
    procs = []
    for rank in range(2):
        env = subprocess_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=master_port,
            MIXSERVE_SHARD_TOKEN=TOKEN,
        )
        with open(logs / f"shard{rank}.log", "a") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.fixture(scope="module")
def tcp_group(demo_dir, tls, tmp_path_factory):
    """Two TCP shards; yields their addresses, the processes (a test may replace them) and the log dir."""
    port = free_port_pair()
    logs = tmp_path_factory.mktemp("tcp-shards")
    procs = start_tcp_shards(demo_dir, tls, port, logs)
    yield [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"], procs, logs
    for p in procs:
        p.kill()
        p.wait()


def greedy_texts(url: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": False}
        response = requests.post(f"{url}/predict", json=body, timeout=120)
        assert response.status_code == 200, response.text
        texts.append(response.json()["output"])
    return texts


def launch_once(demo_dir, *args: str) -> subprocess.CompletedProcess:
    """`mixserve launch` expected to give up at start-up: its exit code and log."""
    cmd = [PYTHON, "-m", "mixserve.cli", "launch", "--model", str(demo_dir), "--port", str(free_port())]
    cmd += ["--shard-timeout", "120", *args]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def launch_remote(launch, demo_dir, addresses: list[str], cert):
    """`mixserve launch` serving the TCP group at `addresses` (token and TLS), starting no shards."""
    return launch(
        "--model", str(demo_dir), "--shard-addresses", ",".join(addresses), "--shard-token", TOKEN,
        "--shard-ca", str(cert), *FP32,
    )  # fmt: skip


def secure_stub(address: str, cert) -> shard_pb2_grpc.ShardServiceStub:
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()))
    grpc.channel_ready_future(channel).result(timeout=300)
    return shard_pb2_grpc.ShardServiceStub(channel)


def test_tcp_group_serves_the_same_text_as_unix_sockets(demo_dir, tcp_group, tls, launch):
    addresses, _, logs = tcp_group
    cert, _ = tls
    remote = launch_remote(launch, demo_dir, addresses, cert)
    try:
        over_tcp = greedy_texts(remote.url)
        assert requests.get(f"{remote.url}/info", timeout=30).json()["num_shard"] == 2
        assert remote.shards() == [], "the launcher started shards"
    finally:
        remote.stop()
    # Each shard took its rank from torchrun's variables and listens on P + LOCAL_RANK, over TLS with the token.
    for rank, address in enumerate(addresses):
        metadata = [("authorization", f"Bearer {TOKEN}")]
        info = secure_stub(address, cert).Info(shard_pb2.InfoRequest(), metadata=metadata, timeout=30)
        assert (info.rank, info.world_size) == (rank, 2)
        log = (logs / f"shard{rank}.log").read_text()
        assert TOKEN not in log, "the shard token is never logged: the log is the contract"
    local = launch("--model", str(demo_dir), "--num-shard", "2", "--moe-parallel", "ep", *FP32)
    try:
        assert all(shard.argv[shard.argv.index("--moe-parallel") + 1] == "ep" for shard in local.shards())
        assert greedy_texts(local.url) == over_tcp
    finally:
        local.stop()


def test_wrong_or_missing_token_is_refused(demo_dir, tcp_group, tls):
    addresses, _, _ = tcp_group
    cert, _ = tls
    stub = secure_stub(addresses[1], cert)
    for metadata in ([("authorization", "Bearer wrong")], [("authorization", TOKEN)], None):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Info(shard_pb2.InfoRequest(), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as refused:  # a streaming method is refused alike
        list(stub.DecodeSteps(shard_pb2.StepRequest(), metadata=[("authorization", "Bearer wrong")], timeout=30))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = stub.Info(shard_pb2.InfoRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
    assert (info.rank, info.world_size) == (1, 2)

    wrong = launch_once(
        demo_dir, "--shard-addresses", ",".join(addresses), "--shard-token", "x", "--shard-ca", str(cert)
    )
    assert wrong.returncode == 1
    assert "UNAUTHENTICATED" in wrong.stderr and "--shard-token" in wrong.stderr


def test_addresses_must_be_one_group_in_rank_order(demo_dir, tcp_group, tls):
    addresses, _, _ = tcp_group
    cert, _ = tls
    secure_stub(addresses[0], cert)
    swapped = ",".join(reversed(addresses))
    done = launch_once(demo_dir, "--shard-addresses", swapped, "--shard-token", TOKEN, "--shard-ca", str(cert))
    assert done.returncode == 1
    assert f"{addresses[1]} is rank 1 of 2" in done.stderr and "in rank order" in done.stderr
    done = launch_once(demo_dir, "--shard-addresses", addresses[0], "--shard-token", TOKEN, "--shard-ca", str(cert))
    assert done.returncode == 1 and "is rank 0 of 2" in done.stderr


def test_open_tcp_needs_a_token_or_tls(demo_dir, tmp_path):
    cmd = [PYTHON, "-m", "mixserve.cli", "shard", "--model", str(demo_dir), "--host", "0.0.0.0"]
    cmd += ["--port", str(free_port())]
    env = subprocess_env(RANK="0", WORLD_SIZE="1", MIXSERVE_SHARD_TOKEN="")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr and "--insecure" in done.stderr


def test_a_group_restarted_elsewhere_is_warmed_up_again_while_idle(demo_dir, tcp_group, tls, launch):
    """Its supervisor (torchrun, Kubernetes) restarts the group while no request runs: the router
    sees it fail Health, reconnects, warms it up and serves again, without a request failing first."""
    addresses, procs, logs = tcp_group
    cert, _ = tls
    remote = launch_remote(launch, demo_dir, addresses, cert)
    try:
        before = greedy_texts(remote.url)
        # A request's last token can reach its client before the multi-step run that made it has ended on
        # every rank (rank 1 answers once, at the end): shards killed then fail that DecodeSteps, not Health.
        # The engine runs one step at a time, so a one-token request (a single step, answered by every rank
        # before its token is handed out) answers only once the run is over and nothing is in flight.
        body = {"prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0, "stream": False}
        assert requests.post(f"{remote.url}/predict", json=body, timeout=120).status_code == 200
        for p in procs:
            p.kill()
            p.wait()
        procs[:] = start_tcp_shards(demo_dir, tls, int(addresses[0].rsplit(":", 1)[1]), logs)

        def restarted() -> bool:
            group = get_json(f"{remote.url}/info")["shard_groups"][0]
            return group["restarts"] == 1 and group["status"] == "serving"

        wait_until(restarted, "the group restarted elsewhere serves again", 240, 0.5)
        assert requests.get(f"{remote.url}/health", timeout=30).status_code == 200
        failure = get_json(f"{remote.url}/info")["shard_groups"][0]["last_failure"]
        assert "failed Health 3 times in a row" in failure, failure
        assert greedy_texts(remote.url) == before
    finally:
        remote.stop()
