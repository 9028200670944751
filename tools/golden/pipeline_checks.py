"""Golden runners for the generation pipeline: schedules, noise and masks, audio windows, TeaCache, sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.media.audio_input import combine_speakers, decode_audio, loudness_normalize, resample, to_mono
from model.media.image_input import choose_bucket, load_image, pixels_to_tensor, resize_and_center_crop
from model.media.person_masks import boxes_from_original_bbox, person_masks
from model.network.configs import TEXT_LEN
from model.sampling.guidance import GuidanceConfig, GuidanceInputs
from model.sampling.long_video import ClipPlan, clip_audio, frame_mask, plan_clips
from model.sampling.schedule import sampling_timesteps
from model.sampling.teacache import TeaCache, TeaCacheConfig
from model.sampling.video_generation import SamplingSettings, VideoConditioning, generate_video_clips
from tools.golden.folder import GoldenFolder, Skip
from tools.golden.model_checks import dit_model

_RESOLUTION = {"multitalk-480": "480p", "multitalk-720": "720p"}


def _resolution(bucket: str) -> str:
    if bucket not in _RESOLUTION:
        raise Skip(f"unknown bucket {bucket!r}")
    return _RESOLUTION[bucket]


def run_audio_load(folder: GoldenFolder, check: dict) -> list:
    p = check["params"]
    if p.get("resampler", "soxr_hq") != "soxr_hq" or not p.get("mono", True):
        raise Skip("only librosa's default soxr_hq resampling to mono is implemented")
    samples, rate = decode_audio(folder.value(check["inputs"]["wav"]), "wav")
    return [resample(to_mono(samples), rate, p["sample_rate"])]


def run_loudness_norm(folder: GoldenFolder, check: dict) -> list:
    p = check["params"]
    audio = folder.value(check["inputs"]["audio"]).numpy()
    return [loudness_normalize(audio, p["sample_rate"], p["target_lufs"])]


def run_audio_prepare(folder: GoldenFolder, check: dict) -> list:
    """Two speakers' normalised tracks → each person's track and the mix (`add` or `para`)."""
    tracks = [folder.value(check["inputs"][role]).numpy() for role in ("audio1", "audio2")]
    combined = combine_speakers(tracks, check["params"]["mode"])
    values = {"person1": combined.per_speaker[0], "person2": combined.per_speaker[1], "sum": combined.mix}
    return [values[e["role"]] for e in check["expected"]]


def _bucketed(folder: GoldenFolder, check: dict):
    image = load_image(folder.value(check["inputs"]["image"]), "image")
    key, target_hw = choose_bucket(image.height, image.width, _resolution(check["params"]["bucket"]))
    return image, key, target_hw


def run_bucket_crop(folder: GoldenFolder, check: dict) -> list:
    image, key, target_hw = _bucketed(folder, check)
    values = {"crop": resize_and_center_crop(image, target_hw), "bucket_key": key, "target_hw": list(target_hw)}
    return [values[e["role"]] for e in check["expected"]]


def run_human_masks(folder: GoldenFolder, check: dict) -> list:
    p = check["params"]
    image, _, target_hw = _bucketed(folder, check)
    boxes = boxes_from_original_bbox(p["bbox"]) if p.get("bbox") else None
    masks = person_masks((image.height, image.width), target_hw, (target_hw[0] // 8, target_hw[1] // 8),
                         p["n_people"], boxes, face_scale=p["face_scale"])
    return [masks for _ in check["expected"]]


def run_schedule(folder: GoldenFolder, check: dict) -> list:
    p = check["params"]
    return [sampling_timesteps(p["steps"], p["shift"], p["num_timesteps"]).tolist()]


def run_latent_init(folder: GoldenFolder, check: dict) -> list:
    """Seeded initial noise [16, T, h, w] and the first clip's frame mask; the grid is the expected one's."""
    p = check["params"]
    noise_ref = next(e for e in check["expected"] if e["role"] == "noise")
    channels, _, lat_h, lat_w = noise_ref["shape"]
    latent_frames = (p["frame_num"] - 1) // 4 + 1
    noise = torch.randn(channels, latent_frames, lat_h, lat_w, generator=torch.Generator().manual_seed(p["seed"]))
    mask = frame_mask(p["frame_num"], 1, (lat_h, lat_w))
    return [{"noise": noise, "y_mask": mask}[e["role"]] for e in check["expected"]]


def _branches(kwargs: dict) -> list[dict]:
    """Describe each batched guidance pass as the original's driver records it."""
    prompt = kwargs["encoder_hidden_states"][0]
    branches = []
    for i, speakers in enumerate(kwargs["num_speakers"]):
        audio = kwargs["audio_embeds"][i, :speakers]
        branches.append({
            "text": "cond" if torch.equal(kwargs["encoder_hidden_states"][i], prompt) else "null",
            "zero_audio": not audio.any(),
            "audio_shape": list(audio.shape),
        })
    return branches


def run_audio_windows(folder: GoldenFolder, check: dict) -> list:
    p, inputs = check["params"], check["inputs"]
    if p.get("audio_window", 5) != 5:
        raise Skip("only the 5-frame audio window is implemented")
    embeddings = [folder.value(inputs[role]) for role in sorted(r for r in inputs if r.startswith("audio_person"))]
    clip = ClipPlan(0, p["clip_start"], p["frame_num"], 1, 0, is_last=False)
    audio = clip_audio(embeddings, clip)
    context, negative = torch.ones(2, 4), torch.zeros(3, 4)  # distinct placeholders: only routing is checked
    inputs_ = GuidanceInputs(context, negative, torch.zeros(1, 1, 4), audio, torch.ones(3, 1, 1))
    full = inputs_.transformer_kwargs(5.0)
    values = {
        "cond": full["audio_embeds"][0],
        "drop_text": full["audio_embeds"][1],
        "uncond": full["audio_embeds"][2, : full["num_speakers"][2]],
        "branches_text_scale_5": _branches(full),
        "branches_text_scale_1": _branches(inputs_.transformer_kwargs(1.0)),
    }
    return [values[e["role"]] for e in check["expected"]]


def run_teacache_decisions(folder: GoldenFolder, check: dict) -> list:
    """Replay the original's call sequence (per step: one call per branch, in `call_order`) batched per step."""
    p, inputs = check["params"], check["inputs"]
    model = dit_model(str(folder.root), inputs["model"])
    value = {role: folder.value(ref) for role, ref in inputs.items() if role != "model"}
    audio = value["audio"]
    order = p["call_order"]
    config = TeaCacheConfig.for_run(_resolution(p["model_scale"]), p["teacache_thresh"], p["sample_steps"],
                                    p["use_ret_steps"])
    cache = TeaCache(config, [c["branch"] for c in order], record_decisions=True)
    texts = [F.pad(value[c["context"]], (0, 0, 0, TEXT_LEN - value[c["context"]].shape[0])) for c in order]
    # The null-audio pass reads only the first stream (num_speakers 1): one all-zero stream, as the original's.
    streams = [audio if c["audio"] == "audio" else torch.zeros_like(audio) for c in order]
    speakers = [audio.shape[0] if c["audio"] == "audio" else 1 for c in order]
    outs = []
    with torch.no_grad():
        for latent, t in zip(value["latents"], value["timesteps"]):
            x = torch.cat([latent, value["y"][0]])[None].expand(len(order), -1, -1, -1, -1)
            out = model(x, t.expand(len(order)), torch.stack(texts), value["clip_fea"].expand(len(order), -1, -1),
                        torch.stack(streams), value["ref_target_masks"], num_speakers=speakers, block_cache=cache).sample
            outs.append(out)
    results = {
        "out": torch.cat(outs),
        "decisions": [d.computed for d in cache.decisions],
        "accumulators": [d.accumulated for d in cache.decisions],
    }
    return [results[e["role"]] for e in check["expected"]]


class ZeroEncodeIdentityDecode:
    """The e2e stand-in VAE: encode → zeros, decode → the latent itself."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        _, _, frames, height, width = video.shape
        return torch.zeros(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


class PoolVAE:
    """The shape-correct stand-in: 8×8 average pooling of frame 0 and of each 4-frame group's mean."""

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        first, rest = video[:, :, :1], video[:, :, 1:]
        groups = rest.unflatten(2, (-1, 4)).mean(3) if rest.shape[2] else rest
        pooled = F.avg_pool3d(torch.cat([first, groups], dim=2), (1, 8, 8))  # [1, 3, T, h, w]
        return torch.stack([(1 + 0.1 * c) * pooled[:, c % 3] for c in range(16)], dim=1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        pixels = torch.stack([latent[:, d::3].mean(1) for d in range(3)], dim=1)  # [1, 3, T, h, w]
        frames = torch.cat([pixels[:, :, :1], pixels[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return frames.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)


class _ConstantImageEncoder:
    def __init__(self, features: torch.Tensor):
        self.features = features

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.features


_VAE_STANDINS = {"zero_encode_identity_decode": ZeroEncodeIdentityDecode, "pool_vae": PoolVAE}


def run_e2e_sampling(folder: GoldenFolder, check: dict) -> list:
    """The original's `generate()` with the tiny DiT and its stand-in T5 / CLIP / VAE."""
    p, inputs = check["params"], check["inputs"]
    if p["vae_standin"] not in _VAE_STANDINS:
        raise Skip(f"unknown VAE stand-in {p['vae_standin']!r}")
    model = dit_model(str(folder.root), inputs["model"])
    image = load_image(folder.value(inputs["image"]), "image")
    _, target_hw = choose_bucket(image.height, image.width, _resolution(p["bucket"]))
    reference = pixels_to_tensor(resize_and_center_crop(image, target_hw))
    embeddings = [folder.value(inputs[r]) for r in sorted(r for r in inputs if r.startswith("audio_person"))]
    boxes = boxes_from_original_bbox(p["bbox"]) if p.get("bbox") and len(embeddings) == 2 else None
    masks = person_masks((image.height, image.width), target_hw, (target_hw[0] // 8, target_hw[1] // 8),
                         len(embeddings), boxes, face_scale=p["face_scale"])
    conditioning = VideoConditioning(reference, embeddings, folder.value(inputs["t5_standin_context"]),
                                     folder.value(inputs["t5_standin_context_null"]), masks)
    frame_num, max_frames = p["frame_num"], p["max_frames_num"]
    if max_frames <= frame_num:
        clips = [ClipPlan(0, 0, frame_num, 1, 0, is_last=True)]
    else:  # the original streams until a clip reaches min(max_frames_num, person 1's audio rows)
        clips = plan_clips(min(max_frames, embeddings[0].shape[0]), frame_num, p["motion_frame"])
    teacache = None
    if p.get("use_teacache"):
        teacache = TeaCacheConfig.for_run(_resolution(p["bucket"]), p.get("teacache_thresh", 0.2), p["sampling_steps"])
    settings = SamplingSettings(
        sampling_timesteps(p["sampling_steps"], p["shift"]),
        GuidanceConfig(p["text_guide_scale"], p["audio_guide_scale"], p["use_apg"], p["apg_momentum"],
                       p["apg_norm_threshold"]),
        teacache, p["color_correction_strength"])
    first_calls: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda m, a, out: first_calls.append(out.sample[:1]) if not first_calls else None)
    try:
        outputs = list(generate_video_clips(model, _VAE_STANDINS[p["vae_standin"]](),
                                            _ConstantImageEncoder(folder.value(inputs["clip_standin_out"])),
                                            conditioning, clips, settings, torch.Generator().manual_seed(p["seed"])))
    finally:
        hook.remove()
    video = torch.cat([o.frames for o in outputs], dim=2)[:, :, :max_frames][0]
    if len(clips) > 1:  # the original's final trim by person 1's mirror padding (spec §9.6, bug-compatible)
        end = clips[-1].start + clips[-1].frames
        misses = [end - e.shape[0] + 3 if end >= e.shape[0] else 0 for e in embeddings]
        if sum(misses) > 0:
            video = video[:, : -misses[0]] if misses[0] else video[:, :0]
    values = {"video": video, "first_call_out": first_calls[0],
              "clip2_latent": outputs[1].latent if len(outputs) > 1 else None}
    return [values[e["role"]] for e in check["expected"]]


PIPELINE_RUNNERS = {
    "audio_load": run_audio_load,
    "loudness_norm": run_loudness_norm,
    "audio_prepare_add": run_audio_prepare,
    "audio_prepare_para": run_audio_prepare,
    "bucket_crop": run_bucket_crop,
    "human_masks": run_human_masks,
    "schedule": run_schedule,
    "latent_init": run_latent_init,
    "audio_windows": run_audio_windows,
    "teacache_decisions": run_teacache_decisions,
    "e2e_sampling": run_e2e_sampling,
}
