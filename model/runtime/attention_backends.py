"""Choosing the attention kernel: the fastest exact one the machine has, unless the operator names one.

Every attention of the transformer (self, text/image cross, audio, reference map) goes through diffusers'
`dispatch_attention_fn`, so one `set_attention_backend` switches them all. `auto` picks, on CUDA:
FlashAttention 3 (`_flash_3`, Hopper, needs the `flash_attn_interface` build), cuDNN's fused attention
through PyTorch SDPA (`_native_cudnn`, Ampere or newer), FlashAttention 2 (`flash`, the flash-attn
package), then PyTorch's own SDPA dispatcher (`native`). SageAttention quantises q and k to int8, so it
changes the numbers: it is never picked automatically, only when named (`sage`). On CPU: `native`.
Sequence parallelism needs a backend diffusers can run across ranks, so `auto` then skips `_flash_3`.
The FlashAttention, cuDNN and Sage kernels take fp16/bf16 only, so a float32 model gets PyTorch's SDPA.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

AUTO_ORDER_CUDA = ("_flash_3", "_native_cudnn", "flash", "native")


def backend_problem(name: str, device: torch.device) -> str | None:
    """Why `name` cannot run here (None when it can): unknown name, missing package, wrong device."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    known = {member.value for member in AttentionBackendName}
    if name not in known:
        return f"unknown attention backend {name!r}; diffusers knows {', '.join(sorted(known))}"
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as exc:
        return str(exc)
    if device.type != "cuda" and name not in ("native", "_native_math", "flex"):
        return f"attention backend {name!r} needs a CUDA device, the model is on {device.type}"
    if name == "_native_cudnn" and (not torch.backends.cudnn.is_available()
                                    or torch.cuda.get_device_capability(device) < (8, 0)):
        return "cuDNN attention needs cuDNN and a GPU of compute capability 8.0 or newer"
    if name == "_flash_3" and torch.cuda.get_device_capability(device) < (9, 0):
        return "FlashAttention 3 needs a Hopper (compute capability 9.0) or newer GPU"
    return None


def dtype_problem(name: str, dtype: torch.dtype) -> str | None:
    """Why `name` cannot take `dtype` inputs (None when it can): the FlashAttention, cuDNN and Sage kernels are
    half-precision only."""
    half_only = name.startswith(("flash", "_flash", "sage", "_sage")) or name in ("_native_cudnn", "_native_flash")
    if half_only and dtype not in (torch.float16, torch.bfloat16):
        return f"attention backend {name!r} needs float16 or bfloat16, the model computes in {str(dtype).split('.')[-1]}"
    return None


def supports_context_parallel(name: str) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name))


def choose_attention_backend(device: torch.device | str, requested: str = "auto",
                             context_parallel: bool = False, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend to use: `requested` if it can run here on `dtype` inputs (else ValueError saying why), or the
    `auto` pick."""
    device = torch.device(device)
    if requested != "auto":
        problem = backend_problem(requested, device) or dtype_problem(requested, dtype)
        if problem is None and context_parallel and not supports_context_parallel(requested):
            problem = f"attention backend {requested!r} cannot run under sequence parallelism"
        if problem is not None:
            raise ValueError(f"attention: {problem}")
        return requested
    if device.type != "cuda":
        return "native"
    for name in AUTO_ORDER_CUDA:
        usable = backend_problem(name, device) is None and dtype_problem(name, dtype) is None
        if usable and (not context_parallel or supports_context_parallel(name)):
            return name
    return "native"


def apply_attention_backend(transformer, device: torch.device | str, requested: str = "auto",
                            context_parallel: bool = False, dtype: torch.dtype = torch.bfloat16) -> str:
    """Set the chosen backend on every attention processor of `transformer` (computing in `dtype`); returns its
    name."""
    name = choose_attention_backend(device, requested, context_parallel, dtype)
    transformer.set_attention_backend(name)
    logger.info("attention backend=%s requested=%s", name, requested)
    return name
