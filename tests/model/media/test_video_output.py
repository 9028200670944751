"""MP4 output: one encode with exact frame count, 25 fps, H.264/AAC, audio fitted to the video.

Frames are synthetic (a fixed colour patch and a grey patch whose level counts the frames), so
decoding the file back checks order, count and the colour conversion, not only the metadata.
"""

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.media.video_output import Mp4Writer, frames_to_uint8

from media_probe import decode_audio, decode_frames, probe

WIDTH, HEIGHT, FPS, RATE = 64, 48, 25, 16000
NUM_FRAMES = 181
CLIPS = (81, 56, 44)  # written one generated clip at a time
PATCH_RGB = (200, 30, 90)


def synthetic_frames(start: int, count: int) -> np.ndarray:
    """uint8 [count, H, W, 3]: left half PATCH_RGB, right half grey at level 30 + frame index."""
    frames = np.empty((count, HEIGHT, WIDTH, 3), np.uint8)
    frames[:, :, : WIDTH // 2] = PATCH_RGB
    frames[:, :, WIDTH // 2 :] = (30 + np.arange(start, start + count))[:, None, None, None]
    return frames


def write_video(path: Path, audio: np.ndarray | None, **options) -> Mp4Writer:
    with Mp4Writer(path, width=WIDTH, height=HEIGHT, num_frames=NUM_FRAMES, audio=audio, **options) as writer:
        start = 0
        for count in CLIPS:
            clip = synthetic_frames(start, count)
            writer.write(torch.from_numpy(clip) if start == 0 else clip)
            start += count
    return writer


def tone(seconds: float, silence_before: float = 0.0) -> np.ndarray:
    """[n] float32: `silence_before` seconds of silence, then a 440 Hz tone."""
    t = np.arange(int(seconds * RATE)) / RATE
    return np.where(t >= silence_before, 0.3 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)


@pytest.fixture
def dirs(tmp_path, monkeypatch) -> SimpleNamespace:
    """An output folder that is also the working directory, and a private system temp folder."""
    out, temp = tmp_path / "out", tmp_path / "temp"
    out.mkdir()
    temp.mkdir()
    monkeypatch.chdir(out)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return SimpleNamespace(out=out, temp=temp)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_one_encode_has_exact_frames_rate_codecs_and_cut_audio(dirs):
    path = dirs.out / "video.mp4"
    assert write_video(path, tone(7.5)).frames_written == NUM_FRAMES
    info = probe(path)
    assert info["frames"] == NUM_FRAMES and info["fps"] == "25/1"
    assert (info["video_codec"], info["pix_fmt"], info["size"]) == ("h264", "yuv420p", (WIDTH, HEIGHT))
    assert info["colors"] == ("bt709", "bt709", "bt709")
    assert info["audio_codec"] == "aac"
    assert info["audio_duration"] == pytest.approx(NUM_FRAMES / FPS, abs=1 / FPS)
    assert info["faststart"]
    assert files_in(dirs.out) == ["video.mp4"] and files_in(dirs.temp) == []

    decoded = decode_frames(path, WIDTH, HEIGHT).astype(int)
    assert decoded.shape[0] == NUM_FRAMES
    patch = decoded[:, 8:40, 4:24].reshape(NUM_FRAMES, -1, 3).mean(axis=1)
    grey = decoded[:, 8:40, 40:60].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(patch, np.broadcast_to(PATCH_RGB, patch.shape), atol=3)
    np.testing.assert_allclose(grey, 30 + np.arange(NUM_FRAMES), atol=2)


def test_short_audio_is_padded_with_silence_and_starts_at_frame_zero(dirs):
    path = dirs.out / "video.mp4"
    write_video(path, tone(3.0, silence_before=1.0))
    info = probe(path)
    assert info["audio_start"] == 0.0
    assert info["audio_duration"] == pytest.approx(NUM_FRAMES / FPS, abs=1 / FPS)
    sound = np.abs(decode_audio(path, RATE)) > 0.05
    onset, end = np.argmax(sound) / RATE, (len(sound) - np.argmax(sound[::-1])) / RATE
    assert onset == pytest.approx(1.0, abs=0.01) and end == pytest.approx(3.0, abs=0.01)


def test_without_audio_there_is_no_audio_stream(dirs):
    path = dirs.out / "video.mp4"
    writer = write_video(path, None, crf=30, preset="ultrafast")
    info = probe(path)
    assert info["audio_streams"] == 0 and info["frames"] == NUM_FRAMES and info["faststart"]
    with pytest.raises(RuntimeError, match="already closed"):
        writer.write(synthetic_frames(0, 1))


@pytest.mark.parametrize("frames_written", [NUM_FRAMES - 1, NUM_FRAMES + 1])
def test_wrong_frame_count_raises_and_keeps_the_previous_file(dirs, frames_written):
    path = dirs.out / "video.mp4"
    path.write_bytes(b"previous video")
    with pytest.raises(ValueError, match="frames"):
        with Mp4Writer(path, width=WIDTH, height=HEIGHT, num_frames=NUM_FRAMES, audio=tone(1.0)) as writer:
            writer.write(synthetic_frames(0, frames_written))
    assert path.read_bytes() == b"previous video"
    assert files_in(dirs.out) == ["video.mp4"] and files_in(dirs.temp) == []


@pytest.mark.parametrize("size", [(63, 48), (64, 47), (0, 48)])
def test_odd_or_empty_size_is_refused(dirs, size):
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(dirs.out / "video.mp4", width=size[0], height=size[1], num_frames=1, audio=None)
    assert files_in(dirs.out) == [] and files_in(dirs.temp) == []


def test_wrong_frame_shape_is_refused(dirs):
    with pytest.raises(ValueError, match="uint8 frames"):
        with Mp4Writer(dirs.out / "video.mp4", width=WIDTH, height=HEIGHT, num_frames=2, audio=None) as writer:
            writer.write(synthetic_frames(0, 2).astype(np.float32))
    assert files_in(dirs.out) == [] and files_in(dirs.temp) == []


def test_ffmpeg_failure_raises_its_message_and_leaves_nothing(dirs):
    with pytest.raises(RuntimeError, match="ffmpeg failed writing video.mp4: .*no-such-preset"):
        write_video(dirs.out / "video.mp4", tone(7.5), preset="no-such-preset")
    assert files_in(dirs.out) == [] and files_in(dirs.temp) == []


def test_frames_to_uint8_truncates_like_the_original():
    values = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.9999, 1.0, 2.0])
    video = values.view(1, 1, 1, 1, -1).expand(1, 3, 2, 1, -1)  # [1, 3, T=2, H=1, W=8]
    pixels = frames_to_uint8(video)
    assert pixels.shape == (2, 1, 8, 3) and pixels.dtype == torch.uint8
    expected = np.clip((values.numpy() + 1) / 2 * 255, 0, 255).astype(np.uint8)  # the original's numpy path
    assert pixels[0, 0, :, 0].tolist() == expected.tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    assert torch.equal(frames_to_uint8(video[0]), pixels)
    with pytest.raises(ValueError, match="expected video"):
        frames_to_uint8(video[:, :2])
