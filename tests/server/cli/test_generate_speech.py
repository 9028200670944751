"""`multitalk generate --text/--text2/--voice/--voice2`: the two-person text endpoint from the command line."""

import subprocess
import sys

import pytest

from media_probe import probe
from repo_paths import REPO_ROOT

pytestmark = pytest.mark.slow


def _generate(tiny_weights, example_inputs, out, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "server.cli.main", "generate", "--weights", str(tiny_weights["multitalk"]),
               "--image", str(example_inputs["image"]), "--prompt", "two people talk", "--steps", "1",
               "--frame-size", "32x64", "--num-frames", "41", "--seed", "2", "--out", str(out), *flags]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_two_texts_in_two_voices_make_the_video_and_its_sound(tiny_weights, example_inputs, tmp_path):
    done = _generate(tiny_weights, example_inputs, tmp_path / "talk.mp4", "--text", "Hello there.",
                     "--text2", "Hi, how are you?", "--voice2", "George")
    assert done.returncode == 0, done.stderr
    video = probe(tmp_path / "talk.mp4")
    assert video["frames"] == 41 and video["audio_streams"] == 1


def test_a_bad_text_or_voice_is_refused_naming_the_field(tiny_weights, example_inputs, tmp_path):
    emoji = _generate(tiny_weights, example_inputs, tmp_path / "no.mp4", "--text", "Hello 👋")
    assert emoji.returncode == 2 and "first_text_input: contains a character" in emoji.stderr
    voice = _generate(tiny_weights, example_inputs, tmp_path / "no.mp4", "--text", "Hello.", "--voice", "Rachel")
    assert voice.returncode == 2 and "invalid choice: 'Rachel'" in voice.stderr
    both = _generate(tiny_weights, example_inputs, tmp_path / "no.mp4", "--text", "Hello.",
                     "--audio", str(example_inputs["audio1"]))
    assert both.returncode == 2 and "as audio or as text, not both" in both.stderr
    alone = _generate(tiny_weights, example_inputs, tmp_path / "no.mp4", "--text2", "Hello.")
    assert alone.returncode == 2 and "--text2 is person 2's; give person 1's --text too" in alone.stderr
    assert not (tmp_path / "no.mp4").exists()
