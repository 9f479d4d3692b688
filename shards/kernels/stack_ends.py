"""The two ends of a whole-model decode step in decoder_stack's one C call (stack_ends.c): the token
embedding before the first layer; the final norm, the LM head and the greedy statistics after the last.

`ModelEnds` holds a model's embedding, final norm and LM head as the call reads them, checked once
when built; `ModelEnds.step` fills its one StackEnds with a step's own pointers (token ids, the rows
asked for, the outputs) and returns it for decoder_stack.run. A model's ends serve one step at a time
(the shard's model thread).

Legend: T tokens, R rows asked for, H hidden size, P this rank's vocabulary rows.
"""

import ctypes

import torch

from mixserve.shards.kernels.checks import element_type, pointer, require, same, weight_parts
from mixserve.shards.quant.int8_weight import Int8Weight

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class StackEnds(ctypes.Structure):
    """stack_ends.c's StackEnds."""

    _fields_ = [
        ("token_ids", _P),
        ("T", _I64),
        ("embedding", _P),
        ("embedding_type", _I64),
        ("vocab_start", _I64),
        ("vocab_rows", _I64),
        ("rows", _P),
        ("R", _I64),
        ("norm_weight", _P),
        ("round_bf16", _I64),
        ("head", _P),
        ("head_scale", _P),
        ("head_type", _I64),
        ("P", _I64),
        ("valid", _I64),
        ("logits", _P),
        ("stats", _P),
        ("norm_eps", ctypes.c_float),
    ]


class ModelEnds:
    """A model's ends as decoder_stack reads them: this rank's embedding rows [P, H] and LM head rows
    [P, H] (fp32, bf16, or the head as int8 codes), both from `vocab_start`, of which the first
    `valid` are real tokens; the final norm's weight [H] in the embedding's dtype, whose roundings
    (bf16) the head's path keeps. TypeError / ValueError for what the call cannot take."""

    def __init__(
        self,
        embedding: torch.Tensor,
        vocab_start: int,
        valid: int,
        norm_weight: torch.Tensor,
        norm_eps: float,
        head: torch.Tensor | Int8Weight,
    ) -> None:
        rows, hidden = require(embedding, "embedding", embedding.dtype, 2)
        embedding_type = element_type(embedding, "embedding")
        require(norm_weight, "norm weight", embedding.dtype, 1)
        head_type, head_data, scale, (head_rows, head_hidden) = weight_parts(head, "head", 2)
        same(
            "hidden sizes of the embedding, the norm and the head",
            embedding=hidden,
            norm=norm_weight.shape[0],
            head=head_hidden,
        )
        same("vocabulary rows of the embedding and the head", embedding=rows, head=head_rows)
        if not 0 <= valid <= rows:
            raise ValueError(f"valid columns {valid} must lie within the {rows} vocabulary rows")
        self.hidden_size, self.vocab_rows, self.dtype, self.head = hidden, rows, embedding.dtype, head
        # The tensors stay referenced here: the struct holds only their addresses.
        self._held = (embedding, norm_weight, head_data, scale)
        self._ends = StackEnds(
            embedding=embedding.data_ptr(),
            embedding_type=embedding_type,
            vocab_start=vocab_start,
            vocab_rows=rows,
            norm_weight=norm_weight.data_ptr(),
            round_bf16=int(embedding.dtype is torch.bfloat16),
            head=head_data.data_ptr(),
            head_scale=pointer(scale),
            head_type=head_type,
            P=rows,
            valid=valid,
            norm_eps=norm_eps,
        )
        # Every row, for a step whose logits rows are all its tokens: rows[:T] of it.
        self._every_row = torch.arange(0)

    def step(
        self, token_ids: torch.Tensor, rows: torch.Tensor | None, logits: torch.Tensor, stats: torch.Tensor | None
    ) -> StackEnds:
        """The struct for one step of token_ids [T] (int64, contiguous) whose rows `rows` [R] (int64; None:
        every token) go to logits [R, P] fp32, and their greedy statistics to stats [R, 3] float64 (None:
        none). The call refuses a row outside the step's tokens."""
        tokens = require(token_ids, "token_ids", torch.int64, 1)[0]
        if rows is None:
            if self._every_row.shape[0] < tokens:
                self._every_row = torch.arange(max(tokens, 64))
            rows, count = self._every_row, tokens
        else:
            count = require(rows, "rows", torch.int64, 1)[0]
        same("logits rows and rows asked for", logits=require(logits, "logits", torch.float32, 2)[0], rows=count)
        same("logits columns and vocabulary rows", logits=logits.shape[1], vocabulary=self.vocab_rows)
        if stats is not None and require(stats, "stats", torch.float64, 2) != (count, 3):
            raise ValueError(f"stats must be [{count}, 3], got {tuple(stats.shape)}")
        ends = self._ends
        ends.token_ids, ends.T, ends.rows, ends.R = token_ids.data_ptr(), tokens, rows.data_ptr(), count
        ends.logits, ends.stats = logits.data_ptr(), pointer(stats)
        return ends
