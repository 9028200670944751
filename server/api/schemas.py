"""The wire models of fal's ai-avatar endpoints: requests, result, and the queue's bodies.

Each endpoint's request model is generated from the request contract (`model.contract.fields`): the
fields its `Endpoint` exposes, in its order, with its defaults, so an unmodified fal client's JSON
validates here exactly as it does on fal; the extension fields (not in the hosted schema, never sent by fal clients)
say so in their description. Validation is pydantic's lax mode, the one fal's own FastAPI apps use,
so numeric strings ("181") and integral floats (181.0) are accepted as numbers; the one exception is
that JSON booleans are refused where an integer is expected (lax mode would read `true` as 1, and
`true` is no frame count).

Nothing here imports torch: the contract is torch-free, and `to_generation_options` returns the
contract's options as `model.contract.request.GenerationRequest` takes them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from model.contract.errors import InputError
from model.contract.fields import (
    AUDIO_MODE,
    AVATAR,
    AVATAR_MULTI,
    AVATAR_MULTI_TEXT,
    AVATAR_SINGLE_TEXT,
    IMAGE,
    MAX_DATA_URI_CHARS,
    MAX_URL_CHARS,
    MEDIA_KINDS,
    NUM_FRAMES,
    OPTION_FIELDS,
    SEED,
    SPEAKER_BOXES,
    VIDEO_FPS,
    Endpoint,
    RequestField,
    SpeakerInput,
)
from model.speech.text_rules import speech_length_problem

URL_SCHEMES = ("http", "https", "data")


def _no_bool(value: Any) -> Any:
    """Lax int parsing turns `true` into 1; a boolean in an integer field is a client bug, so say so."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer, not a boolean")
    return value


def _check_media_url(value: str) -> str:
    """Only the form is checked here (scheme, host, size); fetching and sniffing happen at submit."""
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
    elif len(value) > MAX_URL_CHARS:
        raise PydanticCustomError(
            "url_too_long", "URL is {size} characters long; at most {max_size} are accepted",
            {"size": len(value), "max_size": MAX_URL_CHARS},
        )
    return value


MediaUrl = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_media_url)]


def _plain_text(spec: RequestField) -> AfterValidator:
    """The contract's own check of a text (control characters; for a text to speak, what the voices can read), so
    HTTP and the CLI refuse the same texts."""

    def check(value: str) -> str:
        try:
            spec.check(value)
        except InputError as error:
            raise PydanticCustomError(error.kind, "{reason}", {"reason": error.reason}) from None
        return value

    return AfterValidator(check)
Pixel = Annotated[int, Field(ge=0), BeforeValidator(_no_bool)]


def _check_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x_min, y_min, x_max, y_max = box
    if not (x_min < x_max and y_min < y_max):
        raise PydanticCustomError(
            "box_empty", "box {box} is empty: it needs x_min < x_max and y_min < y_max", {"box": list(box)}
        )
    return box


Box = Annotated[tuple[Pixel, Pixel, Pixel, Pixel], AfterValidator(_check_box)]


def _bounds(spec: RequestField) -> dict[str, float]:
    return {key: value for key, value in (("ge", spec.minimum), ("le", spec.maximum)) if value is not None}


def _annotation(spec: RequestField) -> Any:
    """The pydantic type of a contract field on the wire. Bounds go before the bool check so the JSON schema
    shows them as minimum/maximum."""
    if spec.kind == "int":
        annotation: Any = Annotated[int, Field(**_bounds(spec)), BeforeValidator(_no_bool)]
    elif spec.kind == "float":
        annotation = Annotated[float, Field(**_bounds(spec))]
    elif spec.kind == "choice":
        annotation = Literal[spec.choices]
    elif spec.kind in ("text", "speech"):
        annotation = Annotated[str, StringConstraints(max_length=spec.max_length), _plain_text(spec)]
    elif spec.kind in MEDIA_KINDS:
        # `_check_media_url` enforces the length (a data URI's error says to upload instead), the schema shows it
        annotation = Annotated[MediaUrl, Field(json_schema_extra={"maxLength": spec.max_length})]
    else:
        annotation = {"bool": bool, "boxes": list[Box]}[spec.kind]
    return annotation | None if spec.default is None and not spec.required else annotation


def _description(spec: RequestField, endpoint: Endpoint) -> str:
    text = spec.help
    if spec.kind in MEDIA_KINDS:
        text += " http(s) URL, data URI, or a file uploaded to this server."
    if spec is SEED:
        text = f"Random seed. Absent: {endpoint.default(spec)}. Explicit null: a random seed is drawn and returned " \
               "in the result."
    return text if spec.hosted else f"Extension. {text}"


def _field_error(model: type[BaseModel], name: str, value: Any, error: PydanticCustomError) -> ValidationError:
    """A validation error of the whole model that names one field, for rules that read several fields."""
    details = InitErrorDetails(type=error, loc=(name,), input=value)
    return ValidationError.from_exception_data(model.__name__, [details])


class EndpointInput(BaseModel):
    """What every endpoint's input model shares: unknown fields ignored (as fal), one box per speaker, texts that fit
    the video. `endpoint` is the contract's `Endpoint` the model was made from."""

    model_config = ConfigDict(extra="ignore")
    endpoint: ClassVar[Endpoint]

    @model_validator(mode="after")
    def _one_box_per_speaker(self) -> EndpointInput:
        """Checked on the model because the count depends on other fields; the error still names `speaker_boxes`."""
        boxes = getattr(self, SPEAKER_BOXES.name, None)
        if boxes is not None and len(boxes) != self.speakers:
            raise _field_error(type(self), SPEAKER_BOXES.name, boxes, PydanticCustomError(
                "box_count", "needs one box per speaker: {expected} expected, {given} given",
                {"expected": self.speakers, "given": len(boxes)}))
        return self

    @model_validator(mode="after")
    def _texts_fit_the_video(self) -> EndpointInput:
        """The texts to speak, in turn, within the speaking-rate limit of `num_frames` (the worker's own rule)."""
        texts = [(speaker.text.name, getattr(self, speaker.text.name)) for speaker in self.speakers_used
                 if speaker.text is not None]
        too_long = speech_length_problem(texts, getattr(self, NUM_FRAMES.name), VIDEO_FPS,
                                         in_turn=getattr(self, AUDIO_MODE.name, "add") == "add")
        if too_long is not None:
            name, reason = too_long
            raise _field_error(type(self), name, getattr(self, name),
                               PydanticCustomError("text_too_long", "{reason}", {"reason": reason}))
        return self

    @property
    def speakers_used(self) -> tuple[SpeakerInput, ...]:
        return self.endpoint.speakers_used(self.__dict__)

    @property
    def speakers(self) -> int:
        return len(self.speakers_used)


def endpoint_input_model(endpoint: Endpoint, name: str) -> type[EndpointInput]:
    """The pydantic input model of `endpoint`, field for field from the request contract."""
    definitions: dict[str, Any] = {}
    for spec in endpoint.fields:
        extra = {"examples": [spec.example]} if spec.example is not None else {}
        default = ... if spec.required else endpoint.default(spec)
        definitions[spec.name] = (_annotation(spec), Field(default, description=_description(spec, endpoint), **extra))
    example = {spec.name: spec.example if spec.example is not None else endpoint.default(spec)
               for spec in endpoint.fields if spec.hosted}
    model = create_model(name, __base__=EndpointInput, __doc__=f"Input of `{endpoint.app_id}`: {endpoint.title}.",
                         __module__=__name__, **definitions)
    model.endpoint = endpoint
    model.model_config["json_schema_extra"] = {"examples": [example]}
    return model


AvatarInput = endpoint_input_model(AVATAR, "AvatarInput")
AvatarSingleTextInput = endpoint_input_model(AVATAR_SINGLE_TEXT, "AvatarSingleTextInput")
AvatarMultiInput = endpoint_input_model(AVATAR_MULTI, "AvatarMultiInput")
AvatarMultiTextInput = endpoint_input_model(AVATAR_MULTI_TEXT, "AvatarMultiTextInput")
INPUT_MODELS: tuple[type[EndpointInput], ...] = (AvatarInput, AvatarSingleTextInput, AvatarMultiInput,
                                                 AvatarMultiTextInput)


def media_inputs(inp: EndpointInput) -> dict[str, str]:
    """The media fields the request uses, by contract name: the image, and the audio of the speakers animated (a
    second audio that is switched off is left out)."""
    used = [IMAGE.name, *(speaker.audio.name for speaker in inp.speakers_used if speaker.audio is not None)]
    return {name: getattr(inp, name) for name in used}


def spoken_texts(inp: EndpointInput) -> list[dict[str, str]]:
    """The texts the request has spoken, in speaker order, as `model.contract.request.SpokenText`'s fields."""
    return [{"text": getattr(inp, speaker.text.name), "voice": getattr(inp, speaker.voice.name),
             "text_field": speaker.text.name, "voice_field": speaker.voice.name}
            for speaker in inp.speakers_used if speaker.text is not None and speaker.voice is not None]


def to_generation_options(inp: EndpointInput, seed: int) -> dict[str, Any]:
    """The contract's options of `inp` (everything but the media and texts), as `GenerationRequest` takes them.

    `seed` is the one the job actually uses (`inp.seed`, or the draw made when it was null), so the
    job can record it before the run and return it in the result.
    """
    options = {spec.name: getattr(inp, spec.name) for spec in OPTION_FIELDS if spec.name in type(inp).model_fields}
    return {**options, SEED.name: seed}


class File(BaseModel):
    """fal's File (§A.10): what the clients read as the video."""

    url: str = Field(description="Where to download the file.")
    content_type: str | None = Field(None, description="MIME type.", examples=["video/mp4"])
    file_name: str | None = Field(None, description="Suggested file name.")
    file_size: int | None = Field(None, description="Size in bytes.")


class AvatarOutput(BaseModel):
    """Output of every ai-avatar endpoint."""

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
