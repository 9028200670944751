"""The whole pipeline on tiny weights: exact frame counts, sound, options, determinism, cancel, bad inputs."""

import subprocess
import sys
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.contract.errors import GenerationCancelled, InputError
from model.contract.request import GenerationRequest
from model.media.audio_input import SAMPLES_PER_FRAME
from model.pipeline import speaker_embeddings

from media_probe import ffprobe_or_skip, probe
from repo_paths import REPO_ROOT

SMALL = (64, 128)  # (H, W): every stage runs, at a size the CPU does in seconds


def _request(inputs, out: Path, **options) -> GenerationRequest:
    defaults = dict(num_frames=41, steps=1, frame_size=SMALL, seed=7)
    defaults.update(options)
    return GenerationRequest(image=inputs["image"], audio=[inputs["audio1"], inputs["audio2"]], output=out,
                             prompt="two people talking", **defaults)


def _assert_video(path: Path, frames: int, size=SMALL):
    ffprobe_or_skip()
    info = probe(path)
    assert info["frames"] == frames
    assert info["fps"] == "25/1"
    assert (info["video_codec"], info["pix_fmt"], info["audio_codec"]) == ("h264", "yuv420p", "aac")
    assert info["size"] == (size[1], size[0])
    assert abs(info["audio_duration"] - frames / 25) <= 1 / 25
    assert info["audio_start"] <= 1 / 25
    assert info["faststart"]


@pytest.mark.parametrize("frames", [41, 241])  # one clip; the most clips (181, the default, is clips of the same kind)
@pytest.mark.slow
def test_two_speakers_exact_frame_count_with_sound(tiny_pipeline, example_inputs, tmp_path, frames):
    result = tiny_pipeline.generate(_request(example_inputs, tmp_path / "v.mp4", num_frames=frames))
    assert result.num_frames == frames
    _assert_video(result.video, frames)


@pytest.mark.slow
def test_one_speaker_and_use_only_first_audio(tiny_pipeline, example_inputs, tmp_path):
    single = _request(example_inputs, tmp_path / "one.mp4", num_frames=61)
    single.audio = [example_inputs["audio1"]]
    _assert_video(tiny_pipeline.generate(single).video, 61)
    first_only = _request(example_inputs, tmp_path / "first.mp4", use_only_first_audio=True)
    _assert_video(tiny_pipeline.generate(first_only).video, 41)


@pytest.mark.slow
def test_720p_uses_its_schedule_shift(tiny_pipeline, example_inputs, tmp_path):
    result = tiny_pipeline.generate(_request(example_inputs, tmp_path / "720.mp4", resolution="720p"))
    assert "shift=11" in result.settings
    _assert_video(result.video, 41)


@pytest.mark.slow
def test_para_mode_with_unequal_tracks_and_explicit_boxes(tiny_pipeline, example_inputs, tmp_path):
    request = _request(example_inputs, tmp_path / "para.mp4", audio_mode="para",
                       speaker_boxes=[(100, 100, 600, 720), (700, 100, 1200, 720)])
    _assert_video(tiny_pipeline.generate(request).video, 41)


@pytest.mark.slow
def test_face_detection_falls_back_to_halves(tiny_pipeline, example_inputs, tmp_path):
    request = _request(example_inputs, tmp_path / "faces.mp4", speaker_placement="faces")
    _assert_video(tiny_pipeline.generate(request).video, 41)


@pytest.mark.slow
def test_same_seed_same_video_other_seed_other_video(tiny_pipeline, example_inputs, tmp_path):
    a = tiny_pipeline.generate(_request(example_inputs, tmp_path / "a.mp4", steps=2))
    b = tiny_pipeline.generate(_request(example_inputs, tmp_path / "b.mp4", steps=2))
    c = tiny_pipeline.generate(_request(example_inputs, tmp_path / "c.mp4", steps=2, seed=8))
    assert a.video.read_bytes() == b.video.read_bytes()
    assert a.video.read_bytes() != c.video.read_bytes()


@pytest.mark.slow
def test_progress_reports_every_step_and_cancel_stops_between_steps(tiny_pipeline, example_inputs, tmp_path):
    events = []
    tiny_pipeline.generate(_request(example_inputs, tmp_path / "p.mp4", num_frames=181, steps=2), events.append)
    sampling = [(e.clip, e.clips, e.step, e.steps) for e in events if e.stage == "sampling"]
    assert sampling == [(c, 3, s, 2) for c in (1, 2, 3) for s in (1, 2)]

    calls = []
    with pytest.raises(GenerationCancelled):
        tiny_pipeline.generate(_request(example_inputs, tmp_path / "x.mp4", steps=3),
                               should_cancel=lambda: calls.append(1) or len(calls) >= 2)
    assert len(calls) == 2
    assert not (tmp_path / "x.mp4").exists() and not list(tmp_path.glob(".x.mp4*"))


@pytest.mark.slow
def test_real_480p_bucket_end_to_end(tiny_pipeline, example_inputs, tmp_path):
    """The 16:9 example image in the 480p table: 448 × 896, the size users get."""
    request = _request(example_inputs, tmp_path / "480p.mp4", frame_size=None, acceleration="none")
    result = tiny_pipeline.generate(request)
    assert (result.height, result.width) == (448, 896)
    _assert_video(result.video, 41, size=(448, 896))


def _write_wav(path: Path, samples: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def _bad_inputs(inputs, tmp: Path):
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(inputs["image"].read_bytes()[:200])
    empty = tmp / "empty.wav"
    empty.write_bytes(b"")
    silent = _write_wav(tmp / "silent.wav", np.zeros(32000))
    huge = tmp / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)
    text = tmp / "notes.txt"
    text.write_text("not media")
    return [
        ("image_url", dict(image=corrupt)),
        ("image_url", dict(image=inputs["audio1"])),
        ("image_url", dict(image=huge)),
        ("image_url", dict(image=tmp / "missing.png")),
        ("first_audio_url", dict(audio=[empty, inputs["audio2"]])),
        ("first_audio_url", dict(audio=[inputs["image"], inputs["audio2"]])),
        ("second_audio_url", dict(audio=[inputs["audio1"], silent])),
        ("second_audio_url", dict(audio=[inputs["audio1"], text])),
        ("speaker_boxes", dict(speaker_boxes=[(0, 0, 100, 100), (1200, 0, 1400, 100)])),  # outside 1280 × 720
        ("speaker_boxes", dict(speaker_boxes=[(0, 0, 100, 100)])),  # one box for two speakers
        ("speaker_boxes", dict(speaker_boxes=[(50, 50, 50, 100), (600, 0, 700, 100)])),  # empty
        ("num_frames", dict(num_frames=40)),
        ("num_frames", dict(num_frames=242)),
        ("resolution", dict(resolution="1080p")),
        ("acceleration", dict(acceleration="max")),
        ("seed", dict(seed=-1)),
        ("audio_mode", dict(audio_mode="mix")),
    ]


def test_every_bad_input_is_an_error_naming_the_field(tiny_pipeline, example_inputs, tmp_path):
    base = _request(example_inputs, tmp_path / "never.mp4")
    for field, change in _bad_inputs(example_inputs, tmp_path):
        with pytest.raises(InputError) as error:
            tiny_pipeline.generate(replace(base, **change))
        assert error.value.field == field, (change, str(error.value))
        assert str(error.value).startswith(f"{field}: ")
    assert not (tmp_path / "never.mp4").exists()


@pytest.mark.slow
def test_cli_generate_writes_the_video_and_reports_bad_input(tiny_weights, example_inputs, tmp_path):
    common = [sys.executable, "-m", "server.cli.main", "generate", "--weights", str(tiny_weights["multitalk"]),
              "--image", str(example_inputs["image"]), "--audio", str(example_inputs["audio1"]),
              "--audio2", str(example_inputs["audio2"]), "--prompt", "two people talking", "--steps", "1",
              "--frame-size", "64x128", "--seed", "3"]
    root = REPO_ROOT
    ok = subprocess.run(common + ["--out", str(tmp_path / "cli.mp4"), "--num-frames", "41"], cwd=root,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "seed 3" in ok.stdout
    _assert_video(tmp_path / "cli.mp4", 41)
    bad = subprocess.run(common + ["--out", str(tmp_path / "bad.mp4"), "--num-frames", "500"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "num_frames: must be an integer from 41 to 241" in bad.stderr


def test_wav2vec2_sees_each_whole_track_and_its_features_are_cut_to_the_video(tiny_pipeline):
    """Speech longer than the video: features of the whole track, cut afterwards, as the original (wav2vec2 attends
    over its whole input, so encoding only the shown part would give other features)."""
    encoder = tiny_pipeline.components.audio_encoder
    track = (np.random.default_rng(0).standard_normal(16000 * 4) * 0.1).astype(np.float32)  # 4 s: 100 frames
    frames = 41
    [features] = speaker_embeddings(encoder, [track], frames)
    assert torch.equal(features, encoder.encode(track).embedding[:frames])
    shown_part_only = encoder.encode(track[: frames * SAMPLES_PER_FRAME]).embedding
    assert shown_part_only.shape == features.shape and not torch.allclose(features, shown_part_only, atol=1e-4)


def test_wav2vec2_reads_at_most_the_audio_context_limit_of_a_track(tiny_pipeline, monkeypatch):
    """The explicit memory limit: beyond AUDIO_CONTEXT_S (or the video's length) a track is not read."""
    import model.pipeline

    monkeypatch.setattr(model.pipeline, "AUDIO_CONTEXT_S", 2.0)
    encoder = tiny_pipeline.components.audio_encoder
    track = (np.random.default_rng(1).standard_normal(16000 * 4) * 0.1).astype(np.float32)
    [features] = speaker_embeddings(encoder, [track], 41)
    assert torch.equal(features, encoder.encode(track[: 2 * 16000]).embedding[:41])
    [longer_video] = speaker_embeddings(encoder, [track], 75)  # 3 s of video: read up to the video's end
    assert torch.equal(longer_video, encoder.encode(track[: 75 * SAMPLES_PER_FRAME]).embedding[:75])
