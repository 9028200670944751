"""True float32 convolutions and matmuls for a scope: TF32 off in cuDNN and cuBLAS.

On Ampere and newer GPUs torch lets cuDNN run float32 convolutions in TF32 by default
(`torch.backends.cudnn.allow_tf32` is True), which rounds their inputs to a 10-bit mantissa: about
1e-3 relative error against true float32. wav2vec2 runs in true float32 to match the original, which runs it on
the CPU; it turns TF32 off around its calls (milliseconds per request). Everything else keeps the process's
settings: the DiT in bf16, and the Wan VAE, whose convolutions the original also runs in TF32 on a GPU
(`model.encoders.vae`).

The flags are process-global and the embedded workers of `multitalk serve --workers N` are threads of
one process, so scopes are counted: the first to enter saves and clears the flags, the last to leave
restores them. Meanwhile other threads' float32 work also runs without TF32 (more exact, never less);
bf16 and fp16 work is unaffected. The legacy `allow_tf32` setters are used because they update torch's
legacy flag and its newer `fp32_precision` setting together, so the two never disagree (torch raises
when code such as inductor reads a mixed state).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_scopes = 0
_saved: tuple[bool, bool] = (False, False)  # (cuBLAS matmul, cuDNN) allow_tf32 before the first scope


@contextmanager
def tf32_disabled() -> Iterator[None]:
    """Run the body with TF32 off for float32 matmuls (cuBLAS) and convolutions (cuDNN)."""
    global _scopes, _saved
    with _lock:
        if _scopes == 0:
            _saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        _scopes += 1
    try:
        yield
    finally:
        with _lock:
            _scopes -= 1
            if _scopes == 0:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _saved
