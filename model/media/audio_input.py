"""Audio input: any common audio or video file → the 16 kHz mono speech track MultiTalk conditions on.

The original reads files with `librosa.load(path, sr=16000)` and normalises each track to −23 LUFS
with pyloudnorm. Decoding is done with the bundled ffmpeg instead of librosa's soundfile /
audioread back-ends (`model.media.audio_decode`, which also holds the limits on usable audio), so
that every container ffmpeg knows (including the audio track of a video) works the same way and no
temporary file is written (the original extracts video audio into the working directory). The rest
of `librosa.load` is librosa's own code, called directly so that the numbers are the original's by
construction (the golden `audio_load` checks are bit-exact):

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

from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import pyloudnorm

from model.contract.errors import InputError
from model.contract.fields import VIDEO_FPS
from model.media.audio_decode import MAX_SECONDS, decode_audio

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // VIDEO_FPS  # 640
TARGET_LUFS = -23.0

SILENCE_PEAK = 1e-4  # below this peak amplitude there is nothing to lip-sync to
LOUDNESS_DEGENERATE = 100.0  # |integrated loudness| above this (silence = −inf) leaves the audio as it is


@dataclass
class SpeakerTracks:
    per_speaker: list[np.ndarray]  # one [n] float32 track per person (wav2vec2 input), all the same n
    mix: np.ndarray  # [n] float32: the sound muxed into the output video


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

    Refuses (InputError naming `field`) what cannot drive a talking video: what `decode_audio` refuses
    (no decodable audio, less than 0.1 s, more than `max_seconds`, more to decode than 48 kHz stereo
    for `max_seconds`; the API refuses these at submit), NaN/inf samples, or silence.
    """
    samples, rate = decode_audio(path, field, max_seconds)
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
