"""Warm-up timings kept between starts (`--warmup-timings`), so that a restart reuses them instead of timing
the same steps again.

At warm-up each CPU shard times the C kernels against torch (kernel_tokens.py: prefill steps of 16 to 256
tokens through the decoder layers; head_rows.py: the LM head at 32 to 128 rows) and keeps the sizes where
the kernel is not clearly slower. That took 2.3-3.9 s of a 6.7-13.8 s start of the 2-shard demo on an AVX2-only
AMD EPYC; on a large model every size is a whole prefill step of it, several times over, so it grows with
the model. The timings depend on the machine, the build and the shapes, not on the weights' values nor on
which start took them; so each rank stores its own, under a key holding everything they depend on (the
CPU's model and flags, the cores and threads, the huge page mode and request, torch's version, the C
libraries' build hashes and modes, a digest of the shards' Python sources, the rank's shapes and dtypes,
the sizes timed), and a later start whose every rank finds its key reuses them, logged `timings=stored`.
Any difference in the key times afresh and replaces the file. `fresh` always times afresh (a machine that
was busy when the stored ones were taken, say) and stores what it measured.

One JSON file per measurement and key in $MIXSERVE_CACHE/warmup (`<what>-<digest>.json`, holding the key
itself and the (size, kernel seconds, torch seconds) rows); written to a temporary file and renamed, so a
reader never sees half of one. An unreadable or mismatched file is a miss, logged, never an error.
Torch-free: the callers build the keys.
"""

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mixserve.shards.cache_dir import cache_root

MODES = ("stored", "fresh")
MODE_HELP = (
    "the C kernels' warm-up timings against torch: reuse those an earlier start stored for the same CPU, build "
    "and shapes, timing only where none match (stored), or time them again and replace them (fresh); kept in "
    "$MIXSERVE_CACHE/warmup"
)

Timings = list[tuple[int, float, float]]  # (size, kernel seconds, torch seconds), smallest size first

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class TimingsStore:
    """Where a shard's warm-up timings are kept, and whether a start may reuse them (`--warmup-timings`)."""

    directory: Path
    reuse: bool = True

    @classmethod
    def from_mode(cls, mode: str) -> "TimingsStore":
        if mode not in MODES:
            raise ValueError(f"warm-up timings must be one of {MODES}, not {mode!r}")
        return cls(cache_root() / "warmup", mode == "stored")

    def entry(self, what: str, key: dict) -> "StoredTimings":
        return StoredTimings(self, what, key)


@dataclass(slots=True, frozen=True)
class StoredTimings:
    """One measurement's timings under one key (`what`: kernel_tokens, head_rows)."""

    store: TimingsStore
    what: str
    key: dict

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        return self.store.directory / f"{self.what}-{digest}.json"

    def load(self) -> Timings | None:
        """The timings stored under this key; None where the store is not reused, or nothing (readable) is
        stored under it."""
        if not self.store.reuse or not self.path.exists():
            return None
        try:
            content = json.loads(self.path.read_text())
            if content["key"] != json.loads(json.dumps(self.key)):
                raise ValueError("the file's key is not this one")
            timings = [(int(size), float(kernel_s), float(torch_s)) for size, kernel_s, torch_s in content["timings"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("event=warmup_timings_unreadable path=%s error=%r", self.path, str(e))
            return None
        return timings

    def save(self, timings: Timings) -> None:
        """Store `timings` under this key, replacing what was there; a failure is logged, never raised (the
        next start times again)."""
        partial = None
        try:
            self.store.directory.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=self.store.directory, prefix=f".{self.what}-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"key": self.key, "timings": [list(row) for row in timings]}, f, sort_keys=True)
            os.replace(partial, self.path)
        except OSError as e:
            log.warning("event=warmup_timings_unsaved path=%s error=%r", self.path, str(e))
            if partial is not None and os.path.exists(partial):
                os.unlink(partial)
