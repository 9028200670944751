"""Audio input: any common audio or video file → the 16 kHz mono speech track MultiTalk conditions on.

The original reads files with `librosa.load(path, sr=16000)` and normalises each track to −23 LUFS
with pyloudnorm. Decoding is done here with the bundled ffmpeg instead of librosa's soundfile /
audioread back-ends, so that every container ffmpeg knows (including the audio track of a video)
works the same way and no temporary file is written (the original extracts video audio into the
working directory). The rest of `librosa.load` is librosa's own code, called directly so that the
numbers are the original's by construction (the golden `audio_load` checks are bit-exact):

- `librosa.to_mono`: the channel mean (float32 stays float32);
- `librosa.resample(res_type="soxr_hq")`: soxr "HQ" per channel, then (fix=True) the length fixed
  to ceil(n · target / orig) and the input's dtype restored;
- `librosa.util.fix_length`: zero-padding or cutting at the end, also used to fit the speakers'
  tracks and the muxed mix to the video length.

`import librosa` is cheap (its submodules load lazily), so importing this module stays as fast as
before; the first call of one of these functions loads librosa's core and numba (1–3 s, once per
process, in whatever process first loads or fits audio).
Two speakers are combined as in `audio_prepare_multi`, except that `para` pads unequal lengths
instead of crashing.
"""

from __future__ import annotations

import logging
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import librosa
import numpy as np
import pyloudnorm

from model.contract.errors import InputError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
VIDEO_FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640
TARGET_LUFS = -23.0

MIN_SECONDS = 0.1
MAX_SECONDS = 600.0
# Decoding holds rate × channels float32 values per second (ffmpeg's output, then a copy). 48 kHz stereo,
# what recorders and videos deliver, for the longest accepted input is plenty: 48000 × 2 × 600 s = 57.6 M
# values, 230 MB. More channels or a higher rate are fine for shorter audio; the product is the bound
# (issue 15: 655 kHz × 8 channels of silence for 601 s would need ≈ 35 GB).
DECODE_BUDGET_RATE, DECODE_BUDGET_CHANNELS = 48000, 2
DECODE_VALUES_PER_SECOND = DECODE_BUDGET_RATE * DECODE_BUDGET_CHANNELS
_FLOAT32_BYTES = 4
_UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's SF_COUNT_MAX: a header without the length (e.g. a piped FLAC)
SILENCE_PEAK = 1e-4  # below this peak amplitude there is nothing to lip-sync to
DECODE_TIMEOUT_S = 120.0
LOUDNESS_DEGENERATE = 100.0  # |integrated loudness| above this (silence = −inf) leaves the audio as it is

_WAVE_FORMAT_IEEE_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_FFMPEG_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # "[in#0 @ 0x55…] " before ffmpeg's messages
_DURATION = re.compile(r"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")


@dataclass
class SpeakerTracks:
    per_speaker: list[np.ndarray]  # one [n] float32 track per person (wav2vec2 input), all the same n
    mix: np.ndarray  # [n] float32: the sound muxed into the output video


def check_audio_size(field: str, rate: int, channels: int, seconds: float, max_seconds: float = MAX_SECONDS) -> None:
    """Refuse audio longer than `max_seconds`, or whose rate × channels × seconds decodes to more values than
    48 kHz stereo for `max_seconds`: the one rule for the header and for what the decode produced."""
    if seconds > max_seconds:
        raise InputError(field, f"audio is {seconds:.1f} s long; at most {max_seconds:g} s is accepted")
    if rate * channels * seconds > DECODE_VALUES_PER_SECOND * max_seconds:
        raise InputError(field, f"audio of {rate} Hz × {channels} channel(s) × {seconds:.1f} s is too large to "
                                f"decode; at most {DECODE_BUDGET_RATE} Hz × {DECODE_BUDGET_CHANNELS} channels for "
                                f"{max_seconds:g} s is accepted (sample rate × channels × seconds up to "
                                f"{DECODE_VALUES_PER_SECOND * max_seconds:.0f})")


def check_audio_header(path: Path, field: str, max_seconds: float = MAX_SECONDS) -> None:
    """`check_audio_size` from the file's header (soundfile.info), before anything is decoded.

    Files whose header libsndfile cannot read (MP4, WebM, AAC, ...) or that has no length pass;
    `decode_audio` bounds them by capping ffmpeg's output at the same number of values.
    """
    import soundfile  # here, not at import: the GPU proof's machine imports this module without it

    try:
        info = soundfile.info(str(path))
    except soundfile.LibsndfileError:
        return
    if info.frames != _UNKNOWN_FRAMES:
        check_audio_size(field, info.samplerate, info.channels, info.duration, max_seconds)


def decode_audio(path: Path, field: str, max_seconds: float = MAX_SECONDS) -> tuple[np.ndarray, int]:
    """First audio stream of any container → ([channels, n] float32, native sample rate).

    ffmpeg converts to 32-bit float WAV on stdout (PCM16 becomes value/32768 exactly, as libsndfile
    gives librosa). Decoding stops one second past `max_seconds`, so an over-long upload costs at most
    that much work before it is refused, and its output is capped at the values `check_audio_size`
    allows for one second more, so neither a header that understates the length nor a container whose
    header is not read beforehand can make it hold more memory.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(field, "no such file")
    if path.stat().st_size == 0:
        raise InputError(field, "the file is empty")
    check_audio_header(path, field, max_seconds)
    max_bytes = DECODE_VALUES_PER_SECOND * (max_seconds + 1) * _FLOAT32_BYTES
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-nostats",
        "-protocol_whitelist", "file",  # an uploaded playlist must not make ffmpeg open URLs
        "-i", f"file:{path.resolve()}",
        "-map", "0:a:0", "-t", f"{max_seconds + 1:.3f}", "-fs", f"{max_bytes:.0f}",
        "-f", "wav", "-acodec", "pcm_f32le", "-",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, timeout=DECODE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as error:
        raise InputError(field, f"decoding took longer than {DECODE_TIMEOUT_S:g} s") from error
    log = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        if "matches no streams" in log:
            raise InputError(field, "no audio stream found")
        raise InputError(field, f"could not be decoded as audio: {_last_ffmpeg_message(log, path)}")
    samples, rate = _parse_float_wav(done.stdout)
    seconds = samples.shape[1] / rate
    logger.debug("decoded %s: %d Hz, %d channel(s), %.3f s", path.name, rate, samples.shape[0], seconds)
    if seconds > max_seconds:
        header = _DURATION.search(log)
        if seconds >= max_seconds + 1 and header:  # cut by -t: the container's duration tells the length
            h, m, s = header.groups()
            seconds = max(seconds, int(h) * 3600 + int(m) * 60 + float(s))
    check_audio_size(field, rate, samples.shape[0], seconds, max_seconds)
    return samples, rate


def _last_ffmpeg_message(log: str, path: Path) -> str:
    """ffmpeg's final complaint, short and without the server's file path."""
    lines = [_FFMPEG_PREFIX.sub("", line).strip() for line in log.splitlines()]
    message = next((line for line in reversed(lines) if line), "ffmpeg failed")
    return message.replace(str(path.resolve()), path.name)[:200]


def _parse_float_wav(data: bytes) -> tuple[np.ndarray, int]:
    """ffmpeg's pcm_f32le WAV bytes → ([channels, n] float32, rate).

    Piped WAV has no seekable header, so the RIFF and data sizes read 0xFFFFFFFF: the data chunk runs
    to the end of the stream.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("ffmpeg did not produce a WAV stream")
    channels = rate = None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == _WAVE_FORMAT_EXTENSIBLE:
                tag = struct.unpack_from("<H", data, body + 24)[0]  # sub-format GUID starts with the tag
            if tag != _WAVE_FORMAT_IEEE_FLOAT or bits != 32:
                raise ValueError(f"unexpected WAV sample format {tag}/{bits} bit from ffmpeg")
        elif chunk_id == b"data":
            if channels is None:
                raise ValueError("ffmpeg's WAV stream has no fmt chunk before the data")
            payload = data[body:] if size == 0xFFFFFFFF else data[body : body + size]
            frames = len(payload) // (4 * channels)
            interleaved = np.frombuffer(payload, dtype="<f4", count=frames * channels)
            # a writable copy of the [channels, n] view, in the same memory order as librosa's transpose
            return interleaved.reshape(frames, channels).T.copy(order="K"), rate
        offset = body + size + (size & 1)
    raise ValueError("ffmpeg's WAV stream has no data chunk")


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[channels, n] → [n]: `librosa.to_mono`, the plain channel mean (float32 stays float32).

    Raises librosa's ParameterError for NaN or infinite samples.
    """
    return librosa.to_mono(samples)


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad at the end, or cut, along the last axis to exactly `length` samples (`librosa.util.fix_length`)."""
    return librosa.util.fix_length(samples, size=length)


def resample(samples: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`librosa.resample(res_type="soxr_hq", fix=True)` along the last axis, dtype kept.

    soxr's output length can differ from the ideal by a sample; librosa fixes it to
    ceil(n · target / orig). The same rate returns `samples` itself. Raises librosa's ParameterError
    for NaN or infinite samples.
    """
    return librosa.resample(samples, orig_sr=orig_rate, target_sr=target_rate, res_type="soxr_hq")


def loudness_normalize(samples: np.ndarray, rate: int = SAMPLE_RATE, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """[n] → [n] scaled to `target_lufs` integrated loudness (BS.1770), as the original's `loudness_norm`.

    Silence (−inf LUFS) and audio shorter than one 0.4 s gating block are returned unchanged, and
    nothing is limited. The gain is `pyloudnorm.normalize.loudness`'s, cast to the samples' dtype
    first: the reference ran numpy 1, where that float64 gain times a float32 array is a float32
    product (numpy 2 would widen it and round differently).
    """
    meter = pyloudnorm.Meter(rate)
    if samples.shape[-1] < meter.block_size * rate:
        return samples
    loudness = meter.integrated_loudness(samples)
    if abs(loudness) > LOUDNESS_DEGENERATE:
        return samples
    gain = np.power(10.0, (target_lufs - loudness) / 20.0)
    return samples.dtype.type(gain) * samples


def load_speech(path: Path, field: str, max_seconds: float = MAX_SECONDS) -> np.ndarray:
    """A user's audio file → [n] float32 at 16 kHz, loudness-normalised: one speaker's track.

    Refuses (InputError naming `field`) what cannot drive a talking video: no decodable audio,
    less than 0.1 s, more than `max_seconds`, more to decode than 48 kHz stereo for `max_seconds`,
    NaN/inf samples, or silence.
    """
    samples, rate = decode_audio(path, field, max_seconds)
    if samples.shape[1] < MIN_SECONDS * rate:
        raise InputError(field, f"audio is {samples.shape[1] / rate:.3f} s long; at least {MIN_SECONDS:g} s is needed")
    invalid = "the audio contains invalid (NaN or infinite) samples"
    try:
        speech = resample(to_mono(samples), rate)
    except librosa.ParameterError as error:  # librosa's valid_audio: NaN or ±inf in its input
        raise InputError(field, invalid) from error
    if not np.isfinite(speech).all():  # finite but huge input can still overflow float32
        raise InputError(field, invalid)
    if np.max(np.abs(speech)) < SILENCE_PEAK:
        raise InputError(field, "the audio is silent")
    return loudness_normalize(speech)


def combine_speakers(tracks: list[np.ndarray], mode: str = "add") -> SpeakerTracks:
    """One or two speakers' [n] tracks → equal-length per-person tracks and the mix to mux.

    "add" (sequential dialogue): person 2 speaks after person 1, each silent while the other talks.
    "para" (simultaneous): both from the start; the shorter is padded with silence at the end (the
    original requires equal lengths).
    """
    if mode not in ("add", "para"):
        raise ValueError(f"unknown audio mode {mode!r}; expected 'add' or 'para'")
    if len(tracks) == 1:
        return SpeakerTracks(per_speaker=[tracks[0]], mix=tracks[0])
    if len(tracks) != 2:
        raise ValueError(f"1 or 2 speaker tracks are supported, got {len(tracks)}")
    first, second = (np.asarray(track, dtype=np.float32) for track in tracks)
    if mode == "add":
        total = len(first) + len(second)
        person1, person2 = fit_length(first, total), np.concatenate([np.zeros_like(first), second])
    else:
        total = max(len(first), len(second))
        person1, person2 = fit_length(first, total), fit_length(second, total)
    return SpeakerTracks(per_speaker=[person1, person2], mix=person1 + person2)
