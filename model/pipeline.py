"""The generation pipeline: load the models once, then turn requests into MP4 files.

`Pipeline.generate(GenerationRequest)` is the one seam between the server (or the CLI) and the model:
inputs are local files plus options, a progress callback and a cancel check travel with the call, and
a `GenerationResult` (the MP4's path, the seed, timings, the settings used) comes back. Every problem
with the inputs raises `InputError` naming the request field, before any sampling starts.

Flow: speech (the text endpoints: each text synthesised by Kokoro-82M, `model.speech`) or audio (decode,
16 kHz, loudness), speakers on one timeline of exactly the video's length →
wav2vec2 features; image (bucket, crop) → reference; people → masks; prompt → UMT5; then clip by clip
sampling (`video_generation`) with the frames streamed into one H.264 + AAC encode.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from model.contract.errors import GenerationCancelled, InputError
from model.contract.fields import ACCELERATION, RESOLUTION, VIDEO_FPS, seed_or_random
from model.contract.request import (
    GenerationRequest,
    GenerationResult,
    Progress,
    ProgressCallback,
)
from model.media.audio_input import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    combine_speakers,
    fit_length,
    load_speech,
    resample,
)
from model.media.image_input import (
    choose_bucket,
    load_image,
    pixels_to_tensor,
    resize_and_center_crop,
)
from model.media.person_masks import detect_speaker_boxes, person_masks, validate_boxes
from model.media.video_output import Mp4Writer, frames_to_uint8
from model.runtime.execution import ExecutionOptions, prepare_transformer
from model.runtime.lora import load_lora, loaded_loras, use_lora
from model.runtime.memory_budget import keeps_text_encoder_on_cpu
from model.sampling.acceleration import SamplingRecipe, recipe_for
from model.sampling.guidance import (
    GuidanceCombiner,
    guided_velocity,
    random_guidance_inputs,
)
from model.sampling.long_video import ClipPlan, plan_clips
from model.sampling.schedule import sampling_timesteps
from model.sampling.teacache import TeaCacheConfig
from model.sampling.video_generation import (
    LATENT_CHANNELS,
    SamplingSettings,
    VideoConditioning,
    generate_video_clips,
)
from model.speech import synthesis
from model.speech.text_rules import MAX_SPEED_UP
from model.weights.layout import (
    MultiTalkComponents,
    Precision,
    find_layout,
    load_components,
)

logger = logging.getLogger(__name__)

# The original's default negative prompt for multitalk-14B (spec §7).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


def _recipe(request: GenerationRequest, loras: Sequence[str]) -> SamplingRecipe:
    """The preset of `acceleration`, then any explicit overrides of the request."""
    recipe = recipe_for(request.acceleration, request.resolution, loras)

    def given(**values) -> dict:
        return {name: value for name, value in values.items() if value is not None}

    guidance = replace(recipe.guidance, use_apg=request.use_apg,
                       **given(text_scale=request.text_scale, audio_scale=request.audio_scale))
    return replace(recipe, guidance=guidance,
                   **given(steps=request.steps, shift=request.shift, teacache_threshold=request.teacache_threshold))


# How much of each speaker's track wav2vec2 reads (`speaker_embeddings`): the original reads all of it.
AUDIO_CONTEXT_S = 120.0


@contextmanager
def visiting(module: torch.nn.Module, device: torch.device, offloaded: bool) -> Iterator[None]:
    """`module` on `device` inside the block; an offloaded module goes back to the CPU afterwards."""
    if not offloaded:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")


class Pipeline:
    """All MultiTalk models, loaded once; `generate` may be called many times (one call at a time)."""

    def __init__(self, components: MultiTalkComponents, device: torch.device | str = "cpu",
                 execution: ExecutionOptions = ExecutionOptions(), speech_folder: Path | None = None):
        """`components.transformer` must already be prepared with `execution` (see `prepare_transformer`).

        The text encoder lives in CPU memory and visits the device once per request for the prompts when block
        offload asks for it or the memory plan finds no room for it beside the largest request
        (`keeps_text_encoder_on_cpu`). `speech_folder` holds Kokoro-82M, loaded by the first request that gives
        its speech as text (so servers that never get one never load it).
        """
        self.components = components
        self.device = torch.device(device)
        self.execution = execution
        self.speech_folder = speech_folder
        self.text_encoder_on_cpu = keeps_text_encoder_on_cpu(execution.weights, execution.offload, self.device)
        if self.text_encoder_on_cpu:
            components.text_encoder.model.to("cpu")

    @classmethod
    def from_weights(cls, root: Path, device: torch.device | str = "cpu", precision: Precision | None = None,
                     loras: Sequence[Path] = (), execution: ExecutionOptions = ExecutionOptions()) -> "Pipeline":
        """Load a checkpoint folder (either published layout) and the LoRA files in `root/loras` plus `loras`,
        then prepare the transformer for `execution` (kernels, weight storage, offload, compilation)."""
        started = time.perf_counter()
        layout = find_layout(Path(root))
        on_cpu = {"transformer"} if execution.loads_on_cpu_first else set()
        if keeps_text_encoder_on_cpu(execution.weights, execution.offload, torch.device(device)):
            on_cpu.add("text_encoder")
        pipeline = cls(load_components(layout, device, precision, on_cpu), device, execution,
                       speech_folder=Path(root) / synthesis.KOKORO_DIR)
        lora_dir = Path(root) / "loras"
        files = sorted(lora_dir.glob("*.safetensors")) if lora_dir.is_dir() else []
        for path in [*files, *map(Path, loras)]:
            info = load_lora(pipeline.components.transformer, path, path.stem.replace(".", "_"))
            logger.info("lora loaded name=%s pairs=%d diffs=%d", info.name, info.pairs, info.diffs)
        prepare_transformer(pipeline.components.transformer, execution, device)
        logger.info("pipeline ready layout=%s device=%s load_s=%.1f", layout.kind, device, time.perf_counter() - started)
        return pipeline

    def warm_up(self, frame_size: tuple[int, int] = (448, 896), frames: int = 81) -> float:
        """One denoising step in each state that the server's requests put the transformer blocks in, at `frame_size`
        and a clip of `frames` video frames on random inputs, so that torch.compile compiles, and the kernels
        autotune, at start-up instead of in a request. Returns the seconds it took.

        A state is what one compiled graph cannot serve for another: the guidance passes and LoRA of each
        `acceleration` preset with the loaded LoRAs (3 passes without LoRA; 2 passes with each distilled LoRA a preset
        picks), each with two speakers and with one (their batches run different code: L-RoPE and the reference map
        only for two). That is 2 steps without LoRAs and at most 6 with FusionX and lightx2v installed, each one
        compile and one step. Frame size and clip length need no steps of their own: the transformer marks those
        sizes dynamic (`mark_grid_sizes_dynamic`), so the graphs compiled here serve every bucket and clip length.
        TeaCache needs none either: it decides whether the blocks run, not what they are given. (A 2-pass request
        without LoRA or a 3-pass one with a LoRA needs an explicit `text_scale`, which only the CLI takes: compiled
        there on first use.)
        """
        started = time.perf_counter()
        transformer = self.components.transformer
        config = transformer.config
        grid = ((frames - 1) // config.vae_scale + 1, frame_size[0] // 8, frame_size[1] // 8)
        presets = (recipe_for(acceleration, resolution, self.loras)
                   for acceleration in ACCELERATION.choices for resolution in RESOLUTION.choices)
        recipes = {(len(recipe.guidance.pass_names), recipe.lora, recipe.lora_scale): recipe for recipe in presets}
        generator = torch.Generator(self.device).manual_seed(0)
        latent = torch.randn(1, 4 + 2 * LATENT_CHANNELS, *grid, generator=generator, device=self.device)
        timestep = torch.full((1,), 999.0, device=self.device)
        for speakers in (2, 1):
            inputs = random_guidance_inputs(config, grid, speakers, generator)
            for recipe in recipes.values():
                use_lora(transformer, recipe.lora, recipe.lora_scale)
                batch_kwargs = inputs.transformer_kwargs(recipe.guidance.text_scale, transformer.dtype)
                guided_velocity(transformer, latent, timestep, batch_kwargs, GuidanceCombiner(recipe.guidance),
                                batched=not self.execution.reference_schedule)
        use_lora(transformer, None)
        seconds = time.perf_counter() - started
        logger.info("warm-up done frame_size=%dx%d states=%d seconds=%.1f", *frame_size, 2 * len(recipes), seconds)
        return seconds

    @cached_property
    def synthesizer(self) -> synthesis.SpeechSynthesizer:
        if self.speech_folder is None:
            raise FileNotFoundError("this pipeline was built without a speech model folder (Kokoro-82M)")
        return synthesis.SpeechSynthesizer(self.speech_folder, self.device)

    @property
    def loras(self) -> list[str]:
        return loaded_loras(self.components.transformer)

    def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> GenerationResult:
        """Make the video of `request` at `request.output`; raises InputError, GenerationCancelled."""
        report = progress or (lambda event: None)
        started = time.perf_counter()
        timings: dict[str, float] = {}
        request.check()
        seed = seed_or_random(request.seed)
        recipe = _recipe(request, self.loras)
        clips = plan_clips(request.num_frames)

        mark = time.perf_counter()
        if request.speech:
            report(Progress("speech", "synthesising speech"))
            speech = self.speak(request, seed, should_cancel or (lambda: False))
            timings["speech_s"] = time.perf_counter() - mark
            mark = time.perf_counter()
            report(Progress("inputs", "reading the image"))
        else:
            report(Progress("inputs", "reading image and audio"))
            speech = [load_speech(Path(path), name) for path, name in request.speaker_audio]
        reference, masks, (height, width) = self._image_and_masks(request)
        tracks = self._audio_tracks(speech, request.audio_mode, clips)
        timings["inputs_s"] = time.perf_counter() - mark

        report(Progress("encode", "encoding audio and text"))
        mark = time.perf_counter()
        c = self.components
        embeddings = speaker_embeddings(c.audio_encoder, tracks.per_speaker, clips[-1].start + clips[-1].frames)
        negative = request.negative_prompt or DEFAULT_NEGATIVE_PROMPT
        with visiting(c.text_encoder.model, self.device, self.text_encoder_on_cpu):
            context, negative_context = (t.float() for t in c.text_encoder.encode([request.prompt, negative]))
        conditioning = VideoConditioning(reference, embeddings, context, negative_context, masks)
        timings["encode_s"] = time.perf_counter() - mark

        settings = SamplingSettings(
            sampling_timesteps(recipe.steps, recipe.shift),
            recipe.guidance,
            None if recipe.teacache_threshold is None else TeaCacheConfig.for_run(
                request.resolution, recipe.teacache_threshold, recipe.steps),
            request.color_correction_strength,
            batched_guidance=not self.execution.reference_schedule,
        )
        logger.info("generate seed=%d frames=%d size=%dx%d speakers=%d clips=%d acceleration=%s %s",
                    seed, request.num_frames, width, height, len(embeddings), len(clips), request.acceleration,
                    recipe.describe())
        use_lora(c.transformer, recipe.lora, recipe.lora_scale)

        def on_step(clip: ClipPlan, step: int, steps: int) -> None:
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled at clip {clip.index + 1}/{len(clips)}, step {step}/{steps}")
            report(Progress("sampling", f"clip {clip.index + 1}/{len(clips)} step {step}/{steps}",
                            clip.index + 1, len(clips), step, steps))

        mark = time.perf_counter()
        generator = torch.Generator(self.device).manual_seed(seed)
        remaining = request.num_frames
        with Mp4Writer(request.output, width=width, height=height, num_frames=request.num_frames,
                       audio=tracks.mix) as writer:
            for out in generate_video_clips(c.transformer, c.vae, c.image_encoder, conditioning, clips, settings,
                                            generator, on_step):
                frames = frames_to_uint8(out.frames[0][:, :remaining])
                writer.write(frames)
                remaining -= frames.shape[0]
                logger.info("clip done clip=%d/%d new_frames=%d elapsed_s=%.1f", out.plan.index + 1, len(clips),
                            frames.shape[0], time.perf_counter() - mark)
            report(Progress("finishing", "writing the MP4"))
        timings["sampling_s"] = time.perf_counter() - mark
        timings["total_s"] = time.perf_counter() - started
        logger.info("video written path=%s total_s=%.1f", request.output, timings["total_s"])
        return GenerationResult(Path(request.output), seed, request.num_frames, width, height, recipe.describe(), timings)

    def _image_and_masks(self, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Reference image [1, 3, 1, H, W] in [−1, 1], person masks [3, H/8, W/8], (H, W)."""
        image = load_image(Path(request.image), "image_url")
        src_hw = (image.height, image.width)
        target_hw = request.frame_size or choose_bucket(*src_hw, request.resolution)[1]
        speakers = request.speakers
        boxes = None
        if request.speaker_boxes is not None:
            boxes = validate_boxes(request.speaker_boxes, *src_hw, speakers, "speaker_boxes")
        elif request.speaker_placement == "faces" and speakers == 2:
            boxes = detect_speaker_boxes(image, speakers)
            if boxes is None:
                logger.info("speaker detection found no face per speaker; using left/right halves")
        latent_hw = (target_hw[0] // 8, target_hw[1] // 8)
        try:
            masks = person_masks(src_hw, target_hw, latent_hw, speakers, boxes)
        except InputError:
            if request.speaker_boxes is not None:
                raise
            logger.info("detected speaker boxes fall outside the crop; using left/right halves")
            masks = person_masks(src_hw, target_hw, latent_hw, speakers, None)
        reference = pixels_to_tensor(resize_and_center_crop(image, target_hw))
        return reference, masks, target_hw

    def speak(self, request: GenerationRequest, seed: int, should_cancel: Callable[[], bool]) -> list[np.ndarray]:
        """Each speaker's text synthesised in their voice: [n] float32 tracks at 16 kHz, in speaker order.

        As in the original's TTS mode, the 24 kHz speech is resampled to 16 kHz as librosa loads it, and not
        loudness-normalised. The vocoder's noise is drawn from the request's seed. Speech that comes out longer than
        the video (the texts are within the submit-time speaking-rate limit, but voices differ in pace) is
        synthesised again faster: first by the factor that should make it fit, then at `MAX_SPEED_UP`; if even that
        is too long it is refused naming the last text, rather than cut mid-sentence.
        """
        spoken = request.spoken_texts
        video_s = request.num_frames / VIDEO_FPS
        speed = 1.0
        while True:
            tracks = []
            for text in spoken:
                if should_cancel():
                    raise GenerationCancelled("cancelled while synthesising speech")
                tracks.append(self.synthesizer.synthesize(text.text, text.voice, text.text_field, seed, speed))
            lengths = [len(track) / synthesis.SAMPLE_RATE for track in tracks]
            spoken_s = sum(lengths) if request.audio_mode == "add" else max(lengths)
            logger.info("speech synthesised speakers=%d seconds=%.2f speed=%.2f video_s=%.2f",
                        len(tracks), spoken_s, speed, video_s)
            if spoken_s <= video_s:
                break
            if speed >= MAX_SPEED_UP:
                raise InputError(spoken[-1].text_field, f"takes {spoken_s:.1f} s to say, longer than the video "
                                 f"({video_s:g} s) even spoken {MAX_SPEED_UP}× faster; shorten the text or raise "
                                 "num_frames")
            # durations are whole units per phoneme, so a speed-up shortens by steps: a margin, then the limit
            speed = min(MAX_SPEED_UP, speed * spoken_s / video_s * 1.02 if speed == 1.0 else MAX_SPEED_UP)
        return [resample(track, synthesis.SAMPLE_RATE) for track in tracks]

    def _audio_tracks(self, speech: list[np.ndarray], audio_mode: str, clips: list[ClipPlan]):
        """Speakers' 16 kHz tracks on one timeline at least as long as the generated clips (silence-padded).

        The mix (muxed into the MP4) is fitted to exactly `num_frames` by the writer; the per-speaker tracks
        cover every frame the clips generate, so no clip runs out of audio. Longer tracks stay whole: wav2vec2
        sees all of each (`speaker_embeddings`), as in the original.
        """
        tracks = combine_speakers(speech, audio_mode)
        length = (clips[-1].start + clips[-1].frames) * SAMPLES_PER_FRAME
        tracks.per_speaker = [fit_length(t, max(len(t), length)) for t in tracks.per_speaker]
        return tracks


def speaker_embeddings(encoder, tracks: Sequence, frames: int) -> list[torch.Tensor]:
    """wav2vec2 features [frames, layers, hidden] of each speaker's track, cut to the `frames` the clips use.

    The track is encoded as a whole and the features cut afterwards, as the original does: wav2vec2's layers attend
    over their whole input, so encoding only the part the video shows would change every feature (by up to 4 on
    real speech). The one limit: at most `AUDIO_CONTEXT_S` of a track (or the video's length, if longer) is read.
    Beyond it the features can differ from the original's, which reads everything: its conv front end holds
    ≈ 13 MB per second of audio in fp32, ≈ 16 GB for two 600 s uploads taking turns (`add` makes a 1200 s track).
    """
    limit = max(frames * SAMPLES_PER_FRAME, int(AUDIO_CONTEXT_S * SAMPLE_RATE))
    return [encoder.encode(track[:limit]).embedding[:frames].clone() for track in tracks]
