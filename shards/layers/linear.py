"""Column- and row-parallel linear layers (Megatron style) and the merged QKV projection.

With `quantization` set before load, a layer holds its slice quantized (`quantized`) instead of
`weight`; the forward picks the path by which one it holds.
Legend: T tokens, H hidden size, d head dim, n = world size; `_l` marks this rank's share.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mixserve.shards.checkpoint import CheckpointReader
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.quant.config import QuantizationConfig
from mixserve.shards.quant.linear import QuantizedLinear, quantize_linear


def materialize(tensor: torch.Tensor, like: nn.Parameter, device: torch.device) -> nn.Parameter:
    """A frozen parameter holding `tensor` on `device`, in the dtype the module was built with."""
    return nn.Parameter(tensor.to(dtype=like.dtype, device=device).contiguous(), requires_grad=False)


def set_weight(layer: "QKVParallelLinear | RowParallelLinear", tensor: torch.Tensor, device: torch.device) -> None:
    """Give `layer` its weight slice: as `weight`, or quantized as `quantized` (then `weight` is None)."""
    if layer.quantization is None:
        layer.weight = materialize(tensor, layer.weight, device)
    else:
        layer.quantized = quantize_linear(tensor, layer.quantization, layer.weight.dtype, device)
        layer.weight = None


class QKVParallelLinear(nn.Module):
    """q, k and v projections merged into one matmul, split over ranks by attention head."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, parallel: ParallelConfig):
        super().__init__()
        self.parallel = parallel
        self.head_dim = head_dim
        self.num_heads = num_heads // parallel.world_size
        self.num_kv_heads = num_kv_heads // parallel.world_size
        rows = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)  # [(h_l + 2 kv_l) d, H]
        self.quantization: QuantizationConfig | None = None
        self.quantized: QuantizedLinear | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = F.linear(x, self.weight) if self.quantized is None else self.quantized(x)  # [T, (h_l + 2 kv_l) d]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return qkv.split([q_size, kv_size, kv_size], dim=-1)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        parts = []
        for name, heads in (("q_proj", self.num_heads), ("k_proj", self.num_kv_heads), ("v_proj", self.num_kv_heads)):
            rows = heads * self.head_dim
            start = self.parallel.rank * rows
            parts.append(reader.read(f"{prefix}.{name}.weight", dim=0, start=start, end=start + rows))
        set_weight(self, torch.cat(parts, dim=0), reader.device)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split on its input dimension; the partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelConfig, group: TensorParallelGroup):
        super().__init__()
        self.parallel = parallel
        self.group = group
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // parallel.world_size), requires_grad=False
        )  # [out, in_l]
        self.quantization: QuantizationConfig | None = None
        self.quantized: QuantizedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(F.linear(x, self.weight) if self.quantized is None else self.quantized(x))

    def load(self, reader: CheckpointReader, name: str) -> None:
        start, end = self.parallel.split(reader.shape(name)[1])
        set_weight(self, reader.read(name, dim=1, start=start, end=end), reader.device)
