"""Each offloaded block's weights in one host buffer of exactly their size, page-locked in place on CUDA.

With CUDA streams, diffusers' group offloading keeps a pinned CPU copy of every tensor of every block:
`tensor.cpu().pin_memory()`. That copies each tensor into torch's pinned host caching allocator, which rounds every
allocation up to a power of two (the 14B model's 34.6 GiB of block weights take ≈ 50.6 GiB pinned), while the
unpinned originals stay alive until every block is copied: ≈ 90 GB of host memory at start-up instead of ≈ 64 GB.

`pack_blocks` hands diffusers tensors that are already pinned, which it keeps as they are: `pin_memory()` returns a
tensor that `is_pinned()` as it is, and `is_pinned()` asks CUDA about the address of the tensor's storage, which
reports memory registered with `cudaHostRegister` as page-locked host memory. Block by block, every parameter and
buffer (for a tensor subclass such as torchao's int8 weights: every plain tensor inside it) is copied into one flat
buffer of the block's bytes and rebound to its view there, which frees the block's old storage before the next block
is copied (peak: one block more); on CUDA the buffer is then registered where it is, without a copy.

Each tensor starts at a multiple of 64 bytes, the alignment torch's CPU allocator gives every tensor (more than any
dtype needs): under 64 bytes of padding per tensor, and CPU kernels see the alignment they saw before, so outputs stay
bit-identical.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

TENSOR_ALIGNMENT = 64  # bytes; c10's alignment of every CPU allocation
CUDA_HOST_REGISTER_PORTABLE = 1  # page-locked for every CUDA context, whichever device is current

_page_locked = {"bytes": 0}  # what `_page_lock` registered and is still alive, for the worker's memory report


def page_locked_bytes() -> int:
    """Host memory these buffers hold page-locked now (torch's pinned-allocator statistics do not see it)."""
    return _page_locked["bytes"]


def pack_blocks(blocks: Iterable[nn.Module], pin: bool) -> None:
    """Rebind each block's parameters and buffers to views of one host buffer per block (see the module docstring).

    `pin`: page-lock each buffer for asynchronous CUDA copies (CUDA only). A RuntimeError names the block whose
    memory CUDA refused to page-lock.
    """
    with torch.no_grad():
        for index, block in enumerate(blocks):
            tensors = [*block.parameters(), *block.buffers()]
            memory = _host_memory(sum(map(_packed_bytes, tensors)))
            buffer = torch.from_numpy(memory)
            offset = 0
            for tensor in tensors:
                packed, offset = _copy_into(buffer, offset, tensor)
                _rebind(tensor, packed)
            if pin:
                _page_lock(memory, f"block {index}")


def _packed_bytes(tensor: torch.Tensor) -> int:
    """The bytes `tensor` takes in a block buffer: each plain tensor inside it from a multiple of TENSOR_ALIGNMENT."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_packed_bytes(getattr(tensor, name)) for name in names)
    return -(-tensor.nbytes // TENSOR_ALIGNMENT) * TENSOR_ALIGNMENT


def _copy_into(buffer: torch.Tensor, offset: int, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A copy of `tensor` in `buffer` from byte `offset`, and the offset after it; for a tensor subclass, the same
    subclass around copies of its inner tensors."""
    if is_traceable_wrapper_subclass(tensor):
        names, context = tensor.__tensor_flatten__()
        inner = {}
        for name in names:
            inner[name], offset = _copy_into(buffer, offset, getattr(tensor, name))
        return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride()), offset
    view = buffer[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
    view.copy_(tensor)
    return view, offset + _packed_bytes(tensor)


def _rebind(tensor: torch.Tensor, packed: torch.Tensor) -> None:
    """Point `tensor`, which the block holds, at `packed`, keeping its identity. A tensor subclass keeps its inner
    tensors in attributes that `.data =` does not replace, so its contents are swapped instead, as `nn.Module.to`
    does; the old contents leave with `packed`."""
    if is_traceable_wrapper_subclass(packed):
        if isinstance(tensor, nn.Parameter):
            packed = nn.Parameter(packed, requires_grad=tensor.requires_grad)
        torch.utils.swap_tensors(tensor, packed)
    else:
        tensor.data = packed


def _host_memory(nbytes: int) -> np.ndarray:
    """`nbytes` of zeroed host memory in a private anonymous mapping of its own (what malloc gives large allocations):
    page-aligned, and no page shared with other memory (page-locking works on whole pages). numpy's array owns the
    mapping for torch (`torch.from_numpy`), and runs its weak-reference callbacks before it releases it, which
    `_page_lock` relies on."""
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8)


def _page_lock(memory: np.ndarray, holder: str) -> None:
    """Register `memory` with CUDA as page-locked host memory where it is, until its last view is freed."""
    cudart = torch.cuda.cudart()
    address = memory.ctypes.data
    error = cudart.cudaHostRegister(address, memory.nbytes, CUDA_HOST_REGISTER_PORTABLE)
    if int(error) != 0:
        raise RuntimeError(
            f"offload 'blocks' could not page-lock the {memory.nbytes} bytes of host memory of {holder} for CUDA "
            f"copies: cudaHostRegister failed with error {int(error)} ({cudart.cudaGetErrorString(error)})"
        )
    _page_locked["bytes"] += memory.nbytes
    weakref.finalize(memory, _page_unlock, cudart, address, memory.nbytes).atexit = False  # the process's end frees it


def _page_unlock(cudart, address: int, nbytes: int) -> None:
    cudart.cudaHostUnregister(address)
    _page_locked["bytes"] -= nbytes
