"""Where mixserve keeps what it builds and measures on a machine: $MIXSERVE_CACHE, default ~/.cache/mixserve
(the C kernels, the demo checkpoints, the warm-up timings, the peers' builds). Torch-free."""

import os
from pathlib import Path


def cache_root() -> Path:
    """$MIXSERVE_CACHE, or ~/.cache/mixserve where it is unset or empty."""
    return Path(os.environ.get("MIXSERVE_CACHE") or Path.home() / ".cache" / "mixserve")
