"""Argument checks for the C kernels' ctypes wrappers: every tensor whose pointer reaches C is checked
here first, so a wrong tensor raises instead of letting C read or write past it.

`require` checks one tensor (a CPU tensor of the dtype, contiguous, the number of dimensions, and
each fixed size); the wrappers then check the sizes against each other with `same`.
TypeError for a wrong dtype or device, ValueError for a wrong shape or layout.
"""

import torch

from mixserve.shards.quant.int8_weight import Int8Weight

INDEX_DTYPES = (torch.int32, torch.int64)
# The element types the kernels read weights and KV pools in, as element_type.h numbers them.
ELEMENT_TYPES = {torch.float32: 0, torch.bfloat16: 1}
# element_type.h's number for an Int8Weight's codes (weights only: never a KV pool).
ELEMENT_I8 = 2


def require(
    tensor: torch.Tensor,
    name: str,
    dtype: torch.dtype,
    dims: int,
    contiguous: bool = True,
) -> tuple[int, ...]:
    """Check `tensor` is a CPU tensor of `dtype` with `dims` dimensions (contiguous unless told);
    returns its shape."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")
    if not tensor.is_cpu:
        raise TypeError(f"{name} must be on the CPU, got {tensor.device}")
    shape = tuple(tensor.shape)
    if len(shape) != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {shape}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return shape


def element_type(tensor: torch.Tensor, name: str) -> int:
    """The kernels' number for `tensor`'s dtype (fp32 or bf16); TypeError for another."""
    dtype = getattr(tensor, "dtype", None)
    if dtype not in ELEMENT_TYPES:
        got = dtype if dtype is not None else type(tensor).__name__
        raise TypeError(f"{name} must be float32 or bfloat16, got {got}")
    return ELEMENT_TYPES[dtype]


def index(tensor: torch.Tensor, name: str, dims: int) -> torch.Tensor:
    """An integer index tensor (int32 or int64) as the contiguous int64 CPU tensor C reads."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {getattr(tensor, 'dtype', type(tensor))}")
    require(tensor, name, tensor.dtype, dims, contiguous=False)
    if tensor.dtype is torch.int64 and tensor.is_contiguous():
        return tensor
    return tensor.to(torch.int64).contiguous()


def same(what: str, **sizes: int) -> int:
    """The one value every size in `sizes` holds; ValueError naming them where they differ."""
    values = set(sizes.values())
    if len(values) != 1:
        raise ValueError(f"{what} must agree: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return values.pop()


def at_most(what: str, value: int, limit: int) -> None:
    """ValueError where `value` is past the kernel's fixed limit."""
    if value > limit:
        raise ValueError(f"{what} {value} is past the kernel's limit {limit}")


def weight_parts(
    weight: "torch.Tensor | Int8Weight", name: str, dims: int
) -> tuple[int, torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """A weight the kernels read in place: an fp32 or bf16 tensor, or an Int8Weight (int8 codes with one
    fp32 scale per row), each contiguous on the CPU with `dims` dimensions. Returns its element type,
    the tensor C reads, the row scales (None but for int8) and its shape."""
    if isinstance(weight, Int8Weight):
        shape = require(weight.codes, f"{name} codes", torch.int8, dims)
        require(weight.scale, f"{name} scale", torch.float32, dims - 1)
        return ELEMENT_I8, weight.codes, weight.scale, shape
    weight_type = element_type(weight, name)
    return weight_type, weight, None, require(weight, name, weight.dtype, dims)


def pointer(tensor: torch.Tensor | None) -> int | None:
    """A tensor's data pointer, or None (C's NULL) for no tensor."""
    return None if tensor is None else tensor.data_ptr()
