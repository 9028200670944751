"""The analytic FLOP count (model/flops.py) against torch's own counter, and its 14B figures.

torch.utils.flop_counter counts matrix products (mm, addmm, bmm, convolution) and the CUDA fused
attention kernels, but not the CPU's fused SDPA kernel, so the model runs with diffusers' `_native_math`
attention backend here: attention then decomposes into bmm products that are counted. With that, the
analytic count equals the measured one exactly, for single passes and for the batched guidance step.
"""

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend
from torch.utils.flop_counter import FlopCounterMode

from model.network.configs import MULTITALK_14B
from model.runtime.lora import load_lora, use_lora
from model.sampling.guidance import GuidanceCombiner, GuidanceConfig, guided_velocity, random_guidance_inputs
from model.weights.layout import find_layout, load_transformer
from model.weights.tiny import write_tiny_lora
from tools.flops import (
    denoising_step_flops,
    guidance_pass_speakers,
    latent_grid,
    transformer_forward_flops,
    transformer_forward_flops_by_part,
)

GRID = (3, 8, 16)  # latent T, h, w: 3 × 4 × 8 = 96 tokens


@pytest.fixture(scope="module")
def tiny_transformer(tiny_weights):
    return load_transformer(find_layout(tiny_weights["multitalk"]), torch.float32)


def _batch_kwargs(model, speakers: int, text_scale: float) -> dict:
    inputs = random_guidance_inputs(model.config, GRID, speakers, torch.Generator().manual_seed(speakers))
    return inputs.transformer_kwargs(text_scale)


def _measured_step_flops(model, speakers: int, text_scale: float, batched: bool) -> int:
    kwargs = _batch_kwargs(model, speakers, text_scale)
    latent = torch.randn(1, 36, *GRID, generator=torch.Generator().manual_seed(7))
    combiner = GuidanceCombiner(GuidanceConfig(text_scale))
    with attention_backend("_native_math"), FlopCounterMode(display=False) as counter:
        guided_velocity(model, latent, torch.tensor([500.0]), kwargs, combiner, batched=batched)
    return counter.get_total_flops()


@pytest.mark.parametrize("speakers", [1, 2])
@pytest.mark.parametrize("text_scale", [5.0, 1.0])
@pytest.mark.parametrize("schedule", ["batched", "reference"])
def test_step_count_equals_torch_flop_counter(tiny_transformer, speakers, text_scale, schedule):
    """Batched: the fused reference map (value padded to head_dim) in 2-speaker passes + padded audio streams.
    Reference (the original's schedule): passes one at a time, explicit 3-column map in every pass."""
    reference = schedule == "reference"
    tiny_transformer.reference_map_mode = "original" if reference else "fused"
    try:
        measured = _measured_step_flops(tiny_transformer, speakers, text_scale, batched=not reference)
    finally:
        tiny_transformer.reference_map_mode = "fused"
    config = dict(tiny_transformer.config)
    analytic = denoising_step_flops(
        config, GRID, guidance_pass_speakers(speakers, text_scale != 1.0), batched=not reference,
        reference_map_in_every_pass=reference, reference_value_width=3 if reference else config["attention_head_dim"],
    )
    assert measured == analytic
    # What the floor counts (unbatched, 3-column map only where used) differs by the two extras alone.
    needed = denoising_step_flops(config, GRID, guidance_pass_speakers(speakers, text_scale != 1.0))
    assert abs(measured - needed) / needed < 0.02


def test_lora_products_are_counted(tiny_weights, tmp_path):
    model = load_transformer(find_layout(tiny_weights["multitalk"]), torch.float32)
    load_lora(model, write_tiny_lora(tmp_path / "lora.safetensors", model, rank=4), "distilled")
    use_lora(model, "distilled", 1.0)
    measured = _measured_step_flops(model, 2, 1.0, batched=False)
    config = dict(model.config)
    assert measured == denoising_step_flops(config, GRID, [2, 1], lora_rank=4,
                                            reference_value_width=config["attention_head_dim"])


def test_14b_counts_at_appendix_a_shapes():
    grid = latent_grid((448, 896), 81)
    assert grid == (21, 56, 112)
    tokens = 21 * 28 * 56
    assert tokens == 32_928

    one, two = (transformer_forward_flops(MULTITALK_14B, *grid, speakers) for speakers in (1, 2))
    assert one == 1_838_937_494_126_592  # ≈ 1.84 PFLOP per DiT pass
    assert two == 1_861_869_323_157_504  # + the reference map (2.16e13) and twice the audio keys
    steps = {
        (2, True): 5_562_676_140_441_600,  # [2, 2, 1]: the default 3-pass guidance
        (2, False): 3_700_806_817_284_096,  # [2, 1]: the distilled LoRA recipes
        (1, True): 5_516_812_482_379_776,
        (1, False): 3_677_874_988_253_184,
    }
    for (speakers, text), expected in steps.items():
        assert denoising_step_flops(MULTITALK_14B, grid, guidance_pass_speakers(speakers, text)) == expected

    # Cross-check: the linears every video token passes through are exactly 2 · params · tokens ...
    parts = transformer_forward_flops_by_part(MULTITALK_14B, *grid, 2)
    d, f, layers = 5120, 13824, 40
    cross_and_audio_q_o = 4 * 2 * tokens * d * d * layers  # cross-attention q, o and audio q, o
    per_token_linears = parts["self_attn_proj"] + cross_and_audio_q_o + parts["ffn"]
    # Per block: self-attention q/k/v/o (4d²), cross-attention q/o (2d²), audio q/o (2d²), FFN (2df).
    params = MULTITALK_14B["num_layers"] * (8 * d * d + 2 * d * MULTITALK_14B["ffn_dim"])
    assert params == layers * (8 * d * d + 2 * d * f) == 14_050_918_400  # of the 18.9B parameters
    assert per_token_linears == 2 * params * tokens
    # ... and full attention over 32,928 tokens adds about as much again (4·S²·d per block).
    assert parts["self_attn"] == 4 * tokens**2 * d * layers
    assert 1.9 < two / (2 * params * tokens) < 2.1
