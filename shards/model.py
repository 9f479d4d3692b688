"""Mixtral (MixtralForCausalLM) built from tensor-parallel layers over a paged KV cache.

Takes token ids and positions, returns logits; nothing here knows about gRPC, tokenizers or
scheduling. Two all-reduces per decoder layer (attention output, MoE output), one all-gather of
the logits. Legend: T tokens in the step, H hidden size, V vocab size, R rows whose logits are asked.
"""

import torch
from torch import nn

from mixserve.shards import ops
from mixserve.shards.attention_metadata import AttentionMetadata
from mixserve.shards.checkpoint import CheckpointReader
from mixserve.shards.config import ModelConfig, ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kernels import decoder_layer
from mixserve.shards.kernels.stack_ends import ModelEnds
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.layers.attention import Attention
from mixserve.shards.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mixserve.shards.layers.linear import QKVParallelLinear, RowParallelLinear
from mixserve.shards.layers.moe import SparseMoE
from mixserve.shards.layers.norm import RMSNorm
from mixserve.shards.layers.rotary import RotaryEmbedding
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.int8_layers import Int8Experts, Int8Linear
from mixserve.shards.quant.int8_weight import Int8Weight


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, parallel: ParallelConfig, group: TensorParallelGroup, rotary: RotaryEmbedding
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, parallel, group, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(config, parallel, group)
        self._kernel_halves: tuple[decoder_layer.AttentionHalf, decoder_layer.MoEHalf] | None = None
        self._kernel_halves_read = False

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The layer's output [T, H] for its input hidden [T, H]."""
        moe_out, residual = self.forward_residual(positions, hidden, None, cache, meta)
        return residual + moe_out

    def forward_residual(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer over the input hidden + residual [T, H] (hidden alone for None), left as (its MoE
        output, its residual), whose sum is its output: the next layer adds them in its input norm
        (one `rms_norm` with residual, a fused kernel where one runs) instead of a separate add."""
        if residual is None:
            normed, residual = self.input_layernorm(hidden), hidden
        else:
            normed, residual = self.input_layernorm(hidden, residual=residual)
        attn = self.self_attn(positions, normed, cache, meta)
        normed, residual = self.post_attention_layernorm(attn, residual=residual)
        return self.block_sparse_moe(normed), residual

    def kernel_halves(self) -> tuple[decoder_layer.AttentionHalf, decoder_layer.MoEHalf] | None:
        """The two halves' weights as the CPU decoder layer kernel reads them (the `decoder_layers` op),
        or None where it cannot (weights held by bitsandbytes, or not all fp32 or all bf16 on the CPU,
        int8-wo's int8 projections and experts aside); gathered on first use after `load` (reading a
        module's parameters costs ~12 us a layer). The kernel reads the norms' weights in fp32: bf16
        ones are widened here, once."""
        if not self._kernel_halves_read:
            attn, moe = self.self_attn, self.block_sparse_moe
            w_qkv, w_o = _kernel_weight(attn.qkv_proj), _kernel_weight(attn.o_proj)
            experts = moe.quantized if isinstance(moe.quantized, Int8Experts) else moe
            w13, w2 = experts.w13, experts.w2
            weights = (w_qkv, w_o, moe.gate, w13, w2)
            dtypes = {w.dtype for w in weights if w is not None and not isinstance(w, Int8Weight)}
            on_cpu = all(w is not None and w.device.type == "cpu" for w in weights)
            if on_cpu and len(dtypes) == 1 and dtypes <= {torch.float32, torch.bfloat16}:
                self._kernel_halves = (self._attention_half(w_qkv, w_o), self._moe_half(w13, w2))
            self._kernel_halves_read = True
        return self._kernel_halves

    def _attention_half(
        self, w_qkv: torch.Tensor | Int8Weight, w_o: torch.Tensor | Int8Weight
    ) -> decoder_layer.AttentionHalf:
        attn, norm = self.self_attn, self.input_layernorm
        return decoder_layer.AttentionHalf(
            norm.weight.float(),
            norm.eps,
            w_qkv,
            w_o,
            attn.rotary.cos,
            attn.rotary.sin,
            attn.qkv_proj.num_heads,
            attn.scale,
            attn.sliding_window,
        )

    def _moe_half(self, w13: torch.Tensor | Int8Weight, w2: torch.Tensor | Int8Weight) -> decoder_layer.MoEHalf:
        moe, norm = self.block_sparse_moe, self.post_attention_layernorm
        weight = norm.weight.float()
        return decoder_layer.MoEHalf(weight, norm.eps, moe.gate, w13, w2, moe.top_k, moe.first_expert)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self._kernel_halves, self._kernel_halves_read = None, False
        self.input_layernorm.load(reader, f"{prefix}.input_layernorm.weight")
        self.self_attn.load(reader, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(reader, f"{prefix}.post_attention_layernorm.weight")
        self.block_sparse_moe.load(reader, f"{prefix}.block_sparse_moe")


def _kernel_weight(layer: QKVParallelLinear | RowParallelLinear) -> torch.Tensor | Int8Weight | None:
    """A projection's weight as the kernels read it: its parameter, its int8-wo weight, or None where
    bitsandbytes holds it."""
    if isinstance(layer.quantized, Int8Linear):
        return layer.quantized.weight
    return layer.weight


class MixtralForCausalLM(nn.Module):
    """This rank's slice of the whole model; every rank returns the same full logits.

    With `quantization`, the attention projections and the experts are held quantized (each layer
    quantizes its slice as it loads it), and with int8-wo the LM head too; embeddings, norms and
    router gates are not.
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig,
        group: TensorParallelGroup,
        quantization: QuantizationConfig | None = None,
    ):
        super().__init__()
        parallel.check(config)
        self.config = config
        self.quantization = quantization
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel, group)
        self.layers = nn.ModuleList(
            DecoderLayer(config, parallel, group, self.rotary) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel, group)
        self._kernel_ends: ModelEnds | None = None
        self._kernel_ends_read = False
        if quantization is not None:
            # Attention builds its own projections, so the setting reaches them (and the experts)
            # here, before load.
            quantized = (QKVParallelLinear, RowParallelLinear, SparseMoE)
            if quantization.weight_only_int8:
                quantized += (ParallelLMHead,)
            for module in self.modules():
                if isinstance(module, quantized):
                    module.quantization = quantization

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | None,
        gather_logits: bool = True,
        greedy_stats: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run tokens [T] at positions [T]; return logits [R, V] of the tokens at `logits_indices` [R]
        (None: of every token, R = T; with `gather_logits=False`, this rank's vocabulary slice [R, P] of
        them). With `greedy_stats` [R, 3] float64, also fill it with each row's greedy statistics over
        this rank's slice (the `causal_lm` op)."""
        return ops.current().causal_lm(
            self, token_ids, positions, kv_cache, meta, logits_indices, gather_logits, greedy_stats
        )

    def kernel_ends(self) -> ModelEnds | None:
        """The embedding, final norm and LM head as the CPU decoder stack's ends read them (the `causal_lm`
        op), or None where they cannot: an LM head held by bitsandbytes, weights off the CPU or not fp32
        or bf16, a norm not in the embedding's dtype. Gathered on first use after `load`."""
        if not self._kernel_ends_read:
            head, norm, embedding = self.lm_head, self.norm, self.embed_tokens.weight
            weight = head.quantized.weight if isinstance(head.quantized, Int8Linear) else head.weight
            data = weight.codes if isinstance(weight, Int8Weight) else weight
            if (
                data is not None
                and all(t.device.type == "cpu" for t in (embedding, norm.weight, data))
                and embedding.dtype in (torch.float32, torch.bfloat16)
                and norm.weight.dtype is embedding.dtype
            ):
                valid = max(min(head.rows_per_rank, self.config.vocab_size - head.vocab_start), 0)
                self._kernel_ends = ModelEnds(embedding, head.vocab_start, valid, norm.weight, norm.eps, weight)
            self._kernel_ends_read = True
        return self._kernel_ends

    def load(self, reader: CheckpointReader) -> None:
        """Fill every parameter with this rank's slice, read from the checkpoint."""
        self._kernel_ends, self._kernel_ends_read = None, False
        self.embed_tokens.load(reader, "model.embed_tokens.weight")
        for index, layer in enumerate(self.layers):
            layer.load(reader, f"model.layers.{index}")
        self.norm.load(reader, "model.norm.weight")
        head = (
            "model.embed_tokens.weight"
            if self.config.tie_word_embeddings and "lm_head.weight" not in reader
            else "lm_head.weight"
        )
        self.lm_head.load(reader, head)
        self.rotary.to(reader.device)
