"""Analytic FLOP count of the MultiTalk transformer, from its config and the input shapes.

Counts every matrix product of one forward (2 FLOPs per multiply-add, like
`torch.utils.flop_counter`): linear layers, the patch-embedding convolution, and the attention
products QKᵀ and PV. Element-wise work (norms, RoPE, softmax, modulation, residual adds) is not
counted; at 14B it is well under 1 % of the total and it is not what a matmul rate can bound.

The count is what one unbatched pass needs. Two things the implementation does beyond that can be
counted too: the batched guidance passes also project the null-audio pass's padded second audio
stream (`denoising_step_flops(..., batched=True)`, under 0.05 % of a 14B step at 480p), and the fused
reference map runs its 3-column "value" padded to the head size (`reference_value_width=head_dim`,
≈1 % of a 14B 2-speaker pass). The FLOP floor uses the needed work (3 columns, unbatched).
`tests/test_flops.py` checks this module against torch's own counter.

Notation: d = width (heads · head_dim), f = FFN width, L = layers, S = T·N_h·N_w video tokens,
P = speakers in the pass, K = audio tokens per speaker and latent frame (32), L_ref = N_h·N_w.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from model.network.configs import TEXT_LEN

IMAGE_TOKENS = 257  # CLIP ViT-H/14 tokens at 224 px (class token + 16 × 16 patches)
REFERENCE_CLASSES = 3  # person 1, person 2, background


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    """y = x Wᵀ over `tokens` rows: 2·tokens·fan_in·fan_out (bias adds are not counted)."""
    return 2 * tokens * fan_in * fan_out


def _attention(queries: int, keys: int, width: int, value_width: int | None = None) -> int:
    """QKᵀ (2·q·k·width) + PV (2·q·k·value_width), summed over heads (width = heads · head_dim)."""
    return 2 * queries * keys * width + 2 * queries * keys * (width if value_width is None else value_width)


def token_grid(config: Mapping[str, Any], frames_latent: int, height_latent: int, width_latent: int) -> tuple[int, int, int]:
    """(T, N_h, N_w) tokens of a latent [16, T, h, w] after the (p_t, p_h, p_w) patch embedding."""
    p_t, p_h, p_w = config["patch_size"]
    return frames_latent // p_t, height_latent // p_h, width_latent // p_w


def transformer_forward_flops_by_part(
    config: Mapping[str, Any],
    frames_latent: int,
    height_latent: int,
    width_latent: int,
    speakers: int,
    text_len: int = TEXT_LEN,
    image_tokens: int = IMAGE_TOKENS,
    reference_map: bool | None = None,
    lora_rank: int = 0,
    reference_value_width: int = REFERENCE_CLASSES,
    audio_streams: int | None = None,
) -> dict[str, int]:
    """FLOPs of one transformer forward (one guidance pass, batch 1), split by part.

    config: `MultiTalkTransformer3DModel` arguments (`model.network.configs.MULTITALK_14B` or a model's
    `.config`). frames/height/width_latent: the latent's T, h, w. speakers: audio streams of this
    pass (1 or 2; the null-audio pass has 1). text_len: text context rows (the model zero-pads the
    prompt to 512, so 512 is what runs). reference_map: whether the self-attention also computes the
    reference map (default: only with 2 speakers, as this implementation does; the original computes
    it in every pass). lora_rank: rank of an active unmerged LoRA on the blocks' attention and FFN
    linears (0: none). reference_value_width: value columns per head of the reference map (3 classes;
    the fused kernel pads them to head_dim). audio_streams: audio streams the pass projects (default
    `speakers`; a batched null-audio pass projects as many as the batch's widest pass, zeros unused).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f = config["ffn_dim"]
    layers = config["num_layers"]
    p_t, p_h, p_w = config["patch_size"]
    frames, n_h, n_w = token_grid(config, frames_latent, height_latent, width_latent)
    s = frames * n_h * n_w
    ref_len = n_h * n_w
    k = config["audio_context_tokens"]
    audio_keys = k * speakers  # per latent frame
    heads = config["num_attention_heads"]
    if reference_map is None:
        reference_map = speakers == 2
    kv_dim = config.get("added_kv_proj_dim") or d

    def lora(tokens: int, fan_in: int, fan_out: int) -> int:
        # peft's unmerged LoRA: B(A x), A [r, in], B [out, r]
        return _linear(tokens, fan_in, lora_rank) + _linear(tokens, lora_rank, fan_out) if lora_rank else 0

    per_block = {
        # q, k, v, o projections over the S video tokens
        "self_attn_proj": 4 * _linear(s, d, d),
        # full attention of S queries over S keys
        "self_attn": _attention(s, s, d),
        # queries S vs the first frame's L_ref keys (QKᵀ over all heads), then the 3-column "value"
        # (class masks / class size) per head: 2·S·L_ref·3 per head
        "reference_map": (2 * s * ref_len * d + 2 * s * ref_len * reference_value_width * heads) if reference_map else 0,
        # q and o over S tokens; k, v over the text rows; add_k, add_v over the image tokens
        "cross_attn_proj": 2 * _linear(s, d, d) + 2 * _linear(text_len, d, d) + 2 * _linear(image_tokens, kv_dim, d),
        # the same queries over the text keys and, separately, over the image keys
        "cross_attn": _attention(s, text_len, d) + _attention(s, image_tokens, d),
        # q and o over S tokens; fused k/v (audio_output_dim → 2d) over T·K·P audio tokens
        "audio_attn_proj": 2 * _linear(s, d, d) + _linear(frames * audio_keys, config["audio_output_dim"], 2 * d),
        # per latent frame: S/T queries vs K·P audio keys, i.e. S·K·P query-key pairs in all
        "audio_attn": _attention(s, audio_keys, d),
        # up d → f, down f → d over S tokens
        "ffn": _linear(s, d, f) + _linear(s, f, d),
        "lora": (
            4 * lora(s, d, d)  # self-attention q, k, v, o
            + 2 * lora(s, d, d) + 2 * lora(text_len, d, d) + 2 * lora(image_tokens, kv_dim, d)  # cross-attention
            + lora(s, d, f) + lora(s, f, d)  # FFN
        ),
    }
    parts = {name: layers * value for name, value in per_block.items()}

    window, audio_layers, audio_dim = config["audio_window"], config["audio_layers"], config["audio_dim"]
    later_window = window + config["vae_scale"] - 1
    inter = config["audio_intermediate_dim"]
    per_stream = (
        _linear(1, window * audio_layers * audio_dim, inter)  # proj1 on latent frame 0's 5-frame window
        + _linear(frames - 1, later_window * audio_layers * audio_dim, inter)  # proj1_vf on the 8-frame windows
        + _linear(frames, inter, inter)  # proj2
        + _linear(frames, inter, k * config["audio_output_dim"])  # proj3 → K tokens per latent frame
    )
    parts["audio_proj"] = speakers * per_stream
    # streams projected but not attended to: audio projector + every block's to_kv on their tokens
    padded = (audio_streams or speakers) - speakers
    parts["padded_audio"] = padded * (per_stream + layers * _linear(frames * k, config["audio_output_dim"], 2 * d))
    freq_dim, text_dim, image_dim = config["freq_dim"], config["text_dim"], config["image_dim"]
    parts["embedders"] = (
        _linear(1, freq_dim, d) + _linear(1, d, d)  # time embedding: freq_dim → d → d
        + _linear(1, d, 6 * d)  # time projection to the 6 modulation vectors
        + _linear(text_len, text_dim, d) + _linear(text_len, d, d)  # text embedding MLP
        + _linear(image_tokens, image_dim, image_dim) + _linear(image_tokens, image_dim, d)  # image MLPProj
    )
    patch = p_t * p_h * p_w
    parts["patch_embedding"] = _linear(s, config["in_channels"] * patch, d)  # Conv3d with kernel = stride = patch
    parts["head"] = _linear(s, d, config["out_channels"] * patch)
    return parts


def transformer_forward_flops(config: Mapping[str, Any], *shape_and_speakers: int, **options: Any) -> int:
    """Total FLOPs of one transformer forward: the sum of `transformer_forward_flops_by_part` (same arguments)."""
    return sum(transformer_forward_flops_by_part(config, *shape_and_speakers, **options).values())


def guidance_pass_speakers(speakers: int, text_guidance: bool) -> list[int]:
    """Speakers of each guidance pass of a step: [P, P, 1] with text guidance, [P, 1] without (distilled)."""
    return [speakers, speakers, 1] if text_guidance else [speakers, 1]


def denoising_step_flops(
    config: Mapping[str, Any],
    grid: Sequence[int],
    speakers_per_pass: Sequence[int],
    *,
    reference_map_in_every_pass: bool = False,
    reference_value_width: int = REFERENCE_CLASSES,
    lora_rank: int = 0,
    batched: bool = False,
    text_len: int = TEXT_LEN,
    image_tokens: int = IMAGE_TOKENS,
) -> int:
    """FLOPs of one denoising step: one transformer forward per guidance pass.

    grid: the latent's (T, h, w). speakers_per_pass: e.g. `guidance_pass_speakers(2, True)` = [2, 2, 1].
    reference_map_in_every_pass: the original's schedule (map computed in 1-speaker passes too).
    batched: count what the batched forward does beyond the passes' needs (the padded audio streams).
    The Euler update and the guidance combination are element-wise and not counted.
    """
    frames, height, width = grid
    streams = max(speakers_per_pass) if batched else None
    return sum(
        transformer_forward_flops(config, frames, height, width, p, text_len=text_len, image_tokens=image_tokens,
                                  reference_map=True if reference_map_in_every_pass else None, lora_rank=lora_rank,
                                  reference_value_width=reference_value_width, audio_streams=streams)
        for p in speakers_per_pass
    )


def latent_grid(frame_size: tuple[int, int], num_frames: int, vae_scale: int = 4, spatial_scale: int = 8) -> tuple[int, int, int]:
    """Latent (T, h, w) of `num_frames` video frames of (H, W) pixels: T = 1 + (F − 1)/4, h = H/8, w = W/8."""
    height, width = frame_size
    return 1 + (num_frames - 1) // vae_scale, height // spatial_scale, width // spatial_scale
