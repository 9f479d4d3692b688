"""Host values onto the shard's device without blocking the host.

A `torch.tensor(values, device=cuda)` or `cpu_tensor.to(cuda)` copies from pageable memory: the host
waits until the copy has run, which is after everything queued before it on the stream (a step's
whole forward). Built in pinned memory and copied with `non_blocking=True`, the host goes on queueing
while the device works; the caching host allocator keeps each pinned block until its copy is done.
On the CPU these are plain tensors.
"""

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """`values` as one tensor of `dtype` on `device`."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def tensor_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU `tensor` on `device` (itself on the CPU)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
