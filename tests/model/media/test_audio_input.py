"""Audio input: decoding every common container, librosa-equivalent resampling, loudness, two speakers.

Signals are synthesised here and encoded with the bundled ffmpeg, so no fixture files are needed.
Parity with the original's numbers is checked against the golden files by the golden checker.
"""

import subprocess
import warnings
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pyloudnorm
import pytest
import soundfile
from scipy.io import wavfile

from model.contract.errors import InputError
from model.media import audio_decode
from model.media.audio_decode import (
    DECODE_VALUES_PER_SECOND,
    check_audio_decodes,
    check_audio_header,
    check_audio_size,
    decode_audio,
)
from model.media.audio_input import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    TARGET_LUFS,
    combine_speakers,
    fit_length,
    load_speech,
    loudness_normalize,
    resample,
    to_mono,
)

SOURCE_RATE = 44100
SOURCE_SECONDS = 1.5
VIDEO = ["-f", "lavfi", "-i", "color=c=blue:s=32x32:r=25:d=1.5", "-map", "1:v", "-map", "0:a"]


def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error", *args], check=True)


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    """[n] float32 sine with a 3 Hz amplitude envelope, so that alignment errors show in correlation."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int, pcm16: bool = True) -> Path:
    """[channels, n] or [n] float → WAV file (PCM16 or IEEE float)."""
    data = samples.T if samples.ndim == 2 else samples
    wavfile.write(path, rate, np.round(data * 32767).astype(np.int16) if pcm16 else data.astype(np.float32))
    return path


@pytest.fixture(scope="module")
def stereo_source(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """44.1 kHz stereo PCM16 WAV (440 Hz left, 660 Hz right) and its exact float samples [2, n]."""
    pcm = np.round(np.stack([tone(440, SOURCE_SECONDS, SOURCE_RATE), tone(660, SOURCE_SECONDS, SOURCE_RATE)]) * 32767)
    path = tmp_path_factory.mktemp("audio") / "source.wav"
    wavfile.write(path, SOURCE_RATE, pcm.T.astype(np.int16))
    return path, (pcm / 32768).astype(np.float32)


# extension, ffmpeg output arguments, allowed length/offset error in seconds
ENCODINGS = {
    "wav-float": ("wav", ["-c:a", "pcm_f32le"], 0.0),
    "mp3": ("mp3", ["-c:a", "libmp3lame", "-b:a", "128k"], 0.005),
    "m4a-aac": ("m4a", ["-c:a", "aac"], 0.005),
    "adts-aac": ("aac", ["-c:a", "aac"], 0.05),  # raw ADTS stores no encoder-delay info: ~23 ms of priming stays
    "ogg-vorbis": ("ogg", ["-c:a", "libvorbis"], 0.005),
    "opus": ("opus", ["-c:a", "libopus"], 0.005),
    "flac": ("flac", ["-c:a", "flac"], 0.0),
    "mp4-video": ("mp4", [*VIDEO, "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"], 0.005),
    "mkv-video": ("mkv", [*VIDEO, "-c:v", "mpeg4", "-c:a", "libvorbis"], 0.005),
    "webm-video": ("webm", [*VIDEO, "-c:v", "libvpx", "-deadline", "realtime", "-c:a", "libopus"], 0.005),
}


@pytest.mark.parametrize("name", ENCODINGS)
def test_every_container_decodes_to_the_source(name, stereo_source, tmp_path):
    source_path, source = stereo_source
    extension, arguments, slack_s = ENCODINGS[name]
    encoded = tmp_path / f"encoded.{extension}"
    ffmpeg("-i", str(source_path), *arguments, str(encoded))

    check_audio_decodes(encoded, "first_audio_url")  # what the API checks at submit
    samples, rate = decode_audio(encoded, "first_audio_url")
    assert samples.dtype == np.float32 and samples.shape[0] == 2
    got, want = resample(to_mono(samples), rate), resample(to_mono(source), SOURCE_RATE)
    slack = int(slack_s * SAMPLE_RATE)
    assert abs(len(got) - len(want)) <= max(slack, 1)
    n = min(len(got), len(want)) - slack
    best = max(np.corrcoef(want[:n], got[lag : lag + n])[0, 1] for lag in range(slack + 1))
    assert best > 0.99


def test_pcm16_decodes_to_value_over_32768_at_native_rate(stereo_source):
    path, source = stereo_source
    samples, rate = decode_audio(path, "first_audio_url")
    assert rate == SOURCE_RATE
    np.testing.assert_array_equal(samples, source)


def test_stereo_is_averaged(stereo_source):
    _, source = stereo_source
    mono = to_mono(source)
    assert mono.dtype == np.float32
    np.testing.assert_array_equal(mono, (source[0] + source[1]) / np.float32(2))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_to_16k_keeps_length_and_pitch(rate):
    samples = tone(440, 1.0, rate)[:-3]  # an odd length, so the ceil of the length fix matters
    out = resample(samples, rate)
    assert out.dtype == np.float32
    assert len(out) == int(np.ceil(len(samples) * SAMPLE_RATE / rate))
    ideal = tone(440, 1.0, SAMPLE_RATE)[: len(out)]
    inner = slice(100, len(out) - 100)  # the filter's edges
    assert np.corrcoef(out[inner], ideal[inner])[0, 1] > 0.999


def test_resample_is_librosa_soxr_hq_bit_for_bit_on_stereo_44k(stereo_source):
    """librosa's recipe, pinned: soxr HQ per channel, then zero-pad or cut to ceil(n · 16000 / 44100)."""
    import librosa
    import soxr

    _, source = stereo_source
    source = source[:, :-7]  # an odd length, so the length fix matters
    out = resample(source, SOURCE_RATE)
    assert out.dtype == np.float32 and out.shape == (2, int(np.ceil(source.shape[1] * SAMPLE_RATE / SOURCE_RATE)))
    want = librosa.resample(source, orig_sr=SOURCE_RATE, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    np.testing.assert_array_equal(out, want)
    n = out.shape[1]
    for channel in range(2):
        raw = soxr.resample(source[channel], SOURCE_RATE, SAMPLE_RATE, quality="soxr_hq")
        np.testing.assert_array_equal(out[channel], np.pad(raw, (0, max(0, n - len(raw))))[:n])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # audioread, which librosa.load imports, uses aifc/sunau
def test_decode_mono_resample_equals_librosa_load(stereo_source):
    """The original's `librosa.load(path, sr=16000)` (soundfile back-end for WAV), bit for bit."""
    import librosa

    path, _ = stereo_source
    samples, rate = decode_audio(path, "first_audio_url")
    want, want_rate = librosa.load(path, sr=SAMPLE_RATE)
    assert want_rate == SAMPLE_RATE
    np.testing.assert_array_equal(resample(to_mono(samples), rate), want)


def test_resample_at_the_same_rate_is_a_no_op():
    samples = tone(440, 0.5, SAMPLE_RATE)
    assert resample(samples, SAMPLE_RATE) is samples


def test_fit_length_pads_with_zeros_or_cuts():
    samples = np.arange(1, 6, dtype=np.float32)
    np.testing.assert_array_equal(fit_length(samples, 7), [1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(fit_length(samples, 3), [1, 2, 3])


def test_loudness_normalize_reaches_minus_23_lufs():
    quiet = tone(300, 2.0, SAMPLE_RATE, amplitude=0.02)
    normalized = loudness_normalize(quiet)
    assert normalized.dtype == np.float32
    assert pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(normalized) == pytest.approx(TARGET_LUFS, abs=0.01)


def test_loudness_normalize_leaves_silence_and_short_audio_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        silence = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)
        assert loudness_normalize(silence) is silence
        short = tone(300, 0.2, SAMPLE_RATE)  # under pyloudnorm's 0.4 s gating block
        assert loudness_normalize(short) is short


def test_load_speech_gives_normalized_16k_mono(stereo_source):
    path, _ = stereo_source
    speech = load_speech(path, "first_audio_url")
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert len(speech) == int(np.ceil(SOURCE_SECONDS * SOURCE_RATE * SAMPLE_RATE / SOURCE_RATE))
    assert pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(speech) == pytest.approx(TARGET_LUFS, abs=0.01)


def make_bad_input(kind: str, folder: Path) -> Path:
    """A file that `load_speech` must refuse, of the given kind."""
    path = folder / f"{kind}.wav"
    if kind == "empty":
        path.touch()
    elif kind == "corrupt":
        path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEgarbage" * 20)
    elif kind == "png":
        path = folder / "picture.png"
        ffmpeg("-f", "lavfi", "-i", "color=s=16x16", "-frames:v", "1", str(path))
    elif kind == "video-without-audio":
        path = folder / "silent-film.mp4"
        ffmpeg("-f", "lavfi", "-i", "color=s=32x32:d=0.5", "-c:v", "mpeg4", str(path))
    elif kind == "too-short":
        write_wav(path, tone(440, 0.05, SAMPLE_RATE), SAMPLE_RATE)
    elif kind == "too-long":
        write_wav(path, tone(440, 3.0, SAMPLE_RATE), SAMPLE_RATE)
    elif kind == "silent":
        write_wav(path, np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    elif kind in ("nan", "inf"):
        samples = tone(440, 1.0, SAMPLE_RATE)
        samples[100] = np.nan if kind == "nan" else np.inf
        write_wav(path, samples, SAMPLE_RATE, pcm16=False)
    return path


# Refused by the decode itself: `check_audio_decodes` (the API, at submit) refuses these too.
DECODE_REFUSALS = [
    ("missing", "no such file"),
    ("empty", "the file is empty"),
    ("corrupt", "could not be decoded as audio: .*Invalid data"),
    ("png", "no audio stream found"),
    ("video-without-audio", "no audio stream found"),
    ("too-short", r"audio is 0\.050 s long; at least 0\.1 s is needed"),
    ("too-long", r"audio is 3\.0 s long; at most 1 s is accepted"),
]
# Refused only once the samples are read (the worker): the API accepts these.
SAMPLE_REFUSALS = [
    ("silent", "the audio is silent"),
    ("nan", r"the audio contains invalid \(NaN or infinite\) samples"),
    ("inf", r"the audio contains invalid \(NaN or infinite\) samples"),
]


@pytest.mark.parametrize("kind, reason", DECODE_REFUSALS + SAMPLE_REFUSALS)
def test_bad_input_names_the_field(kind, reason, tmp_path):
    path = make_bad_input(kind, tmp_path)
    with pytest.raises(InputError, match=f"^second_audio_url: {reason}") as caught:
        load_speech(path, "second_audio_url", max_seconds=1.0)
    assert caught.value.field == "second_audio_url"
    assert str(tmp_path) not in caught.value.reason


@pytest.mark.parametrize("kind, reason", DECODE_REFUSALS)
def test_the_check_without_samples_refuses_what_the_decode_refuses(kind, reason, tmp_path):
    path = make_bad_input(kind, tmp_path)
    with pytest.raises(InputError, match=f"^second_audio_url: {reason}") as caught:
        check_audio_decodes(path, "second_audio_url", max_seconds=1.0)
    assert str(tmp_path) not in caught.value.reason


@pytest.mark.parametrize("kind", [kind for kind, _ in SAMPLE_REFUSALS])
def test_the_check_without_samples_passes_what_only_the_samples_show(kind, tmp_path):
    check_audio_decodes(make_bad_input(kind, tmp_path), "second_audio_url", max_seconds=1.0)


# Issue 15 scaled down to a 1 s limit: silence at a rate × channels far above 48 kHz stereo, which decoding
# would hold as float32 before finding it silent.
HUGE_RATE, HUGE_CHANNELS, HUGE_SECONDS = 384000, 8, 0.5
TOO_LARGE = (r"audio of 384000 Hz × 8 channel\(s\) × {seconds} s is too large to decode; "
             r"at most 48000 Hz × 2 channels for 1 s")


def test_audio_too_large_to_decode_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.flac"
    soundfile.write(path, np.zeros((int(HUGE_RATE * HUGE_SECONDS), HUGE_CHANNELS), np.int16), HUGE_RATE)
    message = f"^first_audio_url: {TOO_LARGE.format(seconds=HUGE_SECONDS)}"
    with pytest.raises(InputError, match=message):
        check_audio_header(path, "first_audio_url", max_seconds=1.0)  # reads the header only: no ffmpeg here
    with pytest.raises(InputError, match=message) as caught:  # not "the audio is silent": never decoded
        load_speech(path, "first_audio_url", max_seconds=1.0)
    assert caught.value.field == "first_audio_url"
    with pytest.raises(InputError, match=message):
        check_audio_decodes(path, "first_audio_url", max_seconds=1.0)


def test_audio_whose_header_has_no_length_is_capped_while_decoding(tmp_path):
    """A FLAC written to a pipe has no length in its header; ffmpeg's output stops at the same bound."""
    source, path = tmp_path / "huge.flac", tmp_path / "piped.flac"
    soundfile.write(source, np.zeros((int(HUGE_RATE * HUGE_SECONDS), HUGE_CHANNELS), np.int16), HUGE_RATE)
    with path.open("wb") as out:
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(source),
                        "-f", "flac", "-"], stdout=out, check=True)
    check_audio_header(path, "second_audio_url", max_seconds=1.0)
    for decode in (decode_audio, check_audio_decodes):
        with pytest.raises(InputError, match="^second_audio_url: " + TOO_LARGE.format(seconds=r"0\.\d")):
            decode(path, "second_audio_url", max_seconds=1.0)


def test_a_decode_that_runs_past_its_time_is_refused(stereo_source, monkeypatch):
    monkeypatch.setattr(audio_decode, "DECODE_TIMEOUT_S", 0.001)  # ffmpeg takes longer than that just to start
    for decode in (decode_audio, check_audio_decodes):
        with pytest.raises(InputError, match=r"^first_audio_url: decoding took longer than 0\.001 s$"):
            decode(stereo_source[0], "first_audio_url")


def test_the_decode_bound_is_48_khz_stereo_for_the_longest_input():
    check_audio_size("first_audio_url", 48000, 2, 600.0)
    check_audio_size("first_audio_url", 192000, 8, 600.0 * 2 * 48000 / (192000 * 8))
    assert DECODE_VALUES_PER_SECOND == 48000 * 2
    with pytest.raises(InputError, match="too large to decode"):
        check_audio_size("first_audio_url", 48000, 3, 600.0)
    with pytest.raises(InputError, match=r"audio is 600\.5 s long; at most 600 s is accepted"):
        check_audio_size("first_audio_url", 16000, 1, 600.5)


def test_one_speaker_is_its_own_mix():
    track = tone(200, 0.5, SAMPLE_RATE)
    combined = combine_speakers([track])
    assert len(combined.per_speaker) == 1
    np.testing.assert_array_equal(combined.per_speaker[0], track)
    np.testing.assert_array_equal(combined.mix, track)


def test_add_mode_plays_speakers_one_after_the_other():
    first, second = tone(200, 0.5, SAMPLE_RATE), tone(300, 0.3, SAMPLE_RATE)
    combined = combine_speakers([first, second], "add")
    person1, person2 = combined.per_speaker
    n1, total = len(first), len(first) + len(second)
    assert person1.shape == person2.shape == combined.mix.shape == (total,)
    assert person1.dtype == person2.dtype == combined.mix.dtype == np.float32
    np.testing.assert_array_equal(person1, np.concatenate([first, np.zeros_like(second)]))
    np.testing.assert_array_equal(person2, np.concatenate([np.zeros_like(first), second]))
    np.testing.assert_array_equal(combined.mix, np.concatenate([first, second]))
    assert not person2[:n1].any() and not person1[n1:].any()


def test_para_mode_overlaps_and_pads_the_shorter_track():
    first, second = tone(200, 0.5, SAMPLE_RATE), tone(300, 0.3, SAMPLE_RATE)
    combined = combine_speakers([first, second], "para")
    person1, person2 = combined.per_speaker
    assert person1.shape == person2.shape == combined.mix.shape == (len(first),)
    np.testing.assert_array_equal(person1, first)
    np.testing.assert_array_equal(person2, np.concatenate([second, np.zeros(len(first) - len(second), np.float32)]))
    np.testing.assert_array_equal(combined.mix, person1 + person2)


def test_combine_refuses_unknown_modes_and_more_than_two_speakers():
    track = np.ones(SAMPLES_PER_FRAME, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown audio mode"):
        combine_speakers([track, track], "mix")
    with pytest.raises(ValueError, match="1 or 2 speaker tracks"):
        combine_speakers([track, track, track])
