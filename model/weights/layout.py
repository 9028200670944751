"""Find the checkpoints users already have on disk, in either published layout, and load them in place.

Layout `multitalk` (the MultiTalk README):
    Wan2.1-I2V-14B-480P/   config.json, 7 original-key DiT shards + index, models_t5_umt5-xxl-enc-bf16.pth,
                           google/umt5-xxl/ (tokenizer), models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth,
                           Wan2.1_VAE.pth
    MeiGen-MultiTalk/      multitalk.safetensors (audio adapter), diffusion_pytorch_model.safetensors.index.json
    chinese-wav2vec2-base/ config.json, preprocessor_config.json, model.safetensors
Layout `diffusers`:
    Wan2.1-I2V-14B-480P-Diffusers/  transformer/, text_encoder/, tokenizer/, image_encoder/, vae/
    MeiGen-MultiTalk/multitalk.safetensors and chinese-wav2vec2-base/ as above.
Both: Kokoro-82M/ config.json, kokoro-v1_0.pth, voices/*.pt (speech synthesis for the text endpoints,
loaded by the first request that needs it: `model.speech.synthesis`).

MultiTalk's replacement index (base keys → Wan shards, adapter keys → multitalk.safetensors) is read
from `MeiGen-MultiTalk/` where it was published; the README's step of swapping it into the Wan
folder is honoured when done but never needed, and the user's files are never edited.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import torch
from accelerate import init_empty_weights

from model.encoders.audio_encoder import Wav2Vec2AudioEncoder
from model.encoders.image_encoder import WanImageEncoder, load_clip_from_original, load_clip_from_pretrained
from model.encoders.text_encoder import WanTextEncoder, load_umt5_from_original, load_umt5_from_pretrained
from model.encoders.vae import WanVAE, load_vae_from_original, load_vae_from_pretrained
from model.network.configs import heads_from_config, transformer_config_from_shapes
from model.network.transformer_multitalk import MultiTalkTransformer3DModel, is_adapter_parameter
from model.speech import synthesis
from model.speech.voices import LOCAL_VOICES
from model.weights.keymaps import TensorRule, audio_key_to_ours, is_original_audio_key, original_dit_key_map
from model.weights.streaming import CheckpointFiles, WeightsError, load_into_empty_model, plan_problems

WAN_ORIGINAL_DIR = "Wan2.1-I2V-14B-480P"
WAN_DIFFUSERS_DIR = "Wan2.1-I2V-14B-480P-Diffusers"
MULTITALK_DIR = "MeiGen-MultiTalk"
WAV2VEC_DIR = "chinese-wav2vec2-base"
ADAPTER_FILE = "multitalk.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"


@dataclass
class WeightsLayout:
    """Where every component of one checkpoint set is."""

    kind: str  # "multitalk" | "diffusers"
    root: Path
    transformer_config: Path
    transformer_files: list[Path]  # base shards then the adapter file
    text_encoder: Path  # .pth (multitalk) or folder (diffusers)
    tokenizer: Path
    image_encoder: Path
    vae: Path
    audio_encoder: Path


def _require(path: Path, what: str, missing: list[str]) -> Path:
    if not path.exists():
        missing.append(f"{what}: {path}")
    return path


def find_layout(root: Path, kind: str | None = None) -> WeightsLayout:
    """Locate every file of a checkpoint set under `root`; `WeightsError` lists everything missing."""
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"weights directory not found: {root}")
    if kind is None:
        if (root / WAN_ORIGINAL_DIR).is_dir():
            kind = "multitalk"
        elif (root / WAN_DIFFUSERS_DIR).is_dir():
            kind = "diffusers"
        else:
            raise WeightsError(f"{root} has neither {WAN_ORIGINAL_DIR}/ (layout multitalk) nor {WAN_DIFFUSERS_DIR}/ (layout diffusers)")
    missing: list[str] = []
    multitalk_dir = _require(root / MULTITALK_DIR, "MultiTalk adapter folder", missing)
    audio = _require(root / WAV2VEC_DIR / "config.json", "wav2vec2 config", missing).parent
    if kind == "multitalk":
        wan = root / WAN_ORIGINAL_DIR
        layout = WeightsLayout(
            kind, root, _require(wan / "config.json", "Wan DiT config", missing),
            _original_transformer_files(wan, multitalk_dir, missing),
            _require(wan / T5_FILE, "umT5 encoder", missing), _require(wan / "google" / "umt5-xxl", "umT5 tokenizer", missing),
            _require(wan / CLIP_FILE, "CLIP", missing), _require(wan / VAE_FILE, "VAE", missing), audio,
        )
    elif kind == "diffusers":
        wan = root / WAN_DIFFUSERS_DIR
        transformer = wan / "transformer"
        files = _indexed_files(transformer, transformer / INDEX_FILE, [transformer], missing)
        files.append(_find_adapter([multitalk_dir, transformer], missing))
        layout = WeightsLayout(
            kind, root, _require(transformer / "config.json", "transformer config", missing), files,
            _require(wan / "text_encoder", "text encoder", missing), _require(wan / "tokenizer", "tokenizer", missing),
            _require(wan / "image_encoder", "image encoder", missing), _require(wan / "vae", "VAE", missing), audio,
        )
    else:
        raise WeightsError(f"unknown layout {kind!r}: use 'multitalk' or 'diffusers'")
    if missing:
        raise WeightsError(f"incomplete {kind} layout under {root}:\n  " + "\n  ".join(missing))
    return layout


def _find_adapter(folders: list[Path], missing: list[str]) -> Path:
    for folder in folders:
        if (folder / ADAPTER_FILE).is_file():
            return folder / ADAPTER_FILE
    missing.append(f"MultiTalk audio adapter: {folders[0] / ADAPTER_FILE}")
    return folders[0] / ADAPTER_FILE


def _indexed_files(folder: Path, index: Path, search: list[Path], missing: list[str]) -> list[Path]:
    """Shard files named by an index json (looked up in `search` folders), else every shard in `folder`."""
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.safetensors"))
        if not names:
            missing.append(f"DiT weights: {folder}/diffusion_pytorch_model*.safetensors")
    files = []
    for name in names:
        found = next((d / name for d in search if (d / name).is_file()), None)
        if found is None:
            missing.append(f"DiT shard {name} (listed in {index}) in {' or '.join(map(str, search))}")
        else:
            files.append(found)
    return files


def _original_transformer_files(wan: Path, multitalk_dir: Path, missing: list[str]) -> list[Path]:
    replacement = multitalk_dir / INDEX_FILE
    index = replacement if replacement.is_file() else wan / INDEX_FILE
    files = _indexed_files(wan, index, [wan, multitalk_dir], missing)
    if not any(f.name == ADAPTER_FILE for f in files):
        files.append(_find_adapter([multitalk_dir, wan], missing))
    base = [f for f in files if f.name != ADAPTER_FILE]
    return base + [f for f in files if f.name == ADAPTER_FILE]


def transformer_rules(key_format: str, source: CheckpointFiles) -> dict[str, TensorRule]:
    """Our parameter name → source tensor. `key_format`: "original" (Wan/MultiTalk names, layout
    multitalk) or "diffusers" (diffusers base names; the adapter file keeps MultiTalk's own names)."""
    if key_format == "original":
        mapping = original_dit_key_map(source.keys())
    else:
        mapping = {k: audio_key_to_ours(k) if is_original_audio_key(k) else k for k in source.keys()}
    return {target: TensorRule(src) for src, target in mapping.items()}


def transformer_config(config_json: dict, rules: dict[str, TensorRule], source: CheckpointFiles,
                       audio_encoder_layers: int, audio_encoder_dim: int) -> dict:
    shapes = source.shapes()
    return transformer_config_from_shapes(
        {target: shapes[rule.source] for target, rule in rules.items()},
        heads_from_config(config_json),
        audio_encoder_layers=audio_encoder_layers,
        audio_encoder_dim=audio_encoder_dim,
        eps=float(config_json.get("eps", 1e-6)),
    )


def load_transformer_files(
    files: list[Path],
    config_json: dict,
    key_format: str,
    *,
    audio_encoder_layers: int = 12,
    audio_encoder_dim: int = 768,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    what: str = "MultiTalk transformer",
) -> MultiTalkTransformer3DModel:
    """Build the DiT on the meta device and stream the files into it (one copy in memory at most)."""
    source = CheckpointFiles([Path(f) for f in files])
    rules = transformer_rules(key_format, source)
    with init_empty_weights():
        model = MultiTalkTransformer3DModel(
            **transformer_config(config_json, rules, source, audio_encoder_layers, audio_encoder_dim)
        )
    load_into_empty_model(
        model, source, rules, dtype=dtype, device=device, keep_in_fp32=model._keep_in_fp32_modules, what=what
    )
    model.rope.to(device)
    return model.eval()


def _audio_encoder_size(layout: WeightsLayout) -> tuple[int, int]:
    config = json.loads((layout.audio_encoder / "config.json").read_text())
    return int(config["num_hidden_layers"]), int(config["hidden_size"])


def _key_format(layout: WeightsLayout) -> str:
    return "original" if layout.kind == "multitalk" else "diffusers"


def load_transformer(layout: WeightsLayout, dtype: torch.dtype, device: torch.device | str = "cpu") -> MultiTalkTransformer3DModel:
    layers, dim = _audio_encoder_size(layout)
    return load_transformer_files(
        layout.transformer_files, json.loads(layout.transformer_config.read_text()), _key_format(layout),
        audio_encoder_layers=layers, audio_encoder_dim=dim, dtype=dtype, device=device,
        what=f"MultiTalk transformer ({layout.kind} layout under {layout.root})",
    )


@dataclass
class Precision:
    """Runtime dtype of each component (the original: DiT and T5 bf16, CLIP fp16, VAE and wav2vec2 fp32)."""

    transformer: torch.dtype = torch.float32
    text_encoder: torch.dtype = torch.float32
    image_encoder: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32

    @classmethod
    def for_device(cls, device: torch.device | str) -> "Precision":
        if torch.device(device).type == "cuda":
            return cls(torch.bfloat16, torch.bfloat16, torch.float16, torch.float32)
        return cls()


@dataclass
class MultiTalkComponents:
    transformer: MultiTalkTransformer3DModel
    text_encoder: WanTextEncoder
    image_encoder: WanImageEncoder
    vae: WanVAE
    audio_encoder: Wav2Vec2AudioEncoder


def load_components(layout: WeightsLayout, device: torch.device | str = "cpu", precision: Precision | None = None,
                    on_cpu: Collection[str] = ()) -> MultiTalkComponents:
    """Load every model of the pipeline from `layout` onto `device`, except those named in `on_cpu`
    ("transformer": converted on the CPU before it moves; "text_encoder": kept in CPU memory between requests).
    wav2vec2 runs in fp32 like the original, but on `device` rather than the original's CPU: the same
    arithmetic, without a CPU pass over every request's audio."""
    precision = precision or Precision.for_device(device)
    t5_device = "cpu" if "text_encoder" in on_cpu else device
    if layout.kind == "multitalk":
        t5 = load_umt5_from_original(layout.text_encoder, precision.text_encoder, t5_device)
        clip = load_clip_from_original(layout.image_encoder, precision.image_encoder, device)
        vae = load_vae_from_original(layout.vae, precision.vae, device)
    else:
        t5 = load_umt5_from_pretrained(layout.text_encoder, precision.text_encoder, t5_device)
        clip = load_clip_from_pretrained(layout.image_encoder, precision.image_encoder, device)
        vae = load_vae_from_pretrained(layout.vae, precision.vae, device)
    return MultiTalkComponents(
        transformer=load_transformer(layout, precision.transformer, "cpu" if "transformer" in on_cpu else device),
        text_encoder=WanTextEncoder.from_tokenizer_dir(t5, layout.tokenizer),
        image_encoder=clip,
        vae=WanVAE(vae),
        audio_encoder=Wav2Vec2AudioEncoder.from_pretrained(layout.audio_encoder, device=str(device)),
    )


def inspect_weights(root: Path, kind: str | None = None) -> dict:
    """What `multitalk weights check` reports: layout, files, parameter counts, problems (reads headers only)."""
    report: dict = {"root": str(root), "layout": None, "ok": False, "problems": []}
    try:
        layout = find_layout(root, kind)
    except WeightsError as exc:
        report["problems"].append(str(exc))
        return report
    report["layout"] = layout.kind
    report["files"] = {
        "transformer": [str(f) for f in layout.transformer_files], "text_encoder": str(layout.text_encoder),
        "tokenizer": str(layout.tokenizer), "image_encoder": str(layout.image_encoder), "vae": str(layout.vae),
        "audio_encoder": str(layout.audio_encoder),
    }
    try:
        source = CheckpointFiles(layout.transformer_files)
        rules = transformer_rules(_key_format(layout), source)
        config = transformer_config(json.loads(layout.transformer_config.read_text()), rules, source, *_audio_encoder_size(layout))
        with init_empty_weights():
            model = MultiTalkTransformer3DModel(**config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        report["problems"] += [f"transformer: {problem}" for problem in plan_problems(expected, source, rules)]
        shapes = source.shapes()
        numel = {t: math.prod(shapes[r.source]) for t, r in rules.items()}
        adapter = sum(n for t, n in numel.items() if is_adapter_parameter(t))
        report["transformer"] = {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "parameters": {"base": sum(numel.values()) - adapter, "audio_adapter": adapter, "total": sum(numel.values())},
            "dtypes": sorted({source.dtype_name(r.source) for r in rules.values()}),
        }
    except (WeightsError, KeyError, ValueError) as exc:
        report["problems"].append(f"transformer: {exc}")
    speech = Path(root) / synthesis.KOKORO_DIR
    report["files"]["speech"] = str(speech)
    missing = synthesis.missing_files(speech) + [
        f"{synthesis.VOICES_DIR}/{voice}.pt" for voice in LOCAL_VOICES
        if not (speech / synthesis.VOICES_DIR / f"{voice}.pt").is_file()]
    if missing:
        report["problems"].append(f"speech (Kokoro-82M, for the text endpoints): {speech} lacks {', '.join(missing)}")
    report["ok"] = not report["problems"]
    return report

