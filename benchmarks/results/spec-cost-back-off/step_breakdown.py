"""Shard time by kind of step from a router's debug log (`mixserve launch --log-level debug`): decodes of
8 sequences, of fewer, and steps that also prefill; and the multi-step runs started.

    python step_breakdown.py plain-debug.log spec-debug.log
"""

import collections
import re
import sys

STEP = re.compile(
    r"event=step step=\d+ decode_seqs=(\S*) prefill_tokens=(\d+) prefill_seqs=\S* shard_us=(\d+) ms=([\d.]+)"
)

for path in sys.argv[1:]:
    kinds = collections.defaultdict(lambda: [0, 0.0, 0.0])
    runs = 0
    for line in open(path):
        runs += "event=decode_run" in line
        m = STEP.search(line)
        if not m:
            continue
        decodes = len([s for s in m.group(1).split(",") if s])
        kind = ("prefill" if int(m.group(2)) else "decode") + ("-b8" if decodes == 8 else "-b<8")
        k = kinds[kind]
        k[0] += 1
        k[1] += int(m.group(3)) / 1000
        k[2] += float(m.group(4))
    print(path, "steps' wall ms", round(sum(k[2] for k in kinds.values())), "runs", runs)
    for kind in sorted(kinds):
        n, shard, wall = kinds[kind]
        print(f"  {kind:12s} n={n:4d} shard={shard:8.1f} ms wall={wall:8.1f} ms  per step={shard / n:.2f} ms")
