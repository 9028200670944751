"""The fast path (batched guidance, fused reference map, cached RoPE, chosen kernels, compilation) computes
the same video as the original's schedule of work, on the tiny weights."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from model.media.person_masks import person_masks
from model.runtime.attention_backends import choose_attention_backend
from model.runtime.execution import ExecutionOptions, prepare_transformer
from model.sampling.guidance import GuidanceConfig, random_guidance_inputs
from model.sampling.long_video import plan_clips
from model.sampling.schedule import sampling_timesteps
from model.sampling.video_generation import (
    SamplingSettings,
    VideoConditioning,
    generate_video_clips,
)
from model.weights.layout import find_layout, load_transformer

FRAME_SIZE = (64, 128)
CLIPS = plan_clips(13, clip_frames=9, motion_frames=5)  # two clips, so motion frames carry over too


def _conditioning(transformer, speakers: int) -> VideoConditioning:
    g = torch.Generator().manual_seed(11)
    cfg = transformer.config
    latent_hw = (FRAME_SIZE[0] // 8, FRAME_SIZE[1] // 8)
    return VideoConditioning(
        reference=torch.rand(1, 3, 1, *FRAME_SIZE, generator=g) * 2 - 1,
        embeddings=[torch.randn(20, cfg.audio_layers, cfg.audio_dim, generator=g) for _ in range(speakers)],
        context=torch.randn(6, cfg.text_dim, generator=g),
        negative_context=torch.randn(4, cfg.text_dim, generator=g),
        ref_target_masks=person_masks(FRAME_SIZE, FRAME_SIZE, latent_hw, speakers, None),
    )


def _frames(pipeline, transformer, speakers: int, text_scale: float, batched: bool) -> torch.Tensor:
    settings = SamplingSettings(sampling_timesteps(3, 7.0), GuidanceConfig(text_scale=text_scale, audio_scale=4.0),
                                batched_guidance=batched)
    c = pipeline.components
    outputs = generate_video_clips(transformer, c.vae, c.image_encoder, _conditioning(transformer, speakers), CLIPS,
                                   settings, torch.Generator().manual_seed(5))
    return torch.cat([out.frames for out in outputs], dim=2)


@pytest.fixture(scope="module")
def reference_transformer(tiny_weights):
    model = load_transformer(find_layout(tiny_weights["multitalk"]), torch.float32)
    prepare_transformer(model, ExecutionOptions(reference_schedule=True), "cpu")
    return model


@pytest.mark.parametrize("speakers,text_scale", [(2, 5.0), (2, 1.0), (1, 5.0)])
@pytest.mark.slow
def test_fast_path_video_equals_the_reference_schedule(tiny_pipeline, reference_transformer, speakers, text_scale):
    fast = _frames(tiny_pipeline, tiny_pipeline.components.transformer, speakers, text_scale, batched=True)
    plain = _frames(tiny_pipeline, reference_transformer, speakers, text_scale, batched=False)
    assert fast.shape == (1, 3, 13, *FRAME_SIZE)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_reference_schedule_option_reaches_the_transformer_and_sampler(tiny_pipeline, reference_transformer):
    assert tiny_pipeline.components.transformer.reference_map_mode == "fused"
    assert reference_transformer.reference_map_mode == "original"
    with pytest.raises(ValueError, match="TeaCache"):
        from model.sampling.guidance import GuidanceCombiner, guided_velocity

        guided_velocity(reference_transformer, torch.zeros(1, 36, 3, 8, 16), torch.tensor([1.0]),
                        {"num_speakers": [1]}, GuidanceCombiner(GuidanceConfig()), block_cache=object(), batched=False)


def test_rope_tables_are_the_stock_tables_halved_and_built_once(tiny_pipeline):
    transformer = tiny_pipeline.components.transformer
    cfg = transformer.config
    stock = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
    latents = torch.zeros(1, 36, 3, 8, 16)
    cos, sin = transformer.rope(latents)
    stock_cos, stock_sin = stock(latents)
    torch.testing.assert_close(cos, stock_cos[..., 0::2].float(), rtol=0, atol=0)
    torch.testing.assert_close(sin, stock_sin[..., 1::2].float(), rtol=0, atol=0)
    assert transformer.rope(latents)[0] is cos  # cached: same grid, same tensor


def test_attention_backend_choice():
    assert choose_attention_backend("cpu") == "native"
    assert choose_attention_backend("cpu", "_native_math") == "_native_math"
    with pytest.raises(ValueError, match="attention: unknown attention backend 'fastest'"):
        choose_attention_backend("cpu", "fastest")
    with pytest.raises(ValueError, match="attention: .*flash"):
        choose_attention_backend("cpu", "flash")


@pytest.mark.slow
def test_compiled_blocks_give_the_same_velocity(tiny_weights, tiny_pipeline):
    """Regional torch.compile (inductor on the CPU here) through the pipeline's warm-up and a real clip."""
    from model.pipeline import Pipeline

    compiled = Pipeline.from_weights(tiny_weights["multitalk"], execution=ExecutionOptions(compile=True))
    assert compiled.warm_up(FRAME_SIZE, frames=9) > 0
    eager = _frames(tiny_pipeline, tiny_pipeline.components.transformer, 2, 5.0, batched=True)
    fast = _frames(compiled, compiled.components.transformer, 2, 5.0, batched=True)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


def test_bf16_transformer_is_close_to_fp32(tiny_weights, tiny_pipeline):
    """The GPU default precision: the raw predictions of the three guidance passes equal fp32's up to bf16
    rounding (≈ 0.6 % relative L2 error on the tiny weights, over several seeds; bounds with 3× margin)."""
    
    bf16 = load_transformer(find_layout(tiny_weights["multitalk"]), torch.bfloat16)
    fp32 = tiny_pipeline.components.transformer
    generator = torch.Generator().manual_seed(0)
    inputs = random_guidance_inputs(fp32.config, (3, 8, 16), 2, generator)
    latent = torch.randn(1, 36, 3, 8, 16, generator=generator).expand(3, -1, -1, -1, -1)
    timestep = torch.tensor([500.0]).expand(3)
    with torch.no_grad():
        low, full = (model(latent.to(model.dtype), timestep, **inputs.transformer_kwargs(5.0, model.dtype)).sample
                     for model in (bf16, fp32))
    assert low.dtype == torch.float32  # the head's output is returned in fp32
    assert (low - full).norm() / full.norm() < 0.02
    assert (low - full).abs().max() < 0.05 * full.abs().max()


def test_auto_attention_order_on_cuda_prefers_exact_fast_kernels(monkeypatch):
    """With every kernel installed: FlashAttention 3 first; under sequence parallelism the first one diffusers can
    run across ranks (cuDNN); with nothing but PyTorch: its SDPA."""
    import model.runtime.attention_backends as backends

    monkeypatch.setattr(backends, "backend_problem", lambda name, device: None)
    assert choose_attention_backend("cuda") == "_flash_3"
    assert choose_attention_backend("cuda", context_parallel=True) == "_native_cudnn"
    monkeypatch.setattr(backends, "backend_problem", lambda name, device: None if name == "native" else "missing")
    assert choose_attention_backend("cuda") == "native"
    with pytest.raises(ValueError, match="attention: missing"):
        choose_attention_backend("cuda", "sage")


def test_auto_attention_on_cuda_picks_by_dtype(monkeypatch):
    """The FlashAttention and cuDNN kernels take half precision only: a float32 model gets PyTorch's SDPA, and
    naming one of them for it is a clear error."""
    import model.runtime.attention_backends as backends

    monkeypatch.setattr(backends, "backend_problem", lambda name, device: None)
    assert choose_attention_backend("cuda", dtype=torch.bfloat16) == "_flash_3"
    assert choose_attention_backend("cuda", dtype=torch.float16) == "_flash_3"
    assert choose_attention_backend("cuda", dtype=torch.float32) == "native"
    for name in ("flash", "_flash_3", "_native_cudnn", "sage"):
        with pytest.raises(ValueError, match=f"attention: attention backend '{name}' needs float16 or bfloat16, "
                                             "the model computes in float32"):
            choose_attention_backend("cuda", name, dtype=torch.float32)


@pytest.mark.slow
def test_offloaded_pipeline_keeps_the_text_encoder_in_cpu_memory_and_makes_the_same_video(
        tiny_weights, tiny_pipeline, example_inputs, tmp_path):
    from model.contract.request import GenerationRequest
    from model.pipeline import Pipeline, visiting

    offloaded = Pipeline.from_weights(tiny_weights["multitalk"], execution=ExecutionOptions(offload="blocks"))
    assert offloaded.text_encoder_on_cpu and not tiny_pipeline.text_encoder_on_cpu
    request = dict(image=example_inputs["image"], audio=[example_inputs["audio1"], example_inputs["audio2"]],
                   prompt="two people talking", num_frames=41, steps=1, frame_size=FRAME_SIZE, seed=4)
    videos = [pipeline.generate(GenerationRequest(output=tmp_path / f"{name}.mp4", **request)).video
              for name, pipeline in (("offloaded", offloaded), ("resident", tiny_pipeline))]
    assert videos[0].read_bytes() == videos[1].read_bytes()
    assert next(offloaded.components.text_encoder.model.parameters()).device.type == "cpu"

    moves = []
    module = torch.nn.Linear(2, 2)
    module.to = lambda device: moves.append(str(device)) or module  # records where visiting sends it
    with visiting(module, torch.device("cuda"), offloaded=True):
        assert moves == ["cuda"]
    assert moves == ["cuda", "cpu"]
    with visiting(module, torch.device("cuda"), offloaded=False):
        pass
    assert moves == ["cuda", "cpu"]
