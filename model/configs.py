"""Configurations of the MultiTalk transformer.

Our transformer is configured with diffusers' `WanTransformer3DModel` argument names plus the
audio-adapter arguments. The published checkpoints describe the model with the *original* Wan
`config.json` (`dim`, `num_heads`, `in_dim`, ...) and leave the audio arguments to the class
defaults of the original code, so `transformer_config_from_original` translates one into the other.
"""

from __future__ import annotations

from typing import Any

# Fixed by wav2vec2-base: 12 transformer layers × 768 channels feed the audio projector.
WAV2VEC2_LAYERS = 12
WAV2VEC2_DIM = 768
# The I2V cross-attention splits its context at 257 CLIP tokens (ViT-H/14 at 224 px + class token).
CLIP_TOKENS = 257
CLIP_DIM = 1280
TEXT_LEN = 512

# Defaults of the original `WanModel` audio arguments (absent from Wan's config.json).
ORIGINAL_AUDIO_DEFAULTS = {
    "audio_window": 5,
    "intermediate_dim": 512,
    "output_dim": 768,
    "context_tokens": 32,
    "vae_scale": 4,
    "norm_input_visual": True,
    "norm_output_audio": True,
}

MULTITALK_14B: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "eps": 1e-6,
    "image_dim": CLIP_DIM,
    "added_kv_proj_dim": 5120,
    "audio_window": 5,
    "audio_layers": WAV2VEC2_LAYERS,
    "audio_dim": WAV2VEC2_DIM,
    "audio_intermediate_dim": 512,
    "audio_output_dim": 768,
    "audio_context_tokens": 32,
    "vae_scale": 4,
    "class_range": 24,
    "class_interval": 4,
}


def transformer_config_from_original(original: dict[str, Any]) -> dict[str, Any]:
    """Translate an original Wan/MultiTalk `config.json` into our transformer's config.

    Keys the original class ignores (`patch_size`, `qk_norm`, `cross_attn_norm`, `text_dim`,
    `window_size`) always take the original defaults, exactly as `WanModel.from_pretrained` does.
    """
    if original.get("model_type", "i2v") != "i2v":
        raise ValueError(f"MultiTalk needs an i2v Wan checkpoint, config says model_type={original['model_type']!r}")
    missing = [k for k in ("dim", "num_heads", "num_layers", "ffn_dim") if k not in original]
    if missing:
        raise ValueError(f"original transformer config.json lacks {', '.join(missing)}")
    audio = {**ORIGINAL_AUDIO_DEFAULTS, **{k: original[k] for k in ORIGINAL_AUDIO_DEFAULTS if k in original}}
    if not (audio["norm_input_visual"] and audio["norm_output_audio"]):
        raise ValueError("only norm_input_visual=True and norm_output_audio=True are supported (the published model)")
    dim, heads = int(original["dim"]), int(original["num_heads"])
    if dim % heads or (dim // heads) % 2:
        raise ValueError(f"dim {dim} must split into an even head size over {heads} heads")
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(original.get("in_dim", 36)),
        "out_channels": int(original.get("out_dim", 16)),
        "text_dim": 4096,
        "freq_dim": int(original.get("freq_dim", 256)),
        "ffn_dim": int(original["ffn_dim"]),
        "num_layers": int(original["num_layers"]),
        "cross_attn_norm": True,
        "eps": float(original.get("eps", 1e-6)),
        "image_dim": CLIP_DIM,
        "added_kv_proj_dim": dim,
        "audio_window": int(audio["audio_window"]),
        # Not original keys: the published model is fixed to wav2vec2-base (12 × 768); our tiny
        # checkpoints pair a tiny wav2vec2 with the DiT and record its size here.
        "audio_layers": int(original.get("audio_layers", WAV2VEC2_LAYERS)),
        "audio_dim": int(original.get("audio_dim", WAV2VEC2_DIM)),
        "audio_intermediate_dim": int(audio["intermediate_dim"]),
        "audio_output_dim": int(audio["output_dim"]),
        "audio_context_tokens": int(audio["context_tokens"]),
        "vae_scale": int(audio["vae_scale"]),
        "class_range": 24,
        "class_interval": 4,
    }
