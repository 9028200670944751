"""Configuration of the MultiTalk transformer, derived from the checkpoint itself.

Our transformer takes diffusers' `WanTransformer3DModel` arguments plus the audio-adapter arguments.
The published files describe the model only partly: Wan's `config.json` lists `dim`, `num_heads`,
... while the audio adapter's sizes are class defaults of the original code and the wav2vec2 size is
hard-wired there (12 layers × 768). So every size is read from the tensor shapes in the file
headers (keys already in our naming), and only the head count, which no shape reveals, comes from
`config.json`. The same derivation serves the real 14B files, the golden fixtures and our tiny
checkpoints, and a file that disagrees with its config fails with a message naming both.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

TEXT_LEN = 512  # diffusers' Wan cross-attention splits text/image context at exactly 512 text tokens
VAE_TEMPORAL_SCALE = 4

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
    "image_dim": 1280,
    "added_kv_proj_dim": 5120,
    "audio_window": 5,
    "audio_layers": 12,
    "audio_dim": 768,
    "audio_intermediate_dim": 512,
    "audio_output_dim": 768,
    "audio_context_tokens": 32,
    "vae_scale": VAE_TEMPORAL_SCALE,
    "class_range": 24,
    "class_interval": 4,
}


def heads_from_config(config: Mapping[str, Any]) -> int:
    """Head count from an original (`num_heads`) or diffusers (`num_attention_heads`) transformer config."""
    for key in ("num_heads", "num_attention_heads"):
        if key in config:
            return int(config[key])
    raise ValueError("transformer config.json has neither num_heads nor num_attention_heads")


def transformer_config_from_shapes(
    shapes: Mapping[str, Sequence[int]],
    num_heads: int,
    audio_encoder_layers: int = 12,
    audio_encoder_dim: int = 768,
    eps: float = 1e-6,
) -> dict[str, Any]:
    """Our transformer config from the checkpoint's tensor shapes (our key names) and the head count.

    `audio_encoder_layers/dim` are the wav2vec2 layers × hidden size the adapter reads (fixed to
    wav2vec2-base, 12 × 768, for the published model).
    """

    def shape(key: str) -> Sequence[int]:
        if key not in shapes:
            raise KeyError(f"transformer checkpoint lacks {key!r}")
        return shapes[key]

    dim, in_channels, *patch = shape("patch_embedding.weight")
    if dim % num_heads or (dim // num_heads) % 2:
        raise ValueError(f"width {dim} does not split into an even head size over {num_heads} heads")
    block_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if not block_ids or sorted(block_ids) != list(range(len(block_ids))):
        raise ValueError(f"transformer checkpoint has blocks {sorted(block_ids)}; expected 0..N-1")

    window_in = shape("audio_proj.proj1.weight")[1]
    later_in = shape("audio_proj.proj1_vf.weight")[1]
    per_frame = audio_encoder_layers * audio_encoder_dim
    window, remainder = divmod(window_in, per_frame)
    if remainder or later_in != (window + VAE_TEMPORAL_SCALE - 1) * per_frame:
        raise ValueError(
            f"audio adapter inputs {window_in}/{later_in} do not fit a wav2vec2 of "
            f"{audio_encoder_layers} layers × {audio_encoder_dim} channels"
        )
    output_dim = shape("audio_proj.norm.weight")[0]
    return {
        "patch_size": tuple(patch),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight")[0] // (patch[0] * patch[1] * patch[2]),
        "text_dim": shape("condition_embedder.text_embedder.linear_1.weight")[1],
        "freq_dim": shape("condition_embedder.time_embedder.linear_1.weight")[1],
        "ffn_dim": shape("blocks.0.ffn.net.0.proj.weight")[0],
        "num_layers": len(block_ids),
        "cross_attn_norm": True,
        "eps": eps,
        "image_dim": shape("condition_embedder.image_embedder.norm1.weight")[0],
        "added_kv_proj_dim": shape("blocks.0.attn2.add_k_proj.weight")[1],
        "audio_window": window,
        "audio_layers": audio_encoder_layers,
        "audio_dim": audio_encoder_dim,
        "audio_intermediate_dim": shape("audio_proj.proj1.weight")[0],
        "audio_output_dim": output_dim,
        "audio_context_tokens": shape("audio_proj.proj3.weight")[0] // output_dim,
        "vae_scale": VAE_TEMPORAL_SCALE,
        "class_range": 24,
        "class_interval": 4,
    }
