"""The memory options of `ExecutionOptions`: how the DiT's weights are stored and where they live.

`weights` (`apply_weight_storage`) changes only the linear layers of the transformer blocks — attention
q/k/v/o, the text/image cross-attention (with its image k/v), the audio attention q/kv/out and the
feed-forward — which hold ~98% of the 14B model's parameters. Embeddings, norms, modulation tables,
the head (`proj_out`) and the audio projection (`audio_proj`) stay in the compute dtype: they are
small, and their errors reach every token (or, for the audio projection, every audio token).

Expected difference from `bf16` (all differences come from the storage rounding, nothing else):
  fp8-storage  each stored weight and bias is rounded once to float8_e4m3fn (3 mantissa bits, no
               scaling): relative error ≤ 2⁻⁴ for |w| ≥ 2⁻⁶, absolute ≤ 2⁻¹⁰ below. The matmul runs
               in the compute dtype on the upcast weights, so the model equals a bf16 model whose
               block weights were rounded to fp8 and back.
  fp8          weights rounded to fp8 with one fp32 scale per output row (amax/448), activations
               likewise per token at every call (an all-zero token stays zeros), then a float8 matmul
               (`torch._scaled_mm`, fp32 accumulation — on Hopper the fast-accumulation variant); roughly ±3% per
               element.
  int8         weights rounded to int8 with one scale per output row (amax/127); the matmul runs on the
               int8 values cast to the compute dtype and the row scales multiply its output, so the
               model equals a bf16 model holding the dequantised weights up to rounding (≈ 7e-7 tested).
`offload` (`apply_offload`) moves weights only: the outputs are bit-identical. `blocks` needs host memory for
the blocks' weights once, exactly: one buffer per block of exactly its bytes (34.6 GiB for the 14B model in bf16,
about half with fp8-storage or int8), page-locked in place on CUDA (`model/runtime/pinned_blocks.py`); start-up
needs one block more while the blocks are copied there.
"""

from __future__ import annotations

import torch
from diffusers.hooks.group_offloading import _GROUP_OFFLOADING, GroupOffloadingHook
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from torch import nn

from model.runtime.pinned_blocks import pack_blocks

# Matched with re.search on module names, on top of the model's own `_skip_layerwise_casting_patterns`
# (patch_embedding, condition_embedder, norm) and `_keep_in_fp32_modules`, which diffusers adds.
FP8_STORAGE_SKIP_PATTERNS = (*DEFAULT_SKIP_MODULES_PATTERN, "audio_proj", "norm_audio", "scale_shift_table", r"\.lora_")
FP8_MIN_CUDA_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores
# weights='fp8' scales each token's activations by amax/448. A token whose input to a block linear is all zeros (the
# text padding or a silent speaker's audio tokens, where a layer has zero biases) has amax 0, hence scale 0, and
# would quantise to 0/0 = NaN, which attention then spreads to every token: the first H200 run's fp8 output was all
# NaN on random weights with zero biases (2026-12-04). A floor on amax keeps such a token at exact zeros; a real
# activation row is never this small.
FP8_ACTIVATION_AMAX_FLOOR = 1e-12


def prepare_memory(transformer: nn.Module, weights: str, offload: str, device: torch.device | str) -> None:
    """Apply the weight storage `weights`, then `offload`, leaving the transformer ready to run on `device`.

    Quantisation comes first: it rewrites the weights in place, and group offloading keeps pinned CPU
    copies of whatever weights exist when it is enabled (the quantised ones, so half or a quarter the size).
    The transformer may be on the CPU (`ExecutionOptions.loads_on_cpu_first`) or already on `device`.
    """
    apply_weight_storage(transformer, weights, device)
    apply_offload(transformer, offload, device)


def apply_weight_storage(transformer: nn.Module, mode: str, device: torch.device | str) -> None:
    """Store the block linears as `mode` says (see the module docstring); `device` is where the model
    will run, which decides whether float8 matmuls exist (the weights themselves may still be on the CPU)."""
    if mode == "bf16":
        return
    if mode == "fp8-storage":
        transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn,
            compute_dtype=transformer.dtype,  # diffusers' dtype skips the fp32-kept modules: the blocks' dtype
            skip_modules_pattern=FP8_STORAGE_SKIP_PATTERNS,
        )
        return
    if mode == "fp8":
        _require_float8_matmuls(torch.device(device))
        _require_bfloat16(transformer)
    elif mode != "int8":
        raise ValueError(f"unknown weights mode {mode!r}")
    quantization = _import_torchao_quantization(mode)
    if mode == "fp8":
        config = quantization.Float8DynamicActivationFloat8WeightConfig(
            granularity=quantization.PerRow(), activation_value_lb=FP8_ACTIVATION_AMAX_FLOOR
        )
    else:
        config = quantization.Int8WeightOnlyConfig()  # per output row
    quantization.quantize_(transformer, config, filter_fn=is_block_linear)


def apply_offload(transformer: nn.Module, mode: str, device: torch.device | str) -> None:
    """`none`: the whole transformer on `device`. `blocks`: each block in (pinned) CPU memory, copied to
    `device` just before it runs — on CUDA on a side stream, one block ahead of the compute — and dropped
    after; everything outside the blocks (embeddings, audio projection, head: ~0.3B parameters) stays
    on `device`. Inputs reach the blocks unchanged: diffusers' hooks move tensors, and pass other
    arguments (the blocks' `AudioConditioning`, already built on `device`) through as they are.

    Host memory: the blocks' weights once, each block in one buffer of exactly its bytes, page-locked in place
    on CUDA (`pack_blocks`); diffusers keeps those buffers as its pinned CPU copies instead of pinning a copy of
    every tensor (rounded up to a power of two each, beside the unpinned original).
    """
    device = torch.device(device)
    if mode == "none":
        transformer.to(device)
        return
    if mode != "blocks":
        raise ValueError(f"unknown offload mode {mode!r}")
    streams = device.type == "cuda"
    pack_blocks(transformer.blocks, pin=streams)
    transformer.enable_group_offload(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        non_blocking=True,
        use_stream=streams,  # prefetch block i+1 while block i computes
        record_stream=streams,  # free a block's device copy without a sync
        low_cpu_mem_usage=False,  # keep pinned CPU copies (the packed buffers), so each transfer is a fast async DMA
    )
    _keep_packed_subclass_copies(transformer)
    _keep_outside_blocks_on(transformer, device)


def offload_onloaded_blocks(transformer: nn.Module) -> None:
    """Bind every offloaded block's weights to their CPU copies, which persist, so that an in-place change of them
    (a LoRA's full deltas) lasts. A no-op without offloading, and for a block already offloaded.

    While a block is onloaded, diffusers binds its weights to a device copy that the block's next onload or offload
    drops, and a forward can end with a block onloaded: on CUDA the hook outside the blocks prefetches block 0 at every
    forward, and a step that TeaCache skips never runs it. A prefetch still in flight reads the CPU copies: it is
    waited for before they change.
    """
    for block in transformer.blocks:
        hook = _group_offloading_hook(block)
        if hook is not None:
            if hook.group.stream is not None:
                hook.group.stream.synchronize()
            hook.group.offload_()


def is_block_linear(module: nn.Module, name: str) -> bool:
    """The layers `weights` quantises: every nn.Linear inside `blocks` (names relative to the transformer), the
    base layers of LoRA-wrapped ones included, but not the LoRA adapters' own small low-rank matrices."""
    return isinstance(module, nn.Linear) and name.startswith("blocks.") and ".lora_" not in name


def _keep_outside_blocks_on(transformer: nn.Module, device: torch.device) -> None:
    """diffusers puts everything outside the blocks in one more group that it copies in and out around
    every forward (~0.6 GB each way for the 14B model, synchronously); retarget that group so it moves
    to `device` once and stays there."""
    top_level = _group_offloading_hook(transformer)
    top_level.group.offload_device = device
    top_level.group.onload_()


def _keep_packed_subclass_copies(transformer: nn.Module) -> None:
    """Give diffusers a CPU copy of its own for each tensor-subclass weight (torchao's int8) of the packed blocks.

    diffusers' CPU copy of such a weight is `weight.cpu().pin_memory()`, which for a packed, pinned weight is the
    weight itself; and it onloads such a weight by swapping its contents with the device copy, so that "CPU copy"
    would go to the device too, and offloading would leave the block there. A detached alias of the packed inner
    tensors (no copy) stays where it is. Without streams diffusers keeps no CPU copies: nothing to do.
    """
    for block in transformer.blocks:
        copies = _group_offloading_hook(block).group.cpu_param_dict
        for tensor, copy in copies.items():
            if copy is tensor:
                copies[tensor] = tensor.detach()


def _group_offloading_hook(module: nn.Module) -> GroupOffloadingHook | None:
    """diffusers' group-offloading hook on `module` (each offloaded block, and the transformer), None without one."""
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(_GROUP_OFFLOADING)


def _require_float8_matmuls(device: torch.device) -> None:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is None or capability < FP8_MIN_CUDA_CAPABILITY:
        found = f"CUDA capability {capability[0]}.{capability[1]}" if capability else f"device {device.type}"
        raise ValueError(
            "weights='fp8' needs float8 matmuls: a CUDA GPU of capability "
            f"{FP8_MIN_CUDA_CAPABILITY[0]}.{FP8_MIN_CUDA_CAPABILITY[1]} or newer (Ada, Hopper), found {found}; "
            "use weights='fp8-storage' or 'int8' instead"
        )


def _require_bfloat16(transformer: nn.Module) -> None:
    """torchao's per-row float8 scaling takes bfloat16 weights only."""
    if transformer.dtype != torch.bfloat16:
        raise ValueError(f"weights='fp8' needs a bfloat16 transformer, got {transformer.dtype}")


def _import_torchao_quantization(mode: str):
    """torchao is an optional dependency (extra `quant`): imported only when a quantised mode is asked for."""
    try:
        import torchao.quantization
    except ImportError as error:
        raise ImportError(
            f"weights={mode!r} needs torchao: pip install torchao (or the project's `quant` extra)"
        ) from error
    return torchao.quantization
