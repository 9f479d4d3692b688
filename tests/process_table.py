"""The process table as tests read it: a launcher's shard children, and whether a process is gone."""

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShardProcess:
    """A `mixserve shard` child of a launcher, as the process table shows it."""

    pid: int
    group: int
    rank: int
    uds: Path
    argv: tuple[str, ...]


def children(parent: int) -> list[int]:
    """The pids of `parent`'s live children."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while listed
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def gone(pid: int) -> bool:
    """Whether no process has `pid` any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def shard_processes(parent: int) -> list[ShardProcess]:
    """The live `mixserve shard` children of process `parent`, sorted by group and rank. The group is read
    from the socket directory the launcher gives each start of a group (`group-N`: group 0, `groupG-N`)."""
    shards = []
    for pid in children(parent):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "mixserve.cli" not in argv or "shard" not in argv or "--uds" not in argv:
            continue
        uds = Path(argv[argv.index("--uds") + 1])
        group = re.fullmatch(r"group(\d*)-\d+", uds.parent.name)
        assert group, f"unexpected shard socket directory {uds.parent}"
        rank = int(argv[argv.index("--rank") + 1])
        shards.append(ShardProcess(pid, int(group.group(1) or 0), rank, uds, tuple(argv)))
    return sorted(shards, key=lambda shard: (shard.group, shard.rank))
