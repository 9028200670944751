"""The seam between the server (or the CLI) and the model: what goes into `Pipeline.generate` and what comes out.

Torch-free, so the server builds requests without importing the model. A `GenerationRequest` holds
the inputs as local files (the worker reads them from the file store, the CLI from the command
line), or, for the text endpoints, each person's text and voice (`SpokenText`, synthesised by the
pipeline), plus the options of the request contract (`model.contract.fields`), whose defaults, limits
and choices it takes from there; `check()` applies them, naming the field of anything unusable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from model.contract.errors import InputError
from model.contract.fields import (
    ACCELERATION,
    AUDIO_FIELDS,
    AUDIO_MODE,
    AUDIO_SCALE,
    COLOR_CORRECTION,
    FIELDS,
    FIRST_AUDIO,
    FRAME_SIZE,
    NEGATIVE_PROMPT,
    NUM_FRAMES,
    OPTION_FIELDS,
    PROMPT,
    RESOLUTION,
    SECOND_AUDIO,
    SEED,
    SHIFT,
    SPEAKER_BOXES,
    SPEAKER_PLACEMENT,
    STEPS,
    TEACACHE_THRESHOLD,
    TEXT_SCALE,
    USE_APG,
    USE_ONLY_FIRST_AUDIO,
    VIDEO_FPS,
    speaker_count,
)
from model.speech.text_rules import speech_length_problem

Box = tuple[int, int, int, int]  # (x_min, y_min, x_max, y_max) in source-image pixels


@dataclass(frozen=True)
class SpokenText:
    """One person's speech given as text: synthesised in `voice` before the video is made.

    `text_field` and `voice_field` are the request fields they came from (`text_input`/`voice`,
    `first_text_input`/`voice1`, ...), named in any error about them.
    """

    text: str
    voice: str  # a hosted voice name or a Kokoro voice id (`model.speech.voices`)
    text_field: str
    voice_field: str


@dataclass
class GenerationRequest:
    """One video: local input files (or texts to speak), the output path, and the contract's options (names as
    the hosted API's)."""

    image: Path  # image_url
    audio: Sequence[Path]  # person 1 (left), person 2 (right); empty when `speech` gives what they say as text
    output: Path
    prompt: str = PROMPT.default
    num_frames: int = NUM_FRAMES.default
    resolution: str = RESOLUTION.default
    seed: int | None = SEED.default
    acceleration: str = ACCELERATION.default
    use_only_first_audio: bool = USE_ONLY_FIRST_AUDIO.default
    audio_mode: str = AUDIO_MODE.default
    speaker_boxes: Sequence[Box] | None = SPEAKER_BOXES.default
    speaker_placement: str = SPEAKER_PLACEMENT.default
    negative_prompt: str | None = NEGATIVE_PROMPT.default
    steps: int | None = STEPS.default
    shift: float | None = SHIFT.default
    text_scale: float | None = TEXT_SCALE.default
    audio_scale: float | None = AUDIO_SCALE.default
    use_apg: bool = USE_APG.default
    teacache_threshold: float | None = TEACACHE_THRESHOLD.default
    color_correction_strength: float = COLOR_CORRECTION.default
    frame_size: tuple[int, int] | None = FRAME_SIZE.default
    speech: Sequence[SpokenText] = ()  # the text endpoints: person 1's, then person 2's text and voice
    audio_fields: Sequence[str] = (FIRST_AUDIO.name, SECOND_AUDIO.name)  # the request field of each audio file

    @classmethod
    def from_inputs(cls, files: Mapping[str, Path], output: Path, options: Mapping[str, Any],
                    speech: Sequence[SpokenText | Mapping[str, str]] = ()) -> GenerationRequest:
        """From the contract's media field names (`image_url`, `first_audio_url`, ...) mapped to local files, and
        the texts to speak (as `SpokenText`s or their fields)."""
        audio_fields = tuple(name for name in AUDIO_FIELDS if files.get(name) is not None)
        spoken = tuple(s if isinstance(s, SpokenText) else SpokenText(**s) for s in speech)
        return cls(image=Path(files["image_url"]), audio=[Path(files[name]) for name in audio_fields],
                   output=Path(output), speech=spoken, audio_fields=audio_fields, **options)

    @property
    def speakers(self) -> int:
        return speaker_count(len(self.audio) + len(self.speech) > 1, self.use_only_first_audio)

    @property
    def speaker_audio(self) -> list[tuple[Path, str]]:
        """The audio files that are used, in speaker order, with the request field each came from."""
        return list(zip(self.audio, self.audio_fields))[: self.speakers]

    @property
    def spoken_texts(self) -> list[SpokenText]:
        """The texts that are spoken, in speaker order."""
        return list(self.speech[: self.speakers])

    def check(self) -> None:
        """Raise InputError naming the first field whose value the contract does not accept."""
        for option in OPTION_FIELDS:
            option.check(getattr(self, option.name))
        if self.audio and self.speech:
            raise InputError(self.speech[0].text_field, "give each person's speech as audio or as text, not both")
        speakers = len(self.audio) or len(self.speech)
        if not 1 <= speakers <= 2:
            field = self.audio_fields[-1] if self.audio else self.speech[-1].text_field if self.speech else \
                FIRST_AUDIO.name
            raise InputError(field, f"one or two people's speech (audio or text) is needed, got {speakers}")
        for spoken in self.speech:
            FIELDS[spoken.text_field].check(spoken.text)
            FIELDS[spoken.voice_field].check(spoken.voice)
        too_long = speech_length_problem([(s.text_field, s.text) for s in self.spoken_texts], self.num_frames,
                                         VIDEO_FPS, in_turn=self.audio_mode == "add")
        if too_long is not None:
            raise InputError(*too_long)


OPTION_NAMES = frozenset(f.name for f in fields(GenerationRequest)) - {"image", "audio", "output", "speech",
                                                                       "audio_fields"}
assert OPTION_NAMES == {f.name for f in OPTION_FIELDS}, "GenerationRequest must take exactly the contract's options"


@dataclass
class Progress:
    stage: str  # "speech", "inputs", "encode", "sampling", "finishing"
    message: str
    clip: int = 0  # 1-based while sampling
    clips: int = 0
    step: int = 0
    steps: int = 0


ProgressCallback = Callable[[Progress], None]


@dataclass
class GenerationResult:
    video: Path
    seed: int
    num_frames: int
    width: int
    height: int
    settings: str
    timings: dict[str, float] = field(default_factory=dict)
