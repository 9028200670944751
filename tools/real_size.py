"""Every model of the pipeline at its published size, with random weights made directly on the device.

For benchmarks, where no checkpoint can be downloaded: the cost of a forward depends on the shapes,
not on the values. Each model is built on the meta device and each parameter is then created on the
target device in its final dtype and filled with random numbers, so a 14B transformer never exists on
the CPU (nor in fp32). The sizes are those of the published files (spec §1), given as the tensor shapes
that the loaders' own config derivations read (`umt5_config_from_shapes`,
`clip_vision_config_from_original`), so a random model has exactly the structure the real files load
into; the transformer's config is `configs.MULTITALK_14B`. Dtypes and devices follow `load_components`:
`Precision.for_device`, fp32 for the transformer's `_keep_in_fp32_modules`, wav2vec2 in fp32.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan
from transformers import CLIPVisionModel, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from model.encoders.audio_encoder import Wav2Vec2AudioEncoder
from model.encoders.image_encoder import WanImageEncoder, clip_vision_config_from_original
from model.encoders.text_encoder import WanTextEncoder, umt5_config_from_shapes
from model.encoders.vae import WanVAE
from model.network.configs import MULTITALK_14B
from model.network.transformer_multitalk import MultiTalkTransformer3DModel
from model.weights.layout import MultiTalkComponents, Precision
from model.weights.tiny import tiny_tokenizer

# umT5-XXL encoder (models_t5_umt5-xxl-enc-bf16.pth): vocab 256384, width 4096, 64 heads, FFN 10240, 24 layers.
UMT5_XXL_LAYERS = 24
UMT5_XXL_SHAPES: dict[str, tuple[int, ...]] = {
    "token_embedding.weight": (256384, 4096),
    "blocks.0.pos_embedding.embedding.weight": (32, 64),  # relative-position buckets × heads
    "blocks.0.attn.q.weight": (4096, 4096),
    "blocks.0.ffn.fc1.weight": (10240, 4096),
    **{f"blocks.{n}.norm1.weight": (4096,) for n in range(UMT5_XXL_LAYERS)},
}
# open-clip ViT-H/14 visual tower: width 1280 (16 heads), MLP 5120, 32 blocks, 224 px in 14 px patches.
CLIP_VIT_H14_LAYERS = 32
CLIP_VIT_H14_SHAPES: dict[str, tuple[int, ...]] = {
    "visual.patch_embedding.weight": (1280, 3, 14, 14),
    "visual.pos_embedding": (1, 257, 1280),
    **{f"visual.transformer.{n}.mlp.0.weight": (5120, 1280) for n in range(CLIP_VIT_H14_LAYERS)},
}
# Wan 2.1 VAE: base width 96, z 16 (every other size is AutoencoderKLWan's default, which is Wan 2.1's).
WAN_VAE = {"base_dim": 96, "z_dim": 16}
# chinese-wav2vec2-base: Wav2Vec2Config's defaults are wav2vec 2.0 base (12 × 768, 12 heads, FFN 3072, group norm).
WAV2VEC2_BASE: dict[str, Any] = {}

# Kokoro-82M v1.0 (hexgrad/Kokoro-82M config.json without its vocabulary): PL-BERT 12 × 768, 3-layer prosody and
# text encoders of width 512, the iSTFTNet decoder with 3 resblocks per upsampling; 178 phoneme ids.
KOKORO_82M: dict[str, Any] = {
    "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                 "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                 "resblock_kernel_sizes": [3, 7, 11], "upsample_initial_channel": 512},
    "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 50, "multispeaker": True,
    "n_layer": 3, "n_mels": 80, "style_dim": 128, "text_encoder_kernel_size": 5,
    "plbert": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 2048,
               "max_position_embeddings": 512, "num_hidden_layers": 12, "dropout": 0.1},
}
KOKORO_82M_TOKENS = 178

INIT_STD = 0.02


def materialize_random_(
    module: nn.Module,
    device: torch.device | str,
    dtype: torch.dtype,
    keep_in_fp32: Iterable[str] = (),
    seed: int = 0,
    std: float = INIT_STD,
) -> nn.Module:
    """Give every meta parameter of `module` a random value created on `device`; move its buffers there.

    Floating parameters become `dtype`, or fp32 when a part of their name is in `keep_in_fp32` (the rule of
    `load_into_empty_model`). Values: norm scales 1, biases 0, everything else N(0, std²) — enough for
    every kernel to run on finite numbers. Tied parameters stay tied. Buffers keep their dtype.
    """
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    fp32_modules = set(keep_in_fp32)
    made: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for module_name, owner in module.named_modules():
            for name, param in list(owner._parameters.items()):
                if param is None:
                    continue
                if id(param) not in made:
                    full_name = f"{module_name}.{name}" if module_name else name
                    keep = param.is_floating_point() and any(p in fp32_modules for p in full_name.split("."))
                    target = torch.float32 if keep else (dtype if param.is_floating_point() else param.dtype)
                    value = torch.empty(param.shape, device=device, dtype=target)
                    is_norm = "norm" in full_name.lower() or isinstance(owner, (nn.LayerNorm, nn.GroupNorm))
                    if name == "bias":
                        value.zero_()
                    elif is_norm and (param.ndim == 1 or name == "gamma"):  # (Wan VAE's RMS norms: gamma)
                        value.fill_(1.0)
                    else:
                        value.normal_(0.0, std, generator=generator)
                    made[id(param)] = nn.Parameter(value, requires_grad=False)
                owner._parameters[name] = made[id(param)]
            for name, buffer in list(owner._buffers.items()):
                if buffer is not None:
                    owner._buffers[name] = buffer.to(device)
    return module


def random_transformer(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    config: Mapping[str, Any] = MULTITALK_14B,
    seed: int = 0,
) -> MultiTalkTransformer3DModel:
    """The MultiTalk transformer (default: the published 14B) with random weights, made on `device`."""
    with init_empty_weights():
        model = MultiTalkTransformer3DModel(**config)
    materialize_random_(model, device, dtype, model._keep_in_fp32_modules, seed)
    return model.eval()


def random_text_encoder(device: torch.device | str, dtype: torch.dtype, seed: int = 1) -> WanTextEncoder:
    """umT5-XXL's encoder with random weights (tokenizer: the tiny word-level one; 512 ids are encoded anyway)."""
    with init_empty_weights():
        model = UMT5EncoderModel(umt5_config_from_shapes(UMT5_XXL_SHAPES))
    model.encoder.embed_tokens.weight = model.shared.weight  # tied, as the loader re-ties them (not tied on meta)
    materialize_random_(model, device, dtype, seed=seed)
    return WanTextEncoder(model.eval(), tiny_tokenizer())


def random_image_encoder(device: torch.device | str, dtype: torch.dtype, seed: int = 2) -> WanImageEncoder:
    """The ViT-H/14 visual tower without its last block, as `load_clip_from_original` loads it."""
    config = clip_vision_config_from_original(CLIP_VIT_H14_SHAPES)
    full_layers = config.num_hidden_layers
    config.num_hidden_layers = full_layers - 1  # MultiTalk reads the output of block 31 of 32
    with init_empty_weights():
        model = CLIPVisionModel(config)
    materialize_random_(model, device, dtype, seed=seed)
    return WanImageEncoder(model.eval(), feature_layer=full_layers - 1)


def random_vae(device: torch.device | str, dtype: torch.dtype, seed: int = 3) -> WanVAE:
    with init_empty_weights():
        vae = AutoencoderKLWan(**WAN_VAE)
    materialize_random_(vae, device, dtype, seed=seed)
    return WanVAE(vae.eval())


def random_audio_encoder(device: torch.device | str, seed: int = 4) -> Wav2Vec2AudioEncoder:
    """wav2vec2-base with random weights, fp32 (as the original) on the pipeline's device."""
    with init_empty_weights():
        model = Wav2Vec2Model(Wav2Vec2Config(**WAV2VEC2_BASE))
    materialize_random_(model, device, torch.float32, seed=seed)
    return Wav2Vec2AudioEncoder(model, default_feature_extractor())


def default_feature_extractor() -> Wav2Vec2FeatureExtractor:
    """wav2vec2's preprocessor as chinese-wav2vec2-base configures it (16 kHz, per-utterance normalisation)."""
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=False)


def random_encoders(device: torch.device | str, precision: Precision | None = None, seed: int = 0) -> dict[str, Any]:
    """Text, image and audio encoders and the VAE at published size: {"text_encoder", "image_encoder", "vae", "audio_encoder"}."""
    precision = precision or Precision.for_device(device)
    return {
        "text_encoder": random_text_encoder(device, precision.text_encoder, seed + 1),
        "image_encoder": random_image_encoder(device, precision.image_encoder, seed + 2),
        "vae": random_vae(device, precision.vae, seed + 3),
        "audio_encoder": random_audio_encoder(device, seed + 4),
    }


def components_from_tiny(parts: Mapping[str, nn.Module], device: torch.device | str = "cpu") -> MultiTalkComponents:
    """Wrap `weights.tiny.build_tiny_components` modules as the pipeline's components (fp32, on `device`)."""
    clip = parts["clip"].to(device)
    return MultiTalkComponents(
        transformer=parts["dit"].to(device),
        text_encoder=WanTextEncoder(parts["t5"].to(device), tiny_tokenizer()),
        image_encoder=WanImageEncoder(clip, feature_layer=clip.config.num_hidden_layers - 1),
        vae=WanVAE(parts["vae"].to(device)),
        audio_encoder=Wav2Vec2AudioEncoder(parts["wav2vec2"].to(device), default_feature_extractor()),
    )
