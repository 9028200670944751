"""What a written MP4 contains, as ffprobe and the bundled ffmpeg see it, for tests of video output.

ffprobe is the system one (the product never needs it): without it these checks are skipped,
unless MULTITALK_REQUIRE_FFPROBE=1 makes that a failure (CI with ffmpeg installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest


def ffprobe_or_skip() -> str:
    """Path of ffprobe; skips the test without it, fails under MULTITALK_REQUIRE_FFPROBE=1."""
    found = shutil.which("ffprobe")
    if found:
        return found
    reason = "ffprobe is not on PATH (install ffmpeg to check the written videos)"
    if os.environ.get("MULTITALK_REQUIRE_FFPROBE") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def top_level_boxes(path: Path) -> list[str]:
    """MP4 top-level box types in file order (e.g. ['ftyp', 'moov', 'free', 'mdat'])."""
    data = Path(path).read_bytes()
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        boxes.append(data[offset + 4 : offset + 8].decode("latin-1"))
        if size == 1:  # 64-bit size follows the type
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        elif size == 0:  # box runs to the end of the file
            break
        offset += size
    return boxes


def probe(path: Path) -> dict:
    """Frame count (decoded), frame rate, codecs, pixel format, colour tags, audio timing, faststart."""
    command = [
        ffprobe_or_skip(), "-v", "error", "-count_frames", "-of", "json", "-show_entries",
        "stream=codec_type,codec_name,pix_fmt,width,height,r_frame_rate,nb_read_frames,start_time,duration,"
        "color_space,color_primaries,color_transfer", str(path),
    ]  # fmt: skip
    streams = json.loads(subprocess.run(command, capture_output=True, check=True, text=True).stdout)["streams"]
    (video,) = [s for s in streams if s["codec_type"] == "video"]
    audio = [s for s in streams if s["codec_type"] == "audio"]
    boxes = top_level_boxes(path)
    return {
        "frames": int(video["nb_read_frames"]),
        "fps": video["r_frame_rate"],
        "video_codec": video["codec_name"],
        "pix_fmt": video["pix_fmt"],
        "size": (video["width"], video["height"]),
        "colors": (video.get("color_space"), video.get("color_primaries"), video.get("color_transfer")),
        "audio_streams": len(audio),
        "audio_codec": audio[0]["codec_name"] if audio else None,
        "audio_start": float(audio[0]["start_time"]) if audio else None,
        "audio_duration": float(audio[0]["duration"]) if audio else None,
        "faststart": "moov" in boxes and "mdat" in boxes and boxes.index("moov") < boxes.index("mdat"),
    }


def _decode(path: Path, *output: str) -> bytes:
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(path), *output, "-"]
    return subprocess.run(command, capture_output=True, check=True).stdout


def decode_frames(path: Path, width: int, height: int) -> np.ndarray:
    """All video frames as uint8 [T, H, W, 3] (RGB, converted with the stream's colour tags)."""
    raw = _decode(path, "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24")
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def decode_audio(path: Path, sample_rate: int) -> np.ndarray:
    """The first audio stream as mono float32 [n] at `sample_rate`."""
    raw = _decode(path, "-map", "0:a:0", "-f", "f32le", "-ac", "1", "-ar", str(sample_rate))
    return np.frombuffer(raw, "<f4")
