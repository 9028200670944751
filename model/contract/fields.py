"""The request contract: every field of a generation request, declared once, torch-free.

Each `RequestField` holds a field's name (as the hosted API spells it), type, default, limits,
choices and help. Everything else derives from this table, so the surfaces cannot disagree:

* `model.contract.request.GenerationRequest` takes the fields as its options, and its `check()`
  (which the pipeline runs) applies their limits and choices, raising `InputError(field, reason)`;
* the HTTP schemas (`server.api.schemas`) are built from the fields an `Endpoint` exposes, with the
  endpoint's own defaults (the hosted `seed` default is 81, the CLI's is a random seed);
* the `multitalk generate` flags (`server.cli.generate`) and the serve/worker settings that force a
  field on every job (`--steps`, `--frame-size`) parse with the fields' own parsers;
* the playground reads the limits from the OpenAPI schema the server publishes.

A new extension field or a new endpoint is one entry here, not one per surface. The four endpoints of
fal's ai-avatar family differ only in where each person's speech comes from (an audio field, or a text
read in a voice: `SpeakerInput`) and in their defaults.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from model.contract.errors import InputError
from model.speech.text_rules import max_speech_chars, speech_text_problem
from model.speech.voices import VOICE_CHOICES

# "speech": a text that is spoken (synthesised), with the rules of `model.speech.text_rules` on top of a text's.
Kind = Literal["int", "float", "bool", "text", "speech", "choice", "boxes", "frame_size", "image", "audio"]
MEDIA_KINDS = ("image", "audio")
MAX_SEED = 2**32 - 1  # the hosted API accepts 0..4294967295
VIDEO_FPS = 25  # MultiTalk's training frame rate: every video is made, and every num_frames counted, at 25 fps
FRAME_SIZE_MULTIPLE = 16  # the VAE's 8× and the patch's 2× downsampling
# umT5 reads at most 512 tokens of a prompt and drops the rest; a token is ~4 characters of English and
# about one of CJK, so 4000 characters is more than the model ever sees in any language. Longer text only
# costs memory, job-store space and slower status polls (issue 15: a 10 MB prompt).
MAX_PROMPT_CHARS = 4000
# Inline media (what `fal_client.encode_file` sends): 8 Mi characters of base64 is a 6 MiB file, and all
# three media fields at this size fit the default 32 MiB request body; larger files belong behind a URL
# or an upload.
MAX_DATA_URI_CHARS = 8 * 1024 * 1024
# http(s) URLs: common web servers and object stores refuse request lines above 8 KiB, so a longer URL
# could not be fetched anyway; signed cloud-storage URLs are 1-3 KiB.
MAX_URL_CHARS = 8192
# C0 controls but tab, LF and CR, DEL, and C1 controls: nothing a prompt means, often a client bug (NUL).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class RequestField:
    """One request field. `default` None with `required` False means "absent" (the model decides).

    `hosted`: part of fal's schema (False: an extension of ours). `http`: accepted over HTTP (False:
    a CLI and server-setting override only). `flag`: the CLI flag when it is not `--name-with-dashes`.
    `max_length`: the most characters a text or URL may have; every string field has one, because an
    unbounded string is held by the API, the job store and the worker alike.
    """

    name: str
    kind: Kind
    help: str
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int | None = None
    hosted: bool = True
    http: bool = True
    flag: str | None = None
    example: Any = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def limits(self) -> str:
        """The limits in words, for help texts and errors: "from 41 to 241", "one of 480p, 720p"."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.minimum is not None and self.maximum is not None:
            return f"from {_number(self.minimum)} to {_number(self.maximum)}"
        if self.minimum is not None:
            return f"of at least {_number(self.minimum)}"
        return f"of at most {_number(self.maximum)}" if self.maximum is not None else ""

    def check(self, value: Any) -> None:
        """Raise InputError naming this field if `value` breaks its type, limits or choices (None is absent)."""
        if value is None:
            if self.required:
                raise InputError(self.name, "is required")
            return
        numeric = {"int": (int, "an integer"), "float": ((int, float), "a number")}.get(self.kind)
        if numeric is not None:
            types, noun = numeric
            if not isinstance(value, types) or isinstance(value, bool) or not _within(value, self.minimum, self.maximum):
                raise InputError(self.name, f"must be {noun} {self.limits}".rstrip() + f", got {value!r}")
        if self.kind == "bool" and not isinstance(value, bool):
            raise InputError(self.name, f"must be true or false, got {value!r}")
        texts = ("text", "speech")
        if self.kind in texts and not isinstance(value, str):
            raise InputError(self.name, f"must be text, got {type(value).__name__}")
        if self.max_length is not None and isinstance(value, str) and len(value) > self.max_length:
            raise InputError(self.name, f"must be at most {self.max_length} characters long, got {len(value)}")
        if self.kind in texts and (control := _CONTROL_CHARACTERS.search(value)):
            raise InputError(self.name, f"must not contain control characters (tab and line breaks are fine), "
                                        f"got {control.group()!r} at position {control.start()}", "control_character")
        if self.kind == "speech" and (problem := speech_text_problem(value)):
            raise InputError(self.name, problem, "text_unspeakable")
        if self.choices and value not in self.choices:
            raise InputError(self.name, f"must be {self.limits}, got {value!r}")
        if self.kind == "frame_size" and (len(value) != 2 or any(
                not isinstance(s, int) or s <= 0 or s % FRAME_SIZE_MULTIPLE for s in value)):
            raise InputError(self.name, f"height and width must be positive multiples of {FRAME_SIZE_MULTIPLE}, "
                                        f"got {value}")

    def parse(self, text: str) -> Any:
        """A value from command-line or environment text; ValueError with the reason if it is not one."""
        if self.kind == "int":
            return int(text)
        if self.kind == "float":
            return float(text)
        if self.kind == "frame_size":
            try:
                height, width = (int(v) for v in text.lower().split("x"))
            except ValueError:
                raise ValueError(f"expected HEIGHTxWIDTH, e.g. 448x896, got {text!r}") from None
            return height, width
        if self.kind == "boxes":  # one box per call: x_min,y_min,x_max,y_max
            try:
                box = tuple(int(v) for v in text.split(","))
            except ValueError:
                raise ValueError(f"expected x_min,y_min,x_max,y_max in pixels, got {text!r}") from None
            if len(box) != 4:
                raise ValueError(f"expected 4 numbers x_min,y_min,x_max,y_max, got {text!r}")
            return box
        return text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _within(value: float, minimum: float | None, maximum: float | None) -> bool:
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


# -- the fields ---------------------------------------------------------------------------------

IMAGE = RequestField("image_url", "image", "The image with the people who speak; resized and centre-cropped to the "
                     "resolution's aspect.", required=True, max_length=MAX_DATA_URI_CHARS, flag="--image",
                     example="https://example.com/two_people.png")
AUDIO = RequestField("audio_url", "audio", "Speech of the person in the image; any common audio format, or a "
                     "video's sound.", required=True, max_length=MAX_DATA_URI_CHARS,
                     example="https://example.com/speaker.wav")
FIRST_AUDIO = RequestField("first_audio_url", "audio", "Speech of person 1 (the left person, or the only one); any "
                           "common audio format, or a video's sound.", required=True,
                           max_length=MAX_DATA_URI_CHARS, flag="--audio",
                           example="https://example.com/left_speaker.wav")
SECOND_AUDIO = RequestField("second_audio_url", "audio", "Speech of person 2 (the right person). By default person 2 "
                            "speaks after person 1.", max_length=MAX_DATA_URI_CHARS, flag="--audio2",
                            example="https://example.com/right_speaker.wav")
PROMPT = RequestField("prompt", "text", "What the video shows.", required=True, max_length=MAX_PROMPT_CHARS,
                      example="Two friends chat at a kitchen table, natural light, they take turns speaking.")
NUM_FRAMES = RequestField("num_frames", "int", f"Frames to generate at {VIDEO_FPS} fps (181 ≈ 7.2 s).", default=181,
                          minimum=41, maximum=241, example=181)
# The longest text any video can hold; the limit of a request is its num_frames' (`text_rules.speech_length_problem`).
MAX_SPEECH_CHARS = max_speech_chars(int(NUM_FRAMES.maximum), VIDEO_FPS)
_VOICE_HELP = ("one of the 20 hosted voice names, spoken by the local Kokoro-82M voice of the same gender and nearest "
               "accent, or a Kokoro voice id such as af_heart")
TEXT_INPUT = RequestField("text_input", "speech", "What the person says, in English; synthesised in `voice` on this "
                          "server.", required=True, max_length=MAX_SPEECH_CHARS,
                          example="Spend more time with people who make you feel alive.")
VOICE = RequestField("voice", "choice", f"The voice that speaks `text_input`: {_VOICE_HELP}.", required=True,
                     choices=VOICE_CHOICES, example="Bill")
FIRST_TEXT = RequestField("first_text_input", "speech", "What person 1 (the left person) says, in English, in "
                          "`voice1`; spoken first.", required=True, max_length=MAX_SPEECH_CHARS, flag="--text",
                          example="Do you know what we are eating?")
SECOND_TEXT = RequestField("second_text_input", "speech", "What person 2 (the right person) says, in English, in "
                           "`voice2`; spoken after person 1.", required=True, max_length=MAX_SPEECH_CHARS,
                           flag="--text2", example="I think it is something called milky pie.")
VOICE1 = RequestField("voice1", "choice", f"The voice of person 1: {_VOICE_HELP}.", default="Sarah",
                      choices=VOICE_CHOICES, flag="--voice")
VOICE2 = RequestField("voice2", "choice", f"The voice of person 2: {_VOICE_HELP}.", default="Roger",
                      choices=VOICE_CHOICES, flag="--voice2")
RESOLUTION = RequestField("resolution", "choice", "Output resolution.", default="480p", choices=("480p", "720p"))
SEED = RequestField("seed", "int", "Random seed; absent: a random seed, returned with the result.",
                    minimum=0, maximum=MAX_SEED, example=81)
USE_ONLY_FIRST_AUDIO = RequestField("use_only_first_audio", "bool", "Animate only person 1, ignoring "
                                    "`second_audio_url`.", default=False)
ACCELERATION = RequestField("acceleration", "choice", "Speed preset: none (most steps), regular, high (fewest "
                            "steps).", default="regular", choices=("none", "regular", "high"))
AUDIO_MODE = RequestField("audio_mode", "choice", "add: the speakers take turns (person 1, then person 2); para: "
                          "both tracks play at the same time.", default="add", choices=("add", "para"), hosted=False)
SPEAKER_BOXES = RequestField("speaker_boxes", "boxes", "Where each speaker is: [x_min, y_min, x_max, y_max] in image "
                             "pixels, one box per speaker in audio order (2 with a second audio, else 1). Takes "
                             "precedence over `speaker_placement`.", hosted=False, flag="--speaker-box",
                             example=[[0, 40, 400, 720], [420, 40, 820, 720]])
SPEAKER_PLACEMENT = RequestField("speaker_placement", "choice", "Without boxes: halves = person 1 left, person 2 "
                                 "right; faces = from detected faces (falls back to halves).", default="halves",
                                 choices=("halves", "faces"), hosted=False)
NEGATIVE_PROMPT = RequestField("negative_prompt", "text", "What the video should not show; absent: the model's "
                               "default.", max_length=MAX_PROMPT_CHARS, hosted=False)
STEPS = RequestField("steps", "int", "Sampling steps instead of the acceleration preset's.", minimum=1,
                     maximum=1000, hosted=False, http=False)
SHIFT = RequestField("shift", "float", "Schedule shift instead of the preset's.", minimum=0.0, hosted=False,
                     http=False)
TEXT_SCALE = RequestField("text_scale", "float", "Text guidance scale (1 = 2-pass guidance).", minimum=0.0,
                          hosted=False, http=False)
AUDIO_SCALE = RequestField("audio_scale", "float", "Audio guidance scale.", minimum=0.0, hosted=False, http=False)
USE_APG = RequestField("use_apg", "bool", "Adaptive projected guidance (less colour drift).", default=False,
                       hosted=False, http=False, flag="--apg")
TEACACHE_THRESHOLD = RequestField("teacache_threshold", "float", "TeaCache threshold instead of the preset's.",
                                  minimum=0.0, hosted=False, http=False)
COLOR_CORRECTION = RequestField("color_correction_strength", "float", "Strength of the colour matching to the "
                                "image.", default=1.0, minimum=0.0, maximum=1.0, hosted=False, http=False,
                                flag="--color-correction")
FRAME_SIZE = RequestField("frame_size", "frame_size", "HEIGHTxWIDTH (multiples of 16) instead of the resolution's "
                          "bucket: previews and CPU demos.", hosted=False, http=False)

MEDIA_FIELDS: tuple[RequestField, ...] = (IMAGE, AUDIO, FIRST_AUDIO, SECOND_AUDIO)
SPEECH_FIELDS: tuple[RequestField, ...] = (TEXT_INPUT, VOICE, FIRST_TEXT, SECOND_TEXT, VOICE1, VOICE2)
OPTION_FIELDS: tuple[RequestField, ...] = (
    PROMPT, NUM_FRAMES, RESOLUTION, SEED, USE_ONLY_FIRST_AUDIO, ACCELERATION, AUDIO_MODE, SPEAKER_BOXES,
    SPEAKER_PLACEMENT, NEGATIVE_PROMPT, STEPS, SHIFT, TEXT_SCALE, AUDIO_SCALE, USE_APG, TEACACHE_THRESHOLD,
    COLOR_CORRECTION, FRAME_SIZE,
)
FIELDS: Mapping[str, RequestField] = {f.name: f for f in (*MEDIA_FIELDS, *SPEECH_FIELDS, *OPTION_FIELDS)}
AUDIO_FIELDS = tuple(f.name for f in MEDIA_FIELDS if f.kind == "audio")  # speaker order (audio_url: the only one)


@dataclass(frozen=True)
class SpeakerInput:
    """Where an endpoint takes one person's speech from: an audio field, or a text read in a voice."""

    audio: RequestField | None = None
    text: RequestField | None = None
    voice: RequestField | None = None

    @property
    def source(self) -> RequestField:
        """The field that says what this person says (the audio, or the text)."""
        return self.audio or self.text  # type: ignore[return-value]


@dataclass(frozen=True)
class Endpoint:
    """A hosted endpoint: which fields it takes over HTTP, in order, its own defaults for them, and where each
    person's speech comes from (`speakers`, in speaking order: person 1 is the left one)."""

    app_id: str
    title: str
    fields: tuple[RequestField, ...]
    speakers: tuple[SpeakerInput, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def default(self, request_field: RequestField) -> Any:
        return self.defaults.get(request_field.name, request_field.default)

    def speakers_used(self, values: Mapping[str, Any]) -> tuple[SpeakerInput, ...]:
        """The speakers a request with these field values animates: those whose speech is given, in order, and only
        person 1 when `use_only_first_audio` is set."""
        given = tuple(speaker for speaker in self.speakers if values.get(speaker.source.name) is not None)
        return given[:speaker_count(len(given) > 1, bool(values.get(USE_ONLY_FIRST_AUDIO.name)))]


# Our extension fields over HTTP: all of them where two people can speak, all but the audio mode where one does.
_EXTENSIONS = tuple(f for f in OPTION_FIELDS if f.http and not f.hosted)
_ONE_SPEAKER_EXTENSIONS = tuple(f for f in _EXTENSIONS if f is not AUDIO_MODE)
_HOSTED_TAIL = (PROMPT, NUM_FRAMES, RESOLUTION, SEED)  # what every endpoint takes after its speech fields

# Defaults and field orders from fal's published OpenAPI schemas of each endpoint.
AVATAR = Endpoint(
    "fal-ai/ai-avatar", "One image with one person, their speech, a prompt",
    (IMAGE, AUDIO, *_HOSTED_TAIL, ACCELERATION, *_ONE_SPEAKER_EXTENSIONS),
    (SpeakerInput(audio=AUDIO),), defaults={"num_frames": 145, "seed": 42},
)
AVATAR_SINGLE_TEXT = Endpoint(
    "fal-ai/ai-avatar/single-text", "One image with one person, what they say as text, a voice, a prompt",
    (IMAGE, TEXT_INPUT, VOICE, *_HOSTED_TAIL, ACCELERATION, *_ONE_SPEAKER_EXTENSIONS),
    (SpeakerInput(text=TEXT_INPUT, voice=VOICE),), defaults={"num_frames": 136, "seed": 42},
)
AVATAR_MULTI = Endpoint(
    "fal-ai/ai-avatar/multi", "One image with one or two people, their speech, a prompt",
    (IMAGE, FIRST_AUDIO, SECOND_AUDIO, *_HOSTED_TAIL, USE_ONLY_FIRST_AUDIO, ACCELERATION, *_EXTENSIONS),
    (SpeakerInput(audio=FIRST_AUDIO), SpeakerInput(audio=SECOND_AUDIO)),
    defaults={"seed": 81},  # the hosted schema's seed when absent; an explicit null draws one
)
AVATAR_MULTI_TEXT = Endpoint(
    "fal-ai/ai-avatar/multi-text", "One image with two people, what each says as text, their voices, a prompt",
    (IMAGE, FIRST_TEXT, SECOND_TEXT, VOICE1, VOICE2, *_HOSTED_TAIL, ACCELERATION, *_EXTENSIONS),
    (SpeakerInput(text=FIRST_TEXT, voice=VOICE1), SpeakerInput(text=SECOND_TEXT, voice=VOICE2)),
    defaults={"num_frames": 191, "seed": 81},
)
ENDPOINTS: tuple[Endpoint, ...] = (AVATAR, AVATAR_SINGLE_TEXT, AVATAR_MULTI, AVATAR_MULTI_TEXT)


def speaker_count(has_second_audio: bool, use_only_first_audio: bool) -> int:
    """How many people speak: 2 with a second audio track that is not switched off, else 1."""
    return 2 if has_second_audio and not use_only_first_audio else 1


def seed_or_random(seed: int | None) -> int:
    """The request's seed, or a random one in the accepted range when it has none."""
    return seed if seed is not None else random.randint(0, MAX_SEED)
