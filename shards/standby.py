"""A shard started before the launcher's host check answered (`mixserve shard --standby`).

On a host that is surely CPU-only the launcher starts its shards first, with the flags it expects them
to need, so that their imports (torch and the shard's modules, ~3 s of a CPU start) run while the host
is checked instead of after; shard 0 runs the check itself (shards/preflight.py), which saves a process
that would import torch too. A standby shard reads its stdin before it does anything else, one JSON
line at a time: {"host_check": [flags]} is answered on stdout with the check's one JSON line;
{"go": true} starts the shard; stdin closed without it (the plan is not the one guessed, or the start was
refused) ends the process quietly.
"""

import json
import sys
from typing import TextIO


def wait_for_go(stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> bool:
    """Answer the launcher's host check if it asks; True once it says go, False where stdin ends first."""
    for line in stdin:
        request = json.loads(line)
        if "host_check" in request:
            from mixserve.shards.preflight import answer

            stdout.write(json.dumps(answer(request["host_check"])) + "\n")
            stdout.flush()
        elif request.get("go"):
            return True
    return False
