"""Which published files make up each weights layout, and where under the weights root each one goes.

Kept in code (not fetched from a listing) so that `multitalk weights download --dry-run` can say
exactly what will be downloaded without a network, and so that nothing the loader does not read is
fetched: the Wan repos also hold READMEs, example assets and an unused CLIP text tokenizer
(`xlm-roberta-large/`); MultiTalk's repo holds int8 models; wav2vec2's main branch holds a `.bin`
and a fairseq checkpoint that the `refs/pr/1` safetensors replace; Kokoro's repo holds voices in
languages the text endpoints do not speak.

Sources: spec §1 (MULTITALK_REFERENCE.md), the MultiTalk README ("Model Preparation" and the
FusioniX / lightx2v links), `model/weights/layout.py` and `weights/README.md`. The shard counts of
the Diffusers repo (14 transformer shards, 5 text-encoder shards) come from third-party listings of
the repo's files, not from the spec. Every name is checked against the Hub before a real download
(`download.fill_sizes` fails naming any file the Hub does not have), so a stale entry stops the
run before any byte is fetched.

Files go where `layout.find_layout` looks, under the repo's own relative path: MultiTalk's
replacement index and adapter stay in `MeiGen-MultiTalk/` (the loader reads them there; the
README's copy/symlink into the Wan folder is not needed), and LoRAs land flat in `loras/`, the
folder `Pipeline.from_weights` scans (non-recursively) and whose file names the `acceleration`
presets match on "fusionx" / "lightx2v". The folder names repeat layout.py's constants rather than
importing them because importing layout.py loads torch and diffusers (seconds), which a dry run
should not need; tests/test_weights_download.py asserts that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.speech.voices import LOCAL_VOICES

WAN_ORIGINAL_DIR = "Wan2.1-I2V-14B-480P"
WAN_DIFFUSERS_DIR = "Wan2.1-I2V-14B-480P-Diffusers"
MULTITALK_DIR = "MeiGen-MultiTalk"
WAV2VEC_DIR = "chinese-wav2vec2-base"
KOKORO_DIR = "Kokoro-82M"
LORA_DIR = "loras"


@dataclass(frozen=True)
class RepoFiles:
    """Some files of one repo at one revision, placed under `folder` with their paths in the repo."""

    repo_id: str
    revision: str
    folder: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Lora:
    """An optional distilled LoRA: one file of a repo, saved flat as `loras/<target>`."""

    repo_id: str
    revision: str
    filename: str
    target: str


def _shards(stem: str, count: int) -> tuple[str, ...]:
    return tuple(f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1))


_UMT5_TOKENIZER = ("special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json")

WAN_ORIGINAL = RepoFiles(
    "Wan-AI/Wan2.1-I2V-14B-480P", "main", WAN_ORIGINAL_DIR,
    ("config.json", *_shards("diffusion_pytorch_model", 7), "diffusion_pytorch_model.safetensors.index.json",
     "models_t5_umt5-xxl-enc-bf16.pth", *(f"google/umt5-xxl/{name}" for name in _UMT5_TOKENIZER),
     "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "Wan2.1_VAE.pth"),
)

WAN_DIFFUSERS = RepoFiles(
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "main", WAN_DIFFUSERS_DIR,
    ("transformer/config.json", *(f"transformer/{name}" for name in _shards("diffusion_pytorch_model", 14)),
     "transformer/diffusion_pytorch_model.safetensors.index.json",
     "text_encoder/config.json", *(f"text_encoder/{name}" for name in _shards("model", 5)),
     "text_encoder/model.safetensors.index.json",
     *(f"tokenizer/{name}" for name in _UMT5_TOKENIZER),
     "image_encoder/config.json", "image_encoder/model.safetensors",
     "vae/config.json", "vae/diffusion_pytorch_model.safetensors"),
)

# The replacement index is read only by the `multitalk` layout (the diffusers transformer has its own index).
MULTITALK_ORIGINAL = RepoFiles(
    "MeiGen-AI/MeiGen-MultiTalk", "main", MULTITALK_DIR,
    ("multitalk.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
)
MULTITALK_ADAPTER = RepoFiles("MeiGen-AI/MeiGen-MultiTalk", "main", MULTITALK_DIR, ("multitalk.safetensors",))

# config files from main; model.safetensors only exists on the PR branch the MultiTalk README pins.
WAV2VEC_CONFIG = RepoFiles(
    "TencentGameMate/chinese-wav2vec2-base", "main", WAV2VEC_DIR, ("config.json", "preprocessor_config.json"),
)
WAV2VEC_WEIGHTS = RepoFiles("TencentGameMate/chinese-wav2vec2-base", "refs/pr/1", WAV2VEC_DIR, ("model.safetensors",))

# Speech synthesis for the text endpoints (≈ 330 MB): the v1.0 model and its English voices, the ones
# `model.speech.voices` offers (the repo also holds other languages' voices and a v0.19 model).
KOKORO = RepoFiles(
    "hexgrad/Kokoro-82M", "main", KOKORO_DIR,
    ("config.json", "kokoro-v1_0.pth", *(f"voices/{voice}.pt" for voice in LOCAL_VOICES)),
)

LAYOUTS: dict[str, tuple[RepoFiles, ...]] = {
    "multitalk": (WAN_ORIGINAL, MULTITALK_ORIGINAL, WAV2VEC_CONFIG, WAV2VEC_WEIGHTS, KOKORO),
    "diffusers": (WAN_DIFFUSERS, MULTITALK_ADAPTER, WAV2VEC_CONFIG, WAV2VEC_WEIGHTS, KOKORO),
}

# Repo ids and file names from the links in the MultiTalk README (July 2025); revisions are not pinned
# there, so "main" is used. Not checked against the live repos from here: fill_sizes reports a moved file.
LORAS: dict[str, Lora] = {
    "fusionx": Lora("vrgamedevgirl84/Wan14BT2VFusioniX", "main",
                    "FusionX_LoRa/Wan2.1_I2V_14B_FusionX_LoRA.safetensors", "Wan2.1_I2V_14B_FusionX_LoRA.safetensors"),
    "lightx2v": Lora("Kijai/WanVideo_comfy", "main", "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",
                     "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"),
}
