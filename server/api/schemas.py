"""The wire models of `fal-ai/ai-avatar/multi`: request, result, and the queue's bodies.

The request model is the hosted schema field for field (PEERS_AND_PROTOCOL.md §A.11), so an
unmodified fal client's JSON validates here exactly as it does on fal; a few optional extension
fields follow it (the hosted schema has no counterpart for them, fal clients never send them).
Validation is pydantic's lax mode, the one fal's own FastAPI apps use, so numeric strings ("181")
and integral floats (181.0) are accepted as numbers; the one exception is that JSON booleans are
refused where an integer is expected (lax mode would read `true` as 1, and `true` is no frame count).

Nothing here imports torch: the limits and choices come from the torch-free
`model.contract.fields`, and `to_generation_options` returns a plain dict for
`model.pipeline.GenerationRequest`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from model.contract.fields import ACCELERATIONS, AUDIO_MODES, MAX_SEED, NUM_FRAMES_RANGE, RESOLUTIONS

DEFAULT_SEED = 81  # the hosted schema's default when `seed` is absent
URL_SCHEMES = ("http", "https", "data")
MAX_DATA_URI_CHARS = 8 * 1024 * 1024  # inline media beyond this belongs behind a URL or an upload


def _no_bool(value: Any) -> Any:
    """Lax int parsing turns `true` into 1; a boolean in an integer field is a client bug, so say so."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer, not a boolean")
    return value


# Bounds go before the validator so the JSON schema shows them as minimum/maximum.
NumFrames = Annotated[int, Field(ge=NUM_FRAMES_RANGE[0], le=NUM_FRAMES_RANGE[1]), BeforeValidator(_no_bool)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_no_bool)]
Pixel = Annotated[int, Field(ge=0), BeforeValidator(_no_bool)]


def _check_media_url(value: str) -> str:
    """Only the form is checked here (scheme, host, size); fetching and sniffing happen when the job runs."""
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise PydanticCustomError("url_scheme", "should be an http://, https:// or data: URL")
    if scheme == "data":
        if "," not in value:
            raise PydanticCustomError("url_parsing", "data URI has no ',' before its data")
        if len(value) > MAX_DATA_URI_CHARS:
            raise PydanticCustomError(
                "data_uri_too_large",
                "data URI is {size} characters long; at most {max_size} are accepted, upload larger files",
                {"size": len(value), "max_size": MAX_DATA_URI_CHARS},
            )
    elif not parts.netloc:
        raise PydanticCustomError("url_parsing", "URL has no host")
    return value


MediaUrl = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_media_url)]


def _check_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x_min, y_min, x_max, y_max = box
    if not (x_min < x_max and y_min < y_max):
        raise PydanticCustomError(
            "box_empty", "box {box} is empty: it needs x_min < x_max and y_min < y_max", {"box": list(box)}
        )
    return box


Box = Annotated[tuple[Pixel, Pixel, Pixel, Pixel], AfterValidator(_check_box)]

_EXAMPLE_INPUT = {
    "image_url": "https://example.com/two_people.png",
    "first_audio_url": "https://example.com/left_speaker.wav",
    "second_audio_url": "https://example.com/right_speaker.wav",
    "prompt": "Two friends chat at a kitchen table, natural light, they take turns speaking.",
    "num_frames": 181,
    "resolution": "480p",
    "seed": 81,
    "acceleration": "regular",
}


class AvatarMultiInput(BaseModel):
    """Input of `fal-ai/ai-avatar/multi`: one image with one or two people, their speech, a prompt."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [_EXAMPLE_INPUT]})

    image_url: MediaUrl = Field(
        description="The image with the people who speak; resized and centre-cropped to the resolution's aspect. "
        "http(s) URL or data URI.",
        examples=[_EXAMPLE_INPUT["image_url"]],
    )
    first_audio_url: MediaUrl = Field(
        description="Speech of person 1 (the left person, or the only one). http(s) URL or data URI.",
        examples=[_EXAMPLE_INPUT["first_audio_url"]],
    )
    second_audio_url: MediaUrl | None = Field(
        None,
        description="Speech of person 2 (the right person). By default person 2 speaks after person 1.",
        examples=[_EXAMPLE_INPUT["second_audio_url"]],
    )
    prompt: str = Field(description="What the video shows.", examples=[_EXAMPLE_INPUT["prompt"]])
    num_frames: NumFrames = Field(181, description="Frames to generate at 25 fps (181 ≈ 7.2 s).", examples=[181])
    resolution: Literal[RESOLUTIONS] = Field("480p", description="Output resolution.")
    seed: Seed | None = Field(
        DEFAULT_SEED,
        description="Random seed. Absent: 81. Explicit null: a random seed is drawn and returned in the result.",
        examples=[81],
    )
    use_only_first_audio: bool = Field(False, description="Animate only person 1, ignoring `second_audio_url`.")
    acceleration: Literal[ACCELERATIONS] = Field(
        "regular", description="Speed preset: none (most steps), regular, high (fewest steps)."
    )

    # Extensions beyond the hosted schema (fal clients never send them; the defaults are fal's behaviour).
    audio_mode: Literal[AUDIO_MODES] = Field(
        "add", description="Extension. add: the speakers take turns (person 1, then person 2); para: both tracks "
        "play at the same time."
    )
    speaker_boxes: list[Box] | None = Field(
        None,
        description="Extension. Where each speaker is: [x_min, y_min, x_max, y_max] in image pixels, one box per "
        "speaker in audio order (2 with a second audio, else 1). Takes precedence over `speaker_placement`.",
        examples=[[[0, 40, 400, 720], [420, 40, 820, 720]]],
    )
    speaker_placement: Literal["halves", "faces"] = Field(
        "halves", description="Extension. Without boxes: halves = person 1 left, person 2 right; faces = from "
        "detected faces (falls back to halves)."
    )
    negative_prompt: str | None = Field(
        None, description="Extension. What the video should not show; null: the model's default."
    )

    @model_validator(mode="after")
    def _one_box_per_speaker(self) -> AvatarMultiInput:
        """Checked on the model because the count depends on two other fields; the error still names `speaker_boxes`."""
        if self.speaker_boxes is not None and len(self.speaker_boxes) != self.speakers:
            error = InitErrorDetails(
                type=PydanticCustomError(
                    "box_count", "needs one box per speaker: {expected} expected, {given} given",
                    {"expected": self.speakers, "given": len(self.speaker_boxes)},
                ),
                loc=("speaker_boxes",),
                input=self.speaker_boxes,
            )
            raise ValidationError.from_exception_data(type(self).__name__, [error])
        return self

    @property
    def speakers(self) -> int:
        """How many people speak: 2 with a second audio track that is not switched off, else 1."""
        return 2 if self.second_audio_url is not None and not self.use_only_first_audio else 1


def to_generation_options(inp: AvatarMultiInput, seed: int) -> dict[str, Any]:
    """Keyword arguments of `model.pipeline.GenerationRequest` other than the local image/audio/output paths.

    `seed` is the one the job actually uses (`inp.seed`, or the draw made when it was null), so the
    job can record it before the run and return it in the result.
    """
    return {
        "prompt": inp.prompt,
        "num_frames": inp.num_frames,
        "resolution": inp.resolution,
        "seed": seed,
        "acceleration": inp.acceleration,
        "use_only_first_audio": inp.use_only_first_audio,
        "audio_mode": inp.audio_mode,
        "speaker_boxes": inp.speaker_boxes,
        "detect_speakers": inp.speaker_placement == "faces",
        "negative_prompt": inp.negative_prompt,
    }


class File(BaseModel):
    """fal's File (§A.10): what the clients read as the video."""

    url: str = Field(description="Where to download the file.")
    content_type: str | None = Field(None, description="MIME type.", examples=["video/mp4"])
    file_name: str | None = Field(None, description="Suggested file name.")
    file_size: int | None = Field(None, description="Size in bytes.")


class AvatarMultiOutput(BaseModel):
    """Output of `fal-ai/ai-avatar/multi`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "video": {"url": "https://example.com/files/3f2c.mp4", "content_type": "video/mp4",
                  "file_name": "3f2c.mp4", "file_size": 1843211},
        "seed": 81,
    }]})

    video: File = Field(description="The MP4 (H.264 + AAC, 25 fps) with the speech muxed in.")
    seed: int = Field(description="The seed used; pass it back to reproduce the video.")


class QueueUrls(BaseModel):
    """Where a queued request is followed; the Python client follows these URLs verbatim (§A.4, §B.1)."""

    request_id: str
    response_url: str = Field(description="GET: the result once COMPLETED.")
    status_url: str = Field(description="GET: the status; `?logs=1` adds logs.")
    cancel_url: str = Field(description="PUT: cancel the request.")


class QueueSubmitResponse(QueueUrls):
    """Body of a queue submit (§A.4)."""

    status: Literal["IN_QUEUE"] = "IN_QUEUE"
    queue_position: int = Field(description="Requests ahead of this one (0-based).")


class LogEntry(BaseModel):
    """One line of a request's logs (§A.5)."""

    message: str
    level: Literal["STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"] = "INFO"
    source: str = "USER"
    timestamp: datetime = Field(description="ISO-8601.")


def _absent_when_none(value: Any) -> bool:
    return value is None


class QueueStatusResponse(QueueUrls):
    """Body of a status poll (§A.5). A failed or cancelled request is COMPLETED with `error`.

    `queue_position` and `logs` are always sent (null when they do not apply): the Python client
    indexes them and crashes on a missing key. `metrics` is sent only when COMPLETED, `error` and
    `error_type` only for a failure; they are left out otherwise, as fal does.
    """

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    queue_position: int | None = Field(None, description="Requests ahead of this one while IN_QUEUE, else null.")
    logs: list[LogEntry] | None = Field(None, description="Logs when asked for with `?logs=1`, else null.")
    metrics: dict[str, float] | None = Field(
        None, exclude_if=_absent_when_none, description="COMPLETED only, e.g. {\"inference_time\": 12.3}."
    )
    error: str | None = Field(
        None, exclude_if=_absent_when_none, description="COMPLETED with a failure: what went wrong."
    )
    error_type: str | None = Field(
        None, exclude_if=_absent_when_none, description="COMPLETED with a failure: its category."
    )

    @model_validator(mode="after")
    def _fields_match_status(self) -> QueueStatusResponse:
        if self.status == "IN_QUEUE" and self.queue_position is None:
            raise ValueError("an IN_QUEUE status needs its queue_position")
        if self.status != "COMPLETED" and (self.metrics, self.error, self.error_type) != (None, None, None):
            raise ValueError("metrics, error and error_type belong to a COMPLETED status")
        return self


class CancelResponse(BaseModel):
    """Body of a cancel (§A.7)."""

    status: Literal["OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]
