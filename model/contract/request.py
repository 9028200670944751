"""The seam between the server (or the CLI) and the model: what goes into `Pipeline.generate` and what comes out.

Torch-free, so the server builds requests without importing the model. A `GenerationRequest` holds
the inputs as local files (the worker reads them from the file store, the CLI from the command
line) plus the options of the request contract (`model.contract.fields`), whose defaults, limits
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
    FRAME_SIZE,
    NEGATIVE_PROMPT,
    NUM_FRAMES,
    OPTION_FIELDS,
    PROMPT,
    RESOLUTION,
    SEED,
    SHIFT,
    SPEAKER_BOXES,
    SPEAKER_PLACEMENT,
    STEPS,
    TEACACHE_THRESHOLD,
    TEXT_SCALE,
    USE_APG,
    USE_ONLY_FIRST_AUDIO,
    speaker_count,
)

Box = tuple[int, int, int, int]  # (x_min, y_min, x_max, y_max) in source-image pixels


@dataclass
class GenerationRequest:
    """One video: local input files, the output path, and the contract's options (names as the hosted API's)."""

    image: Path  # image_url
    audio: Sequence[Path]  # first_audio_url[, second_audio_url]: person 1 (left), person 2 (right)
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

    @classmethod
    def from_inputs(cls, files: Mapping[str, Path], output: Path, options: Mapping[str, Any]) -> GenerationRequest:
        """From the contract's media field names (`image_url`, `first_audio_url`, ...) mapped to local files."""
        audio = [Path(files[name]) for name in AUDIO_FIELDS if files.get(name) is not None]
        return cls(image=Path(files["image_url"]), audio=audio, output=Path(output), **options)

    @property
    def speakers(self) -> int:
        return speaker_count(len(self.audio) > 1, self.use_only_first_audio)

    @property
    def speaker_audio(self) -> list[tuple[Path, str]]:
        """The audio files that are used, in speaker order, with the request field each came from."""
        return list(zip(self.audio, AUDIO_FIELDS))[: self.speakers]

    def check(self) -> None:
        """Raise InputError naming the first field whose value the contract does not accept."""
        for option in OPTION_FIELDS:
            option.check(getattr(self, option.name))
        if not 1 <= len(self.audio) <= len(AUDIO_FIELDS):
            raise InputError(AUDIO_FIELDS[-1], f"one or two audio tracks are supported, got {len(self.audio)}")


OPTION_NAMES = frozenset(f.name for f in fields(GenerationRequest)) - {"image", "audio", "output"}
assert OPTION_NAMES == {f.name for f in OPTION_FIELDS}, "GenerationRequest must take exactly the contract's options"


@dataclass
class Progress:
    stage: str  # "inputs", "encode", "sampling", "finishing"
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
