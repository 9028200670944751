"""Seeded tiny random checkpoints in the published layouts (same file and key names, tiny sizes).

No weights can be downloaded where this project is tested, so tests, the demo (`--weights tiny`)
and CI run the real loading code on these. Each component is created as the library class we load
into (random init, then every all-zero/all-one tensor perturbed so that every parameter matters),
then written:

- layout `diffusers`: `Wan2.1-I2V-14B-480P-Diffusers/` with `save_pretrained` folders;
- layout `multitalk`: `Wan2.1-I2V-14B-480P/` in Wan's original formats (sharded original-key DiT,
  `.pth` T5 in bf16, `.pth` CLIP in fp16, `.pth` VAE), named back through the loader's own key maps;

plus `MeiGen-MultiTalk/` (audio adapter + replacement index), `chinese-wav2vec2-base/` and
`Kokoro-82M/` (speech synthesis: config, `kokoro-v1_0.pth`, `voices/*.pt`), shared by both layouts. The same seed gives the same numbers in both layouts (values are rounded to the dtype
of the original files first), so both load to identical models. `write_tiny_lora` writes a random
LoRA for such a transformer in the key format of the published distilled LoRAs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

from model.network.transformer_multitalk import MultiTalkTransformer3DModel
from model.speech import synthesis
from model.speech.voices import LOCAL_VOICES
from model.weights.keymaps import (
    is_original_audio_key,
    original_dit_key_map,
    original_dit_keys,
    original_t5_key_map,
    original_t5_keys,
    original_vae_keys_for,
)
from model.weights.layout import (
    MULTITALK_DIR,
    WAN_DIFFUSERS_DIR,
    WAN_ORIGINAL_DIR,
    WAV2VEC_DIR,
)

DIT_SHARDS_ORIGINAL = 7  # the published Wan2.1-I2V-14B-480P has 7 DiT shards
DIT_SHARDS_DIFFUSERS = 3

TINY_T5 = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32)
TINY_CLIP = dict(hidden_size=160, intermediate_size=640, num_hidden_layers=3, num_attention_heads=2, image_size=224, patch_size=14, projection_dim=32)
TINY_WAV2VEC2 = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="group", do_stable_layer_norm=False,
)
TINY_VAE_BASE_DIM = 8
TINY_DIT_HEADS, TINY_DIT_DIM, TINY_DIT_LAYERS = 4, 64, 2
# Words of typical prompts; anything else is <unk>. Ids 0/1/2 are umT5's <pad>/</s>/<unk>.
TINY_VOCAB = (
    "a an the and or of in on at to with is are two man woman men women people person talking talk talks speaks "
    "speaking sitting standing inside outside car room studio podcast interview news anchor camera smiling looking "
    "at each other , . bright tones overexposed static blurred details subtitles style works paintings images "
    "overall gray worst quality low jpeg compression residue ugly incomplete extra fingers poorly drawn hands faces "
    "deformed disfigured misshapen limbs fused still picture messy background three legs many walking backwards"
).split()

# Kokoro's decoder and generator widths are fixed in its code (1024/512 channels), so its tiny version stays large
# (≈ 58 M parameters, stored in fp16); the rest is small.
TINY_KOKORO = {
    "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                 "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5]], "resblock_kernel_sizes": [3],
                 "upsample_initial_channel": 512},
    "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 50, "multispeaker": True,
    "n_layer": 1, "n_mels": 80, "style_dim": 128, "text_encoder_kernel_size": 5,
    "plbert": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 512,
               "num_hidden_layers": 1, "dropout": 0.1},
}
# The symbols misaki's English G2P writes (punctuation, stress marks, its vowels and consonants).
TINY_PHONEMES = ';:,.!?—…"()“” ˈˌːᵊAIOQWYabdfhijklmnpstuvwzæðŋɑɒɔəɛɜɡɪɹɾʃʊʌʒʤʧθᵻ'


def _perturb(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give constant-initialised tensors (zero biases, unit norms) random values so each one matters."""
    with torch.no_grad():
        for _, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            if torch.all(tensor == 0):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
            elif torch.all(tensor == 1):
                tensor.copy_(1 + torch.randn(tensor.shape, generator=generator) * 0.1)


def _round_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round values to what `dtype` can hold, keeping fp32 storage (so both layouts carry equal numbers)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())


def _seeded(seed: int, offset: int) -> torch.Generator:
    torch.manual_seed(seed * 1000 + offset)
    return torch.Generator().manual_seed(seed * 1000 + offset + 500)


def build_tiny_components(seed: int) -> dict[str, torch.nn.Module]:
    """The tiny random models, always created in the same order from `seed`."""
    gen = _seeded(seed, 1)
    t5 = UMT5EncoderModel(UMT5Config(**TINY_T5, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False))
    _perturb(t5, gen)
    _round_to(t5, torch.bfloat16)

    gen = _seeded(seed, 2)
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP, hidden_act="gelu", layer_norm_eps=1e-5))
    _perturb(clip, gen)
    _round_to(clip, torch.float16)

    gen = _seeded(seed, 3)
    vae = AutoencoderKLWan(base_dim=TINY_VAE_BASE_DIM, z_dim=16)
    _perturb(vae, gen)

    gen = _seeded(seed, 4)
    wav2vec2 = Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2))
    _perturb(wav2vec2, gen)

    gen = _seeded(seed, 5)
    dit = MultiTalkTransformer3DModel(
        num_attention_heads=TINY_DIT_HEADS, attention_head_dim=TINY_DIT_DIM // TINY_DIT_HEADS, ffn_dim=2 * TINY_DIT_DIM,
        num_layers=TINY_DIT_LAYERS, text_dim=TINY_T5["d_model"], freq_dim=32, image_dim=TINY_CLIP["hidden_size"],
        added_kv_proj_dim=TINY_DIT_DIM, audio_layers=TINY_WAV2VEC2["num_hidden_layers"],
        audio_dim=TINY_WAV2VEC2["hidden_size"], audio_intermediate_dim=32, audio_output_dim=32, audio_context_tokens=32,
    )
    _perturb(dit, gen)
    return {"t5": t5.eval(), "clip": clip.eval(), "vae": vae.eval(), "wav2vec2": wav2vec2.eval(), "dit": dit.eval()}


def write_tiny_kokoro(folder: Path, seed: int = 0) -> Path:
    """A tiny random Kokoro-82M in its published layout: `config.json`, `kokoro-v1_0.pth`, `voices/<id>.pt`."""
    return write_random_kokoro(folder, TINY_KOKORO, seed)


# A phoneme of real speech lasts ≈ 3 duration units (2 × 300 samples at 24 kHz, 25 ms each): 13 phonemes a second.
PHONEME_UNITS = 3.0


def write_random_kokoro(folder: Path, sizes: dict, seed: int = 0, n_token: int | None = None) -> Path:
    """A random Kokoro of `sizes` (a config.json without its vocabulary) in the published layout; the vocabulary is
    misaki's symbols (`n_token` ids in all, or just enough).

    Random weights would give each phoneme half of `max_dur` units (0.6 s at the real size), so the duration head
    is set to speak at a real pace, `PHONEME_UNITS` per phoneme give or take a little: the speech then lasts, and
    costs, what real speech of the same text does.
    """
    from kokoro import KModel

    folder = Path(folder)
    (folder / synthesis.VOICES_DIR).mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i + 1 for i, symbol in enumerate(TINY_PHONEMES)}
    config = {**sizes, "n_token": n_token or len(vocab) + 1, "vocab": vocab}
    (folder / synthesis.CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    model_file = folder / synthesis.MODEL_FILE
    torch.save({}, model_file)  # KModel loads every part the file holds: none, so it keeps its random init
    generator = _seeded(seed, 6)
    model = KModel(repo_id=synthesis.REPO_ID, config=str(folder / synthesis.CONFIG_FILE), model=str(model_file))
    _perturb(model, generator)
    duration = model.predictor.duration_proj.linear_layer
    with torch.no_grad():
        duration.weight.mul_(0.1)
        duration.bias.fill_(math.log(PHONEME_UNITS / (sizes["max_dur"] - PHONEME_UNITS)))  # Σ sigmoid ≈ PHONEME_UNITS
    parts = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
    torch.save({part: {k: v.half() for k, v in getattr(model, part).state_dict().items()} for part in parts},
               model_file)
    for voice in LOCAL_VOICES:  # the published packs are [510, 1, 256]: 510 rows of (decoder, prosody) styles
        torch.save(torch.randn(510, 1, 2 * sizes["style_dim"], generator=generator) * 0.2,
                   folder / synthesis.VOICES_DIR / f"{voice}.pt")
    return folder


def write_tiny_weights(out: Path, layout: str = "multitalk", seed: int = 0) -> Path:
    """Write a tiny checkpoint set in `layout` under `out`; returns `out`."""
    if layout not in ("multitalk", "diffusers"):
        raise ValueError(f"layout must be 'multitalk' or 'diffusers', not {layout!r}")
    out = Path(out)
    parts = build_tiny_components(seed)
    _write_wav2vec2(parts["wav2vec2"], out / WAV2VEC_DIR)
    write_tiny_kokoro(out / synthesis.KOKORO_DIR, seed)
    if layout == "multitalk":
        wan = out / WAN_ORIGINAL_DIR
        write_original_transformer(parts["dit"], wan, out / MULTITALK_DIR, DIT_SHARDS_ORIGINAL)
        config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": TINY_DIT_DIM, "eps": 1e-6,
                  "ffn_dim": 2 * TINY_DIT_DIM, "freq_dim": 32, "in_dim": 36, "model_type": "i2v",
                  "num_heads": TINY_DIT_HEADS, "num_layers": TINY_DIT_LAYERS, "out_dim": 16, "text_len": 512}
        (wan / "config.json").write_text(json.dumps(config, indent=2))
        _write_original_t5(parts["t5"], wan / "models_t5_umt5-xxl-enc-bf16.pth")
        _write_tokenizer(wan / "google" / "umt5-xxl")
        _write_original_clip(parts["clip"], wan / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
        vae_state = parts["vae"].state_dict()
        names = original_vae_keys_for(vae_state.keys())
        torch.save({names[k]: v.contiguous() for k, v in vae_state.items()}, wan / "Wan2.1_VAE.pth")
    else:
        wan = out / WAN_DIFFUSERS_DIR
        transformer_dir = wan / "transformer"
        base, adapter = split_original_adapter(parts["dit"])
        _write_adapter(adapter, out / MULTITALK_DIR)
        _write_index(transformer_dir / "diffusion_pytorch_model.safetensors.index.json",
                     _write_shards(base, transformer_dir, DIT_SHARDS_DIFFUSERS), base)
        config = {k: v for k, v in parts["dit"].config.items() if not k.startswith(("audio_", "class_", "vae_scale", "_"))}
        config.update({"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1",
                       "qk_norm": "rms_norm_across_heads", "pos_embed_seq_len": None, "patch_size": [1, 2, 2]})
        (transformer_dir / "config.json").write_text(json.dumps(config, indent=2))
        parts["t5"].save_pretrained(wan / "text_encoder")
        _write_tokenizer(wan / "tokenizer")
        parts["clip"].save_pretrained(wan / "image_encoder")
        parts["vae"].save_pretrained(wan / "vae")
        (wan / "model_index.json").write_text(json.dumps({
            "_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.42.1",
            "image_encoder": ["transformers", "CLIPVisionModel"], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
        }, indent=2))
    return out


def cached_tiny_weights(cache_root: Path | None = None, seed: int = 0) -> Path:
    """The seeded tiny checkpoints (MultiTalk layout), written on first use under the user cache and reused.

    `--weights tiny` resolves here. The folder is written next to its final name and renamed into place,
    so an interrupted first run never leaves a half-written cache behind.
    """
    root = Path(cache_root or os.environ.get("MULTITALK_CACHE") or Path.home() / ".cache" / "multitalk")
    final = root / f"tiny-weights-v3-seed{seed}"  # v3: with Kokoro-82M
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_tiny_weights(staging, "multitalk", seed)
        staging.rename(final)
    except OSError:
        if not final.is_dir():  # not a lost race with another process writing the same cache
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def split_original_adapter(dit: MultiTalkTransformer3DModel) -> tuple[dict, dict]:
    """(base tensors under our names, adapter tensors under MultiTalk's original names)."""
    state = {k: v.detach().contiguous() for k, v in dit.state_dict().items()}
    to_original = _original_names(dit)
    adapter = {to_original[k]: v for k, v in state.items() if is_original_audio_key(to_original[k])}
    base = {k: v for k, v in state.items() if not is_original_audio_key(to_original[k])}
    return base, adapter


def _original_names(dit: MultiTalkTransformer3DModel) -> dict[str, str]:
    """Our DiT tensor name → its name in the published original layout."""
    return {ours: orig for orig, ours in original_dit_key_map(original_dit_keys(dit.config.num_layers)).items()}


def write_tiny_lora(
    path: Path, transformer: MultiTalkTransformer3DModel, rank: int = 4, seed: int = 0, alpha: float | None = None,
    with_diffs: bool = True,
) -> Path:
    """A random LoRA for `transformer` laid out like the published distilled ones (FusionX, lightx2v).

    Keys `diffusion_model.<original module>.lora_down.weight` [rank, in] / `.lora_up.weight` [out, rank]
    (+ `.alpha` when given) on every attention and feed-forward Linear of the blocks; `with_diffs` adds
    full deltas as those files carry them: `.diff_b` on the same Linears, `.diff` on two norms per
    block, `.diff` and `.diff_b` on the head. Original names come from inverting the loader's key map.
    """
    generator = torch.Generator().manual_seed(seed)
    original = _original_names(transformer)
    state = transformer.state_dict()
    lora: dict[str, torch.Tensor] = {}
    deltas = ["proj_out.weight", "proj_out.bias"]
    for n in range(transformer.config.num_layers):
        deltas += [f"blocks.{n}.norm2.weight", f"blocks.{n}.attn1.norm_q.weight"]
    for name, layer in transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and re.match(r"blocks\.\d+\.(attn1|attn2|ffn)\.", name):
            module = "diffusion_model." + original[f"{name}.weight"].removesuffix(".weight")
            lora[f"{module}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
            lora[f"{module}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.1
            if alpha is not None:
                lora[f"{module}.alpha"] = torch.tensor(float(alpha))
            deltas.append(f"{name}.bias")
    if with_diffs:
        for ours in deltas:
            module, kind = original[ours].rsplit(".", 1)
            role = {"weight": "diff", "bias": "diff_b"}[kind]
            lora[f"diffusion_model.{module}.{role}"] = torch.randn(state[ours].shape, generator=generator) * 0.02
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(path), metadata={"format": "pt"})
    return path


def _write_adapter(adapter: dict[str, torch.Tensor], multitalk_dir: Path) -> None:
    multitalk_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(multitalk_dir / "multitalk.safetensors"), metadata={"format": "pt"})


def write_original_transformer(dit: MultiTalkTransformer3DModel, wan_dir: Path, multitalk_dir: Path, shards: int) -> None:
    """The DiT as published: original-key fp32 shards + index in `wan_dir`, the adapter and MultiTalk's
    replacement index (Wan shards + adapter keys) in `multitalk_dir`."""
    base, adapter = split_original_adapter(dit)
    to_original = _original_names(dit)
    base_original = {to_original[k]: v for k, v in base.items()}
    shard_map = _write_shards(base_original, wan_dir, shards)
    _write_index(wan_dir / "diffusion_pytorch_model.safetensors.index.json", shard_map, base_original)
    _write_adapter(adapter, multitalk_dir)
    replacement = {**shard_map, **{k: "multitalk.safetensors" for k in adapter}}
    _write_index(multitalk_dir / "diffusion_pytorch_model.safetensors.index.json", replacement, {**base_original, **adapter})


def _write_shards(state: dict[str, torch.Tensor], folder: Path, shards: int) -> dict[str, str]:
    """Spread tensors over `shards` files named like diffusers' shards; returns key → file name."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = keys[i * per_shard:(i + 1) * per_shard]
        save_file({k: state[k].float() for k in chunk}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    return weight_map


def _write_index(path: Path, weight_map: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    total = sum(t.numel() * t.element_size() for t in state.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def _write_original_t5(t5: UMT5EncoderModel, path: Path) -> None:
    hf = t5.state_dict()
    names = original_t5_key_map(original_t5_keys(t5.config.num_layers))
    torch.save({orig: hf[ours].to(torch.bfloat16).contiguous() for orig, ours in names.items()}, path)


def _write_original_clip(clip: CLIPVisionModel, path: Path) -> None:
    """Open-clip layout: visual.* tensors (q/k/v fused) plus a token text tower, in fp16."""
    hf = clip.state_dict()
    width = clip.config.hidden_size
    out = {
        "visual.patch_embedding.weight": hf["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": hf["embeddings.class_embedding"].reshape(1, 1, width),
        "visual.pos_embedding": hf["embeddings.position_embedding.weight"][None],
        "visual.pre_norm.weight": hf["pre_layrnorm.weight"], "visual.pre_norm.bias": hf["pre_layrnorm.bias"],
        "visual.post_norm.weight": hf["post_layernorm.weight"], "visual.post_norm.bias": hf["post_layernorm.bias"],
        "visual.head": torch.randn(width, clip.config.projection_dim),
        "log_scale": torch.tensor(4.6052),
        "textual.token_embedding.weight": torch.randn(8, 16),  # the unused text tower, in token form
    }
    for n in range(clip.config.num_hidden_layers):
        src, dst = f"encoder.layers.{n}", f"visual.transformer.{n}"
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.to_qkv.{kind}"] = torch.cat([hf[f"{src}.self_attn.{m}_proj.{kind}"] for m in "qkv"])
            for hf_name, orig in (("layer_norm1", "norm1"), ("self_attn.out_proj", "attn.proj"),
                                  ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
                out[f"{dst}.{orig}.{kind}"] = hf[f"{src}.{hf_name}.{kind}"]
    torch.save({k: v.to(torch.float16).contiguous() for k, v in out.items()}, path)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over TINY_VOCAB with umT5's special ids (the text encoder always sees 512 ids)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in TINY_VOCAB:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _write_tokenizer(folder: Path) -> None:
    tiny_tokenizer().save_pretrained(folder)


def _write_wav2vec2(model: Wav2Vec2Model, folder: Path) -> None:
    """HF layout; the positional conv stored under the legacy weight_g/weight_v names, as in real checkpoints."""
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    path = folder / "model.safetensors"
    state = load_file(str(path))
    legacy = {"encoder.pos_conv_embed.conv.parametrizations.weight.original0": "encoder.pos_conv_embed.conv.weight_g",
              "encoder.pos_conv_embed.conv.parametrizations.weight.original1": "encoder.pos_conv_embed.conv.weight_v"}
    save_file({legacy.get(k, k): v for k, v in state.items()}, str(path), metadata={"format": "pt"})
