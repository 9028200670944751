"""Decoding an audio input within bounds, and the limits that make it usable: the one definition of both.

Any container ffmpeg knows (including the audio track of a video) is decoded with the bundled ffmpeg
binary to 32-bit float WAV on a pipe. Its size is bounded before and while decoding: the header's
rate × channels × seconds is checked first (`check_audio_header`), and ffmpeg's output is capped at the
same bound, so neither a header that understates the length nor a container whose header is not read
beforehand can make a decode hold more memory.

The worker holds the samples (`decode_audio`, then `model.media.audio_input` turns them into speech);
the API checks each audio input at submit with the same decode and the same limits, counting the
output instead of keeping it (`check_audio_decodes`), so an input the worker would refuse as not
decodable, too short, too long or too large is a 422 at once rather than a failed job. This module
imports neither librosa nor torch: the API process never loads them.
"""

from __future__ import annotations

import logging
import re
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from model.contract.errors import InputError

logger = logging.getLogger(__name__)

MIN_SECONDS = 0.1
MAX_SECONDS = 600.0
# Decoding holds rate × channels float32 values per second (ffmpeg's output, then a copy). 48 kHz stereo,
# what recorders and videos deliver, for the longest accepted input is plenty: 48000 × 2 × 600 s = 57.6 M
# values, 230 MB. More channels or a higher rate are fine for shorter audio; the product is the bound
# (issue 15: 655 kHz × 8 channels of silence for 601 s would need ≈ 35 GB).
DECODE_BUDGET_RATE, DECODE_BUDGET_CHANNELS = 48000, 2
DECODE_VALUES_PER_SECOND = DECODE_BUDGET_RATE * DECODE_BUDGET_CHANNELS
DECODE_TIMEOUT_S = 120.0
_FLOAT32_BYTES = 4
_UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's SF_COUNT_MAX: a header without the length (e.g. a piped FLAC)
_READ_BYTES = 1 << 20  # ffmpeg's output is read in pieces of this size
_WAV_HEADER_BYTES = 4096  # ffmpeg's WAV header, without metadata (dropped), fits many times over

_WAVE_FORMAT_IEEE_FLOAT = 3
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_FFMPEG_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # "[in#0 @ 0x55…] " before ffmpeg's messages
_DURATION = re.compile(r"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")


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
    the decode bounds them by capping ffmpeg's output at the same number of values.
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
    allows for one second more. Refuses (InputError naming `field`) what `check_audio_decodes` refuses.
    """
    output = bytearray()
    log = _run_decode(Path(path), field, max_seconds, output.extend)
    samples, rate = _parse_float_wav(output)
    _check_decoded(field, rate, samples.shape[0], samples.shape[1], log, max_seconds)
    return samples, rate


def check_audio_decodes(path: Path, field: str, max_seconds: float = MAX_SECONDS) -> None:
    """Refuse what `decode_audio` refuses, without holding the samples: the same checks and the same bounded
    decode, whose output is counted and dropped as it arrives (memory: one read of ffmpeg's pipe).

    Refuses (InputError naming `field`): no such file, an empty file, a header whose size is over the bound,
    no audio stream, anything ffmpeg cannot decode, or a decode that takes longer than `DECODE_TIMEOUT_S`,
    is shorter than `MIN_SECONDS`, longer than `max_seconds`, or larger than the bound.
    """
    output = _CountedWav()
    log = _run_decode(Path(path), field, max_seconds, output.add)
    channels, rate, data_start = _wav_format(output.head)
    frames = (output.size - data_start) // (_FLOAT32_BYTES * channels)
    _check_decoded(field, rate, channels, frames, log, max_seconds)


class _CountedWav:
    """ffmpeg's WAV output counted as it arrives; only its header is kept."""

    def __init__(self) -> None:
        self.head, self.size = bytearray(), 0

    def add(self, piece: bytes) -> None:
        if len(self.head) < _WAV_HEADER_BYTES:
            self.head += piece[: _WAV_HEADER_BYTES - len(self.head)]
        self.size += len(piece)


def _run_decode(path: Path, field: str, max_seconds: float, consume: Callable[[bytes], None]) -> str:
    """Decode `path`'s first audio stream with ffmpeg, handing its float WAV output to `consume` piece by
    piece; ffmpeg's log. Checks the file and its header first; refuses what ffmpeg cannot decode."""
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
        "-map", "0:a:0", "-map_metadata", "-1", "-t", f"{max_seconds + 1:.3f}", "-fs", f"{max_bytes:.0f}",
        "-f", "wav", "-acodec", "pcm_f32le", "-",
    ]  # fmt: skip
    timed_out = threading.Event()
    with tempfile.TemporaryFile() as log_file, subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file
    ) as ffmpeg:
        timer = threading.Timer(DECODE_TIMEOUT_S, lambda: (timed_out.set(), ffmpeg.kill()))
        timer.start()
        try:
            while piece := ffmpeg.stdout.read(_READ_BYTES):
                consume(piece)
        finally:
            timer.cancel()
            ffmpeg.kill()  # a no-op once it has exited; stops it when `consume` raised
        returncode = ffmpeg.wait()
        log_file.seek(0)
        log = log_file.read().decode("utf-8", "replace")
    if timed_out.is_set():
        raise InputError(field, f"decoding took longer than {DECODE_TIMEOUT_S:g} s")
    if returncode != 0:
        if "matches no streams" in log:
            raise InputError(field, "no audio stream found")
        raise InputError(field, f"could not be decoded as audio: {_last_ffmpeg_message(log, path)}")
    return log


def _check_decoded(field: str, rate: int, channels: int, frames: int, log: str, max_seconds: float) -> None:
    """The limits on what the decode produced: `check_audio_size`, and at least `MIN_SECONDS`. A decode cut
    off by `-t` is as long as the container's duration says."""
    seconds = frames / rate
    logger.debug("decoded %d Hz, %d channel(s), %.3f s", rate, channels, seconds)
    if seconds >= max_seconds + 1 and (header := _DURATION.search(log)):
        h, m, s = header.groups()
        seconds = max(seconds, int(h) * 3600 + int(m) * 60 + float(s))
    check_audio_size(field, rate, channels, seconds, max_seconds)  # first: a decode cut by `-fs` is short
    if seconds < MIN_SECONDS:
        raise InputError(field, f"audio is {seconds:.3f} s long; at least {MIN_SECONDS:g} s is needed")


def _last_ffmpeg_message(log: str, path: Path) -> str:
    """ffmpeg's final complaint, short and without the server's file path."""
    lines = [_FFMPEG_PREFIX.sub("", line).strip() for line in log.splitlines()]
    message = next((line for line in reversed(lines) if line), "ffmpeg failed")
    return message.replace(str(path.resolve()), path.name)[:200]


def _wav_format(data: bytes | bytearray) -> tuple[int, int, int]:
    """The start of ffmpeg's pcm_f32le WAV output → (channels, rate, offset of the sample data)."""
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
            if channels is None or rate is None:
                raise ValueError("ffmpeg's WAV stream has no fmt chunk before the data")
            return channels, rate, body
        offset = body + size + (size & 1)
    raise ValueError("ffmpeg's WAV stream has no data chunk")


def _parse_float_wav(data: bytearray) -> tuple[np.ndarray, int]:
    """ffmpeg's pcm_f32le WAV bytes → ([channels, n] float32, rate).

    Piped WAV has no seekable header, so the RIFF and data sizes are placeholders: the data chunk runs
    to the end of the stream.
    """
    channels, rate, data_start = _wav_format(data)
    frames = (len(data) - data_start) // (_FLOAT32_BYTES * channels)
    interleaved = np.frombuffer(data, dtype="<f4", count=frames * channels, offset=data_start)
    # a writable copy of the [channels, n] view, in the same memory order as librosa's transpose
    return interleaved.reshape(frames, channels).T.copy(order="K"), rate
