"""How the transformer runs on its device: attention kernel, weight storage, offloading, compilation.

These options change speed and memory, never the request's meaning. The module imports no torch at
import time, so the server's settings can validate against it. Each is applied once, after the
weights are loaded and before the first request (`prepare_transformer`), so nothing in the step loop
branches on them. The defaults are the fastest exact configuration that fits one 80 GB GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

WEIGHT_MODES = ("bf16", "fp8", "fp8-storage", "int8")
OFFLOAD_MODES = ("none", "blocks")


@dataclass(frozen=True)
class ExecutionOptions:
    """attention: `auto` or a diffusers attention backend name (`native`, `flash`, `sage`, `_native_cudnn`, ...).
    weights: storage of the DiT's linear weights: `bf16` (the precision's dtype, exact), `fp8` (float8 weights
        and activations with scaled matmuls, Hopper or newer), `fp8-storage` (float8 storage upcast per layer,
        any GPU), `int8` (int8 weight-only).
    offload: `blocks` keeps the DiT's blocks in CPU memory and streams them to the GPU one group at a time,
        overlapped with compute, and keeps the text encoder in CPU memory between requests (480p on a 24 GB GPU).
    compile: compile each transformer block with torch.compile (regional), warmed up at load. Combines with
        `offload='blocks'` (the offloading hooks run between the compiled graphs); refused with `fp8-storage`
        (see `__post_init__`).
    reference_schedule: run as the original schedules the work: guidance passes one at a time at batch 1 and
        the reference map in every pass with an explicit softmax. Same numbers, slower: benchmarks, parity.
    sequence_parallel: split every forward's tokens over this many ranks of a torchrun process group
        (`model/sequence_parallel.py`); 1: off.
    """

    attention: str = "auto"
    weights: str = "bf16"
    offload: str = "none"
    compile: bool = False
    reference_schedule: bool = False
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}")
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel must be at least 1, got {self.sequence_parallel}")
        if self.compile and self.weights == "fp8-storage":
            # Tried on the tiny model: the outputs match eager, but every Linear is a graph break, and the fragments
            # between them recompile for new frame sizes and speaker counts.
            raise ValueError(
                "compile cannot be combined with weights='fp8-storage': its per-layer upcasts (diffusers' layerwise "
                "casting hooks, which convert each Linear's weights with module.to) cannot be traced by torch.compile, "
                "so the blocks would run as one graph per layer and recompile for every frame size; use "
                "weights='int8' (or 'fp8' on Ada/Hopper GPUs) with compile, or weights='fp8-storage' without compile"
            )

    @property
    def loads_on_cpu_first(self) -> bool:
        """Quantised or offloaded transformers are converted on the CPU, so the GPU never holds full bf16 weights."""
        return self.weights != "bf16" or self.offload != "none"


def prepare_transformer(transformer, options: ExecutionOptions, device) -> str:
    """Apply `options` to a loaded transformer (on the CPU when `options.loads_on_cpu_first`, else on `device`).

    Order matters: weights are converted before they are offloaded or moved, and compilation comes last so
    it sees the final modules. Returns the attention backend in use.
    """
    import torch

    from model.network.sequence_parallel import enable_sequence_parallel
    from model.runtime.attention_backends import apply_attention_backend
    from model.runtime.memory import prepare_memory

    device = torch.device(device)
    compute_dtype = transformer.dtype  # before weight storage may turn block weights into float8 or int8
    prepare_memory(transformer, options.weights, options.offload, device)
    parallel = options.sequence_parallel > 1
    backend = apply_attention_backend(transformer, device, options.attention, context_parallel=parallel,
                                      dtype=compute_dtype)
    transformer.reference_map_mode = "original" if options.reference_schedule else "fused"
    if parallel:
        enable_sequence_parallel(transformer, options.sequence_parallel)
    if options.compile:
        # Not fullgraph: block offloading's onload/offload (compiler-disabled in diffusers) and a kernel without a
        # compile-friendly op (some attention backends) are graph breaks instead of failing the start-up. The sizes
        # that follow the request's grid are marked dynamic by the transformer (`mark_grid_sizes_dynamic`); the
        # few discrete states (speakers, guidance passes, LoRA) are compiled by `Pipeline.warm_up`.
        transformer.compile_repeated_blocks()
    logger.info("transformer prepared device=%s attention=%s weights=%s offload=%s compile=%s reference_schedule=%s "
                "sequence_parallel=%d", device, backend, options.weights, options.offload, options.compile,
                options.reference_schedule, options.sequence_parallel)
    return backend
