"""Decode steps through static buffers, replayed as CUDA graphs: one graph per bucket of rows.

A decode step (one token per sequence) is padded up to the smallest bucket (1, 2, 4, ... up to the
largest the warm-up allows) that holds it, its token ids, positions, slots, block tables and
context lengths are written into pinned host buffers and copied (non-blocking) into device buffers
that never move, and the graph captured for that bucket at warm-up is replayed: every kernel of the
model forward, the NCCL all-reduces included, in one launch, with no host sync inside. Sampling
runs after it, eagerly, on the logits rows of the real sequences.

A row is one token: a step whose sequences have a few tokens each (a speculative verification: the last
token and its proposals; a draft model's catch-up) takes the same path, each token a row of its own
with its position, its slot, its sequence's block table and a context that ends at it. A layer writes
every row's K/V before any row attends, so a token sees the step's earlier tokens of its sequence and
not the later ones: the causal attention of a chunk. Each step keeps the rows of its last token and of
its proposals, as the plain forward returns them. The buckets reach VERIFY_ROWS at least, so a
verification step of the router's widest is graphed whatever the largest batch.

Padding rows decode token 0 at position 0, write their K/V to a scratch block the shard reserves
after the router's blocks (never in a step's table), and attend to that one slot (context 1).
The host buffers are rewritten at the start of the next step; the step in between has synced on
its sampled tokens, so the previous copy out of them has finished.

`eager` runs the same buffers and padding without capture (any device): how CI checks the path.
Legend: B sequences in the step, b its bucket, M block-table width (most blocks a sequence can
have), S block size, P this rank's vocabulary slice.
"""

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.model import MixtralForCausalLM

log = logging.getLogger(__name__)

MODES = ("auto", "off", "eager")
# The most positions a speculating step verifies (the router's speculation.VERIFY_ROWS): the rows the
# largest bucket holds at least.
VERIFY_ROWS = 32


class DecodeToken(Protocol):
    """What the graph runner reads of a sequence's step (sequence_step.SequenceStep has it)."""

    token_ids: list[int]
    start_position: int
    slot_mapping: list[int]
    block_table: list[int]
    num_proposed: int


def buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: powers of two below `max_batch`, and `max_batch` itself."""
    if max_batch < 1:
        raise ValueError(f"the largest graph batch must be positive, got {max_batch}")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


def wanted(mode: str, device: torch.device, quantized: bool) -> bool:
    """Whether the runner takes decode steps through this path: `auto` on CUDA (not with bitsandbytes,
    whose ops are not known to be capturable), `eager` anywhere, `off` never."""
    if mode not in MODES:
        raise ValueError(f"cuda graphs must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto" and quantized and device.type == "cuda":
        log.info("event=cuda_graphs enabled=false reason=quantized")
    return mode == "eager" or (mode == "auto" and device.type == "cuda" and not quantized)


@contextlib.contextmanager
def sync_free(model: MixtralForCausalLM) -> Iterator[None]:
    """Within it, the model's MoE layers hold no host sync: Triton's fused MoE where the ops chose it,
    else the dense path (see dense_experts)."""
    layers = [layer.block_sparse_moe for layer in model.layers]
    for moe in layers:
        moe.sync_free = True
    try:
        yield
    finally:
        for moe in layers:
            moe.sync_free = False


class DecodeGraphRunner:
    """Static buffers for decode steps of up to `max_batch` sequences over `kv_cache`, whose first
    reserved block is the padding rows' scratch; with `capture`, one CUDA graph per bucket."""

    @torch.inference_mode()
    def __init__(self, model: MixtralForCausalLM, kv_cache: KVCache, max_batch: int, capture: bool) -> None:
        if kv_cache.keys.shape[1] <= kv_cache.num_blocks:
            raise ValueError("the decode graph runner needs a KV cache with a reserved scratch block")
        device = kv_cache.keys.device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = buckets(max_batch)
        self.block_size = kv_cache.block_size
        self.scratch_block = kv_cache.num_blocks
        self.width = min(-(-model.config.max_position_embeddings // self.block_size), kv_cache.num_blocks)
        rows = self.buckets[-1]
        pinned = device.type == "cuda"

        def host(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, pin_memory=pinned)

        # Host staging and its device twins: token ids, positions, slots [rows], block tables [rows, M],
        # context lengths [rows].
        self.host = [host(rows), host(rows), host(rows), host(rows, self.width), host(rows)]
        self.views = [t.numpy() for t in self.host]
        self.static = [t.to(device) for t in self.host]
        self.logits_rows = torch.arange(rows, device=device)  # [rows]: every row's logits
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> its graph's logits [b, P]
        self._write_padding(0, rows)
        self._copy_in(rows)
        if capture:
            self._capture()
        log.info("event=decode_graphs captured=%s buckets=%s table_width=%d", capture, self.buckets, self.width)

    def fits(self, steps: Sequence[DecodeToken]) -> bool:
        """Whether `steps` is a step this runner takes: few enough tokens in all for the largest bucket,
        every context within the table width."""
        reach = self.width * self.block_size
        rows = sum(len(s.token_ids) for s in steps)
        return rows <= self.buckets[-1] and all(s.start_position + len(s.token_ids) <= reach for s in steps)

    @torch.inference_mode()
    def forward(self, steps: Sequence[DecodeToken], gather_logits: bool = True) -> torch.Tensor:
        """Logits [L, V] of each step's last token and its proposals, in order (with `gather_logits=False`,
        this rank's slice [L, P]); a view of the bucket's output where every row is kept (decode steps),
        valid until the next step."""
        count, kept = self._write_steps(steps)
        bucket = next(b for b in self.buckets if b >= count)
        self._write_padding(count, bucket)
        self._copy_in(bucket)
        graph = self.graphs.get(bucket)
        if graph is None:
            local = self.run(bucket)
        else:
            with torch.cuda.device(self.logits_rows.device):  # a gRPC thread may have another GPU current
                graph.replay()
            local = self.outputs[bucket]
        logits = local[:count] if kept is None else local[kept]
        return self.model.lm_head.gather(logits) if gather_logits else logits

    def _write_steps(self, steps: Sequence[DecodeToken]) -> tuple[int, list[int] | None]:
        """Every token of `steps` as a row of the host buffers: how many rows, and the rows of each step's
        last token and its proposals (None where that is every row: decode and verification steps)."""
        token_ids, positions, slots, tables, context_lens = self.views
        ids: list[int] = []
        places: list[int] = []
        slot_ids: list[int] = []
        kept: list[int] = []
        every_row = True
        size = self.block_size
        for s in steps:
            count, row = len(s.token_ids), len(ids)
            ids += s.token_ids
            places += range(s.start_position, s.start_position + count)
            slot_ids += s.slot_mapping[:count]
            every_row = every_row and count == 1 + s.num_proposed
            kept += range(row + count - 1 - s.num_proposed, row + count)
            for j in range(count):
                used = (s.start_position + j) // size + 1
                tables[row + j, :used] = s.block_table[:used]
                tables[row + j, used:] = self.scratch_block
        rows = len(ids)
        token_ids[:rows], positions[:rows], slots[:rows] = ids, places, slot_ids
        context_lens[:rows] = [p + 1 for p in places]
        return rows, None if every_row else kept

    def _write_padding(self, start: int, end: int) -> None:
        token_ids, positions, slots, tables, context_lens = self.views
        token_ids[start:end] = 0
        positions[start:end] = 0
        slots[start:end] = self.scratch_block * self.block_size
        tables[start:end] = self.scratch_block
        context_lens[start:end] = 1

    def _copy_in(self, rows: int) -> None:
        for host, static in zip(self.host, self.static, strict=True):
            static[:rows].copy_(host[:rows], non_blocking=True)

    def run(self, bucket: int) -> torch.Tensor:
        """The model forward over the first `bucket` rows of the static buffers: local logits [b, P]."""
        token_ids, positions, slots, tables, context_lens = (t[:bucket] for t in self.static)
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode_tokens=bucket,
            decode_block_tables=tables,
            decode_context_lens=context_lens,
        )
        with sync_free(self.model):
            return self.model(token_ids, positions, self.kv_cache, meta, self.logits_rows[:bucket], gather_logits=False)

    def _capture(self) -> None:
        """One graph per bucket, largest first, all in one memory pool (a smaller bucket's temporaries
        fit in what the larger one's left). Each is run once eagerly first, on a side stream, so that
        allocator, cuBLAS and NCCL set-up happen outside the capture."""
        device = self.static[0].device
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device):
            for bucket in reversed(self.buckets):
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self.run(bucket)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bucket] = self.run(bucket)
                self.graphs[bucket] = graph
            torch.cuda.synchronize(device)
