"""Golden runners for the model parts: transformer forward, T5, CLIP, VAE, wav2vec2."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from model.encoders.audio_encoder import Wav2Vec2AudioEncoder
from model.encoders.image_encoder import clip_pixel_values, load_clip_from_original
from model.encoders.text_encoder import WanTextEncoder, load_umt5_from_original
from model.encoders.vae import WanVAE, load_vae_from_original
from model.weights.layout import load_transformer_files
from tools.golden.folder import GoldenFolder, Skip


@lru_cache(maxsize=None)
def dit_model(root: str, name: str):
    entry = json.loads((Path(root) / "manifest.json").read_text())["models"][name]
    config = json.loads((Path(root) / entry["config"]).read_text())
    model = load_transformer_files([Path(root) / entry["weights"]], config, "original", what=f"golden DiT {root}")
    model.reference_map_mode = "original"  # the original computes the map in every pass; it is checked
    return model


def _config(folder: GoldenFolder, name: str) -> dict:
    entry = folder.model_entry(name)
    return json.loads((folder.root / entry["config"]).read_text()) if "config" in entry else {}


def _weights(folder: GoldenFolder, name: str) -> Path:
    entry = folder.model_entry(name)
    return folder.root / entry.get("weights_pth", entry["weights"])


# Original module path → our module path (diffusers naming).
_MODULE_MAP = [
    (r"^patch_embedding$", "patch_embedding"),
    (r"^time_embedding$", "condition_embedder.time_embedder"),
    (r"^time_projection$", "condition_embedder.time_proj"),
    (r"^text_embedding$", "condition_embedder.text_embedder"),
    (r"^img_emb$", "condition_embedder.image_embedder"),
    (r"^audio_proj$", "audio_proj"),
    (r"^blocks\.(\d+)\.self_attn$", r"blocks.\1.attn1"),
    (r"^blocks\.(\d+)\.cross_attn$", r"blocks.\1.attn2"),
    (r"^blocks\.(\d+)\.audio_cross_attn$", r"blocks.\1.audio_attn"),
    (r"^blocks\.(\d+)$", r"blocks.\1"),
    (r"^head$", "proj_out"),
]


def _our_module(original: str) -> str:
    for pattern, target in _MODULE_MAP:
        if re.match(pattern, original):
            return re.sub(pattern, target, original)
    raise Skip(f"no counterpart for original module {original}")


def run_dit_forward(folder: GoldenFolder, check: dict) -> list:
    """One transformer call as `WanModel.forward([x], t, [context], seq_len, clip_fea, y, audio, masks)`."""
    if check["params"].get("teacache"):
        raise Skip("TeaCache forwards are checked by teacache_decisions")
    inp = {role: folder.value(ref) for role, ref in check["inputs"].items() if role != "model"}
    model = dit_model(str(folder.root), check["inputs"]["model"])
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for entry in check["expected"]:
        if entry["role"] != "intermediate":
            continue
        original, what = entry["tensor"].split(".", 1)[1].rsplit(".", 1)
        module = model.get_submodule(_our_module(original))
        key = entry["tensor"]
        if what == "out":
            hooks.append(module.register_forward_hook(lambda m, a, out, key=key: captured.__setitem__(key, out)))
        elif what == "x_ref_attn_map":  # handed to the audio attention as its reference_map argument
            attn = model.get_submodule(_our_module(original.replace("self_attn", "audio_cross_attn")))
            hooks.append(attn.register_forward_pre_hook(lambda m, a, key=key: captured.__setitem__(key, a[2][0])))
        else:
            raise Skip(f"unknown intermediate {what!r}")
    try:
        with torch.no_grad():
            x = torch.cat([inp["x"], inp["y"][0]], dim=0)[None]
            out = model(x, inp["t"], inp["context"][None], inp["clip_fea"], inp["audio"][None], inp["ref_target_masks"]).sample
    finally:
        for hook in hooks:
            hook.remove()
    return [out if e["role"] == "out" else captured[e["tensor"]] for e in check["expected"]]


def run_t5_encoder(folder: GoldenFolder, check: dict) -> list:
    inputs = check["inputs"]
    model = load_umt5_from_original(_weights(folder, inputs["model"]), torch.float32)
    encoder = WanTextEncoder(model, tokenizer=None, text_len=check["params"]["text_len"])
    ids, mask = folder.value(inputs["input_ids"]), folder.value(inputs["attention_mask"])
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.encoder.embed_tokens.register_forward_hook(lambda m, a, o: captured.__setitem__("token_embedding.out", o))]
    for n, block in enumerate(model.encoder.block):
        hooks.append(block.register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(f"blocks.{n}.out", o[0] if isinstance(o, tuple) else o)))
        bias = block.layer[0].SelfAttention.relative_attention_bias
        hooks.append(bias.register_forward_hook(
            lambda m, a, o, n=n: captured.__setitem__(f"blocks.{n}.pos_embedding.out", o.permute(2, 0, 1)[None])))
    hooks.append(model.encoder.register_forward_hook(
        lambda m, a, o: captured.__setitem__("encoder_out_padded", o.last_hidden_state)))
    try:
        contexts = encoder.encode_ids(ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    results, next_context = [], iter(contexts)
    for entry in check["expected"]:
        if entry["role"] == "seq_lens":
            results.append(mask.gt(0).sum(dim=1))
        elif entry["role"] == "context":
            results.append(next(next_context))
        else:
            results.append(captured[entry["tensor"].split(".", 1)[1]])
    return results


def run_clip_visual(folder: GoldenFolder, check: dict) -> list:
    params = check["params"]
    if params.get("image_size", 224) != 224 or not params.get("use_31_block", True):
        raise Skip("only the pipeline's 224 px, penultimate-block features are implemented")
    config = _config(folder, check["inputs"]["model"])
    heads = config.get("constructor", {}).get("num_heads")
    encoder = load_clip_from_original(_weights(folder, check["inputs"]["model"]), torch.float32, num_heads=heads,
                                      skip_last_layer=False)
    pixels = clip_pixel_values(folder.value(check["inputs"]["image"]))
    hidden = encoder.hidden_states(pixels)
    values = {"pixel_values": pixels, "out": hidden[encoder.feature_layer], "full_out": hidden[-1]}
    results = []
    for entry in check["expected"]:
        if entry["role"] != "intermediate":
            results.append(values[entry["role"]])
            continue
        name = entry["tensor"]
        if name == "visual.pre_norm.out":
            results.append(hidden[0])
        elif block := re.match(r"^visual\.transformer\.(\d+)\.out$", name):
            results.append(hidden[int(block.group(1)) + 1])
        else:
            raise Skip(f"unknown CLIP intermediate {name}")
    return results


@lru_cache(maxsize=None)
def _vae(path: str) -> WanVAE:
    return WanVAE(load_vae_from_original(Path(path), torch.float32))


def _check_vae_constants(folder: GoldenFolder, check: dict, vae: WanVAE) -> None:
    mean = folder.value(check["inputs"]["latents_mean"]).view(1, -1, 1, 1, 1)
    inv_std = folder.value(check["inputs"]["latents_inv_std"]).view(1, -1, 1, 1, 1)
    if not (torch.equal(mean, vae.mean) and torch.equal(inv_std, vae.inv_std)):
        raise AssertionError("latent mean / 1/std differ from the reference constants")


def run_vae_encode(folder: GoldenFolder, check: dict) -> list:
    vae = _vae(str(_weights(folder, check["inputs"]["model"])))
    _check_vae_constants(folder, check, vae)
    mu = vae.posterior_mean(folder.value(check["inputs"]["video"]))
    latent = vae.normalize(mu)
    return [{"latent": latent[0], "mu_raw": mu[0]}[e["role"]] for e in check["expected"]]


def run_vae_decode(folder: GoldenFolder, check: dict) -> list:
    vae = _vae(str(_weights(folder, check["inputs"]["model"])))
    _check_vae_constants(folder, check, vae)
    chunks: list[torch.Tensor] = []
    hook = vae.vae.decoder.register_forward_hook(lambda m, a, o: chunks.append(o))  # per-latent-frame, pre-clamp
    try:
        decoded = vae.decode(folder.value(check["inputs"]["latent"])[None])
    finally:
        hook.remove()
    raw = torch.cat(chunks, dim=2)
    return [{"decoded": decoded[0], "decoded_raw": raw[0]}[e["role"]] for e in check["expected"]]


def run_w2v_embedding(folder: GoldenFolder, check: dict) -> list:
    params = check["params"]
    if params.get("sample_rate", 16000) != 16000 or params.get("fps", 25) != 25:
        raise Skip("only 16 kHz audio at 25 fps is implemented")
    entry = folder.model_entry(check["inputs"]["model"])
    encoder = Wav2Vec2AudioEncoder.from_pretrained(folder.root / entry["dir"])
    audio = folder.value(check["inputs"]["audio"])
    features = encoder.encode(audio.numpy() if isinstance(audio, torch.Tensor) else audio)
    values = {"embedding": features.embedding, "input_values": features.input_values,
              "conv_features": features.conv_features, "hidden_states": features.hidden_states}
    results = []
    for entry in check["expected"]:
        what = entry["tensor"].rsplit(".", 1)[-1]
        if what not in values:
            raise Skip(f"unknown wav2vec2 output {entry['tensor']}")
        results.append(values[what])
    return results


MODEL_RUNNERS = {
    "dit_forward": run_dit_forward,
    "t5_encoder": run_t5_encoder,
    "clip_visual": run_clip_visual,
    "vae_encode": run_vae_encode,
    "vae_decode": run_vae_decode,
    "w2v_embedding": run_w2v_embedding,
}
