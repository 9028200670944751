"""Output video: generated frames → one H.264/AAC MP4, encoded once, streamed clip by clip.

The original writes an x264 file through imageio, cuts the audio into a WAV next to it and then
muxes the two with a second x264 encode. Here frames go to a single ffmpeg process as they are
generated (a long video is never held twice), the audio is fitted to the known frame count before
ffmpeg starts (so both streams start at 0 and end together), and the MP4 appears under its final
name only once ffmpeg has succeeded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import imageio_ffmpeg
import numpy as np
import torch

from model.media.audio_input import fit_length

_STDERR_TAIL_CHARS = 2000
_AAC_MAX_BITRATE = 128_000
# AAC-LC carries at most 6144 bits per 1024-sample frame and channel (6 bits per sample); ffmpeg
# clamps higher requests with a warning, so low sample rates get that maximum instead.
_AAC_BITS_PER_SAMPLE_MAX = 6


def frames_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] or [1, 3, T, H, W] in [−1, 1] → uint8 [T, H, W, 3] on the same device.

    Same rounding as the original: `((x + 1)/2)·255` in float32, clamped, then truncated.
    """
    if video.dim() == 5 and video.shape[0] == 1:
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected video [3, T, H, W] or [1, 3, T, H, W], got {tuple(video.shape)}")
    pixels = ((video.float() + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous()


def _ffmpeg_command(
    output: Path, width: int, height: int, fps: int, crf: int, preset: str, audio: Path | None, sample_rate: int
) -> list[str]:
    """rawvideo rgb24 on stdin (+ float32 mono audio file) → H.264 yuv420p BT.709 (+ AAC) MP4 with faststart."""
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-nostats", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:0",
    ]  # fmt: skip
    if audio is not None:
        command += ["-f", "f32le", "-ar", str(sample_rate), "-ch_layout", "mono", "-i", str(audio)]
    command += [
        "-map", "0:v:0",
        # Explicit BT.709 matrix and tags: players assume BT.709 for HD, and swscale's default is BT.601.
        "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,"
               "setparams=color_primaries=bt709:color_trc=bt709",
        "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-r", str(fps),
    ]  # fmt: skip
    if audio is not None:
        bitrate = min(_AAC_MAX_BITRATE, _AAC_BITS_PER_SAMPLE_MAX * sample_rate)
        command += ["-map", "1:a:0", "-c:a", "aac", "-b:a", str(bitrate)]
    return command + ["-movflags", "+faststart", "-f", "mp4", str(output)]


class Mp4Writer:
    """Encode exactly `num_frames` uint8 RGB frames (and optional mono audio) into an MP4 at `path`.

    Use as a context manager: `write()` each clip's frames [n, H, W, 3] as they are generated; on
    leaving the block without an exception the file is finished (`close()`), otherwise ffmpeg is
    stopped and nothing is left behind. The audio is cut or padded with silence to exactly
    `num_frames / fps` seconds. ffmpeg failures raise RuntimeError with the end of its log; wrong
    shapes or frame counts raise ValueError. Either way no partial file remains, and an existing
    file at `path` is only replaced by a complete one.
    """

    def __init__(
        self,
        path: Path,
        *,
        width: int,
        height: int,
        num_frames: int,
        audio: np.ndarray | None,
        sample_rate: int = 16000,
        fps: int = 25,
        crf: int = 18,
        preset: str = "medium",
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"yuv420p needs a positive, even width and height, got {width}x{height}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        if audio is not None and audio.ndim != 1:
            raise ValueError(f"audio must be mono [n], got shape {audio.shape}")
        self.path = Path(path)
        self.num_frames = num_frames
        self.frames_written = 0
        self._frame_shape = (height, width, 3)
        self._partial = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.partial")
        # Beside the output (in a server job's scratch folder, which is swept if the process is killed).
        self._workdir = Path(tempfile.mkdtemp(prefix=".multitalk-mp4-", dir=self.path.parent))
        self._log = (self._workdir / "ffmpeg.log").open("wb")
        self._process: subprocess.Popen | None = None
        try:
            audio_file = None
            if audio is not None:
                audio_file = self._workdir / "audio.f32"
                fit_length(audio, round(num_frames * sample_rate / fps)).astype("<f4").tofile(audio_file)
            command = _ffmpeg_command(self._partial, width, height, fps, crf, preset, audio_file, sample_rate)
            self._process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
            )
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Stream uint8 frames [n, H, W, 3] to ffmpeg."""
        with self._aborting_on_error() as process:
            if isinstance(frames, torch.Tensor):
                frames = frames.cpu().numpy()
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != self._frame_shape:
                raise ValueError(f"expected uint8 frames [n, {', '.join(map(str, self._frame_shape))}], "
                                 f"got {frames.dtype} {frames.shape}")  # fmt: skip
            if self.frames_written + frames.shape[0] > self.num_frames:
                raise ValueError(f"more than the announced {self.num_frames} frames written")
            process.stdin.write(np.ascontiguousarray(frames).data)
        self.frames_written += frames.shape[0]

    def close(self) -> int:
        """Finish encoding, move the MP4 into place and return the number of frames written."""
        with self._aborting_on_error() as process:
            if self.frames_written != self.num_frames:
                raise ValueError(f"{self.frames_written} frames written, {self.num_frames} announced")
            process.stdin.close()
            if process.wait() != 0:
                raise self._ffmpeg_error()
            os.replace(self._partial, self.path)
        self.abort()  # ffmpeg has exited: this only removes the temporary folder
        return self.frames_written

    def abort(self) -> None:
        """Stop ffmpeg if it runs and remove the partial output and the temporary files (idempotent)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        self._log.close()
        self._partial.unlink(missing_ok=True)
        shutil.rmtree(self._workdir, ignore_errors=True)

    @contextlib.contextmanager
    def _aborting_on_error(self) -> Iterator[subprocess.Popen]:
        """The running ffmpeg; any error inside aborts, and a closed pipe becomes ffmpeg's own error."""
        if self._process is None:
            raise RuntimeError(f"the writer for {self.path} is already closed")
        try:
            yield self._process
        except BrokenPipeError:
            error = self._ffmpeg_error()
            self.abort()
            raise error from None
        except BaseException:
            self.abort()
            raise

    def _ffmpeg_error(self) -> RuntimeError:
        """Why ffmpeg stopped, from the end of its log (once it has exited)."""
        self._process.wait()
        log = (self._workdir / "ffmpeg.log").read_text("utf-8", "replace").strip()
        return RuntimeError(f"ffmpeg failed writing {self.path.name}: {log[-_STDERR_TAIL_CHARS:] or 'no message'}")
