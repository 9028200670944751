"""The MultiTalk transformer: published 14B structure, batched guidance, reference map, L-RoPE."""

import pytest
import torch
from accelerate import init_empty_weights

from model.network.audio_attention import apply_rope_1d, label_rope_positions
from model.network.configs import MULTITALK_14B
from model.network.reference_attention import (
    reference_attention_map,
    reference_attention_map_explicit,
)
from model.network.transformer_multitalk import (
    MultiTalkTransformer3DModel,
    MultiTalkTransformerBlock,
)
from model.sampling.guidance import GuidanceCombiner, GuidanceConfig, guided_velocity
from model.weights.keymaps import original_dit_key_map
from model.weights.layout import find_layout, load_transformer

from guidance_inputs import tiny_guidance_inputs


def published_14b_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the published checkpoints, written out from the reference spec (§1.4, §1.5)."""
    d, f = 5120, 13824
    shapes = {
        "patch_embedding.weight": (d, 36, 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, 4096), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,),
        "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.1.bias": (1280,),
        "img_emb.proj.3.weight": (d, 1280), "img_emb.proj.3.bias": (d,),
        "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,),
        "head.head.weight": (64, d), "head.head.bias": (64,), "head.modulation": (1, 2, d),
        "audio_proj.proj1.weight": (512, 46080), "audio_proj.proj1.bias": (512,),
        "audio_proj.proj1_vf.weight": (512, 73728), "audio_proj.proj1_vf.bias": (512,),
        "audio_proj.proj2.weight": (512, 512), "audio_proj.proj2.bias": (512,),
        "audio_proj.proj3.weight": (24576, 512), "audio_proj.proj3.bias": (24576,),
        "audio_proj.norm.weight": (768,), "audio_proj.norm.bias": (768,),
    }
    for n in range(40):
        b = f"blocks.{n}"
        for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                  "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img"):
            shapes[f"{b}.{m}.weight"], shapes[f"{b}.{m}.bias"] = (d, d), (d,)
        for m in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "cross_attn.norm_k_img"):
            shapes[f"{b}.{m}.weight"] = (d,)
        shapes.update({f"{b}.norm3.weight": (d,), f"{b}.norm3.bias": (d,), f"{b}.ffn.0.weight": (f, d),
                       f"{b}.ffn.0.bias": (f,), f"{b}.ffn.2.weight": (d, f), f"{b}.ffn.2.bias": (d,),
                       f"{b}.modulation": (1, 6, d), f"{b}.norm_x.weight": (d,), f"{b}.norm_x.bias": (d,),
                       f"{b}.audio_cross_attn.q_linear.weight": (d, d), f"{b}.audio_cross_attn.q_linear.bias": (d,),
                       f"{b}.audio_cross_attn.kv_linear.weight": (2 * d, 768), f"{b}.audio_cross_attn.kv_linear.bias": (2 * d,),
                       f"{b}.audio_cross_attn.proj.weight": (d, d), f"{b}.audio_cross_attn.proj.bias": (d,)})
    return shapes


def test_14b_model_matches_published_checkpoint_keys_without_allocating():
    with init_empty_weights():
        model = MultiTalkTransformer3DModel(**MULTITALK_14B)
    assert all(p.device.type == "meta" for p in model.parameters())
    published = published_14b_shapes()
    mapping = original_dit_key_map(published)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {mapping[k]: shape for k, shape in published.items()}
    assert sorted(set(ours) - set(mapped)) == []  # 0 missing
    assert sorted(set(mapped) - set(ours)) == []  # 0 unexpected
    assert {k: s for k, s in mapped.items() if ours[k] != s} == {}
    assert model.num_parameters_by_part == {"base": 16_394_878_784, "audio_adapter": 2_487_168_000, "total": 18_882_046_784}


@pytest.fixture(scope="module")
def tiny_transformer(tiny_weights):
    return load_transformer(find_layout(tiny_weights["multitalk"]), torch.float32)


@pytest.mark.parametrize("speakers", [1, 2])
@pytest.mark.parametrize("text_scale", [5.0, 1.0])
def test_batched_guidance_equals_sequential_passes(tiny_transformer, speakers, text_scale):
    generator = torch.Generator().manual_seed(speakers)
    inputs = tiny_guidance_inputs(tiny_transformer, speakers, generator)
    latent = torch.randn(1, 36, 3, 8, 8, generator=generator)
    timestep = torch.tensor([700.0])
    kwargs = inputs.transformer_kwargs(text_scale)
    batched = guided_velocity(tiny_transformer, latent, timestep, kwargs, GuidanceCombiner(GuidanceConfig(text_scale, 4.0)))

    assert len(kwargs["num_speakers"]) == len(GuidanceConfig(text_scale).pass_names)
    assert kwargs["num_speakers"][-1] == 1  # the null-audio pass takes the one-speaker path
    tiny_transformer.reference_map_mode = "original"
    try:
        sequential = guided_velocity(tiny_transformer, latent, timestep, kwargs,
                                     GuidanceCombiner(GuidanceConfig(text_scale, 4.0)), batched=False)
    finally:
        tiny_transformer.reference_map_mode = "fused"
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-4 * sequential.abs().max().item())


@pytest.mark.parametrize("formula", [reference_attention_map, reference_attention_map_explicit])
def test_reference_map_equals_the_original_chunked_formula(formula):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 48, 4, 16, generator=g), torch.randn(1, 48, 4, 16, generator=g)
    masks = (torch.rand(1, 3, 16, generator=g) > 0.5).float()
    ours = formula(q, k, masks)[0]
    # The original: softmax over the first frame's keys per head, masked sums / mask size, mean over two head halves.
    maps = []
    for half in (slice(0, 2), slice(2, 4)):
        probs = ((q[0, :, half] * 16**-0.5).transpose(0, 1) @ k[0, :16, half].permute(1, 2, 0)).softmax(-1)
        maps.append(torch.stack([(probs * m).sum(-1).mean(0) / m.sum() for m in masks[0]]))
    torch.testing.assert_close(ours, (maps[0] + maps[1]) / 2, rtol=1e-6, atol=1e-7)


def test_label_rope_positions_follow_the_dominant_class():
    ref_map = torch.tensor([[[0.9, 0.1, 0.2, 0.5], [0.05, 0.8, 0.1, 0.2], [0.05, 0.1, 0.7, 0.3]]])
    positions = label_rope_positions(ref_map, class_range=24, class_interval=4)[0]
    assert positions[0] == pytest.approx(4.0)  # person 1's strongest token → top of [0, 4]
    assert positions[1] == pytest.approx(24.0)  # person 2's strongest token → top of [20, 24]
    assert positions[2] == 12.0  # background
    assert 0 <= positions[3] <= 4


def test_rope_1d_at_position_zero_is_identity_and_preserves_norm():
    x = torch.randn(2, 5, 3, 8)
    torch.testing.assert_close(apply_rope_1d(x, torch.zeros(2, 5)), x)
    rotated = apply_rope_1d(x, torch.rand(2, 5) * 24)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def test_more_than_two_speakers_is_rejected(tiny_transformer):
    inputs = tiny_guidance_inputs(tiny_transformer, 2, torch.Generator().manual_seed(0))
    audio = torch.cat([inputs.audio, inputs.audio[:1]])[None]
    with pytest.raises(ValueError, match="1 or 2 speakers"):
        tiny_transformer(torch.randn(1, 36, 3, 8, 8), torch.tensor([500.0]), inputs.context[None],
                         inputs.image_features, audio, inputs.ref_target_masks)


def test_block_is_registered_for_diffusers_cache_hooks_and_backends(tiny_transformer):
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks._helpers import TransformerBlockRegistry

    assert TransformerBlockRegistry.get(MultiTalkTransformerBlock).return_hidden_states_index == 0
    batch_kwargs = tiny_guidance_inputs(tiny_transformer, 2, torch.Generator().manual_seed(3)).transformer_kwargs(5.0)
    latent = torch.randn(1, 36, 3, 8, 8)
    reference = guided_velocity(tiny_transformer, latent, torch.tensor([900.0]), batch_kwargs, GuidanceCombiner(GuidanceConfig()))
    tiny_transformer.set_attention_backend("_native_math")
    try:
        torch.testing.assert_close(guided_velocity(tiny_transformer, latent, torch.tensor([900.0]), batch_kwargs, GuidanceCombiner(GuidanceConfig())),
                                   reference, rtol=1e-4, atol=1e-4)
    finally:
        tiny_transformer.reset_attention_backend()
    tiny_transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    try:
        with tiny_transformer.cache_context("cond"):
            cached = guided_velocity(tiny_transformer, latent, torch.tensor([900.0]), batch_kwargs, GuidanceCombiner(GuidanceConfig()))
        torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-4)
    finally:
        tiny_transformer.disable_cache()


def test_time_embedding_and_modulation_run_in_fp32_in_a_bf16_model(tiny_weights, tiny_transformer):
    """As the original and LightX2V: a bf16 model's time embedding and block modulation are computed in fp32 from
    fp32 weights, so they equal the fp32 model's exactly while the blocks run in bf16."""
    bf16 = load_transformer(find_layout(tiny_weights["multitalk"]), torch.bfloat16)
    embedder = bf16.condition_embedder
    assert {p.dtype for p in [*embedder.time_embedder.parameters(), *embedder.time_proj.parameters()]} == {torch.float32}
    assert bf16.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    timestep = torch.tensor([999.0, 500.0, 1.0])
    temb, modulation = bf16.time_conditioning(timestep)
    assert temb.dtype == modulation.dtype == torch.float32
    expected = tiny_transformer.time_conditioning(timestep)
    assert torch.equal(temb, expected[0]) and torch.equal(modulation, expected[1])


def test_the_q_k_norm_over_slices_of_tokens_equals_the_norm_of_the_whole(monkeypatch):
    from model.network.transformer_multitalk import TokenChunkedRMSNorm

    norm = TokenChunkedRMSNorm(16, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    states = torch.randn(3, 23, 16, dtype=torch.bfloat16) * 5
    whole = torch.nn.RMSNorm.forward(norm, states)
    monkeypatch.setattr(TokenChunkedRMSNorm, "chunk_tokens", 5)  # 23 tokens: slices of 5, the last of 3
    sliced = norm(states)
    assert sliced.dtype == whole.dtype and torch.equal(sliced, whole)


def test_the_in_place_block_updates_equal_the_expressions_they_replace():
    from model.network.transformer_multitalk import gated_residual, modulated

    generator = torch.Generator().manual_seed(0)
    residual, update = (torch.randn(2, 7, 32, generator=generator).to(torch.bfloat16) for _ in range(2))
    scale, shift, gate = (torch.randn(2, 1, 32, generator=generator) for _ in range(3))
    normed = torch.randn(2, 7, 32, generator=generator)
    assert torch.equal(modulated(normed.clone(), scale, shift), normed * (1 + scale) + shift)
    expected = (residual.float() + update.float() * gate).type_as(residual)
    assert torch.equal(gated_residual(residual, update, gate), expected)
