"""The Kubernetes manifests in deploy/ run commands that exist, with flags the commands accept, and
the multi-host router lists every shard the StatefulSet starts, in rank order."""

import argparse
import re
import shlex

import pytest
import yaml

from child_processes import REPO
from mixserve.router import launcher
from mixserve.router.shard_client import parse_shard_addresses
from mixserve.shards import cli as shard_cli

DEPLOY = REPO / "deploy" / "kubernetes"


def documents(name: str) -> dict[str, dict]:
    """`Kind/name` -> manifest, for every document of deploy/kubernetes/`name`."""
    docs = yaml.safe_load_all((DEPLOY / name).read_text())
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def container(manifest: dict) -> dict:
    [only] = manifest["spec"]["template"]["spec"]["containers"]
    return only


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # unknown flags end in parser.error -> SystemExit
        raise AssertionError(f"flags not accepted: {argv}") from e


@pytest.mark.parametrize("name,router", [("replicas.yaml", "Deployment/mixserve"), ("multi-host.yaml", None)])
def test_launch_flags_are_accepted(name, router):
    docs = documents(name)
    router = router or "Deployment/mixserve-router"
    spec = container(docs[router])
    assert spec["command"] == ["mixserve", "launch"]
    args = parse(launcher.add_arguments, spec["args"])
    served = docs["Service/mixserve"]["spec"]
    assert served["selector"] == docs[router]["spec"]["template"]["metadata"]["labels"]
    assert [p["containerPort"] for p in spec["ports"]] == [args.port] and args.host == "0.0.0.0"


def test_router_lists_every_shard_of_the_statefulset_in_rank_order():
    docs = documents("multi-host.yaml")
    shards = docs["StatefulSet/mixserve-shards"]
    words = shlex.split(container(shards)["args"][0])
    assert words[:2] == ["exec", "torchrun"]
    torchrun = dict(re.fullmatch(r"--([a-z-]+)=(.*)", w).groups() for w in words[2 : words.index("-m")])
    assert words[words.index("-m") + 1 : words.index("shard") + 1] == ["mixserve.cli", "shard"]
    shard_args = parse(shard_cli.add_arguments, words[words.index("shard") + 1 :])
    nodes, per_node = int(torchrun["nnodes"]), int(torchrun["nproc-per-node"])
    assert shards["spec"]["replicas"] == nodes
    assert shard_args.tls_cert and shard_args.host == "0.0.0.0"

    service = shards["spec"]["serviceName"]
    expected = [
        f"{service}-{node}.{service}:{shard_args.port + local}" for node in range(nodes) for local in range(per_node)
    ]
    router_args = parse(launcher.add_arguments, container(docs["Deployment/mixserve-router"])["args"])
    assert parse_shard_addresses(router_args.shard_addresses) == expected
    assert torchrun["master-addr"] == f"{service}-0.{service}"
    ports = {p["port"] for p in docs[f"Service/{service}"]["spec"]["ports"]}
    assert ports == {int(torchrun["master-port"]), *(shard_args.port + local for local in range(per_node))}
