"""Kokoro-82M read from its published layout (the tiny checkpoint) and the pipeline's speech step."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from model.contract.errors import GenerationCancelled, InputError
from model.contract.request import GenerationRequest, SpokenText
from model.media.audio_input import SAMPLE_RATE
from model.speech import synthesis
from model.speech.text_rules import MAX_SPEED_UP
from model.speech.voices import HOSTED_VOICES, LOCAL_VOICES, local_voice

from repo_paths import REPO_ROOT


@pytest.fixture(scope="module")
def speaker(tiny_weights) -> synthesis.SpeechSynthesizer:
    return synthesis.SpeechSynthesizer(tiny_weights["multitalk"] / synthesis.KOKORO_DIR)


def test_every_hosted_voice_maps_to_a_distinct_local_voice_of_its_gender():
    locals_ = [voice.local for voice in HOSTED_VOICES]
    assert len(HOSTED_VOICES) == 20 and len(set(locals_)) == 20 and set(locals_) <= set(LOCAL_VOICES)
    for voice in HOSTED_VOICES:
        assert voice.local[1] == {"female": "f", "male": "m"}.get(voice.gender, voice.local[1]), voice.name
        assert voice.local[0] == ("a" if voice.accent == "American" else "b"), voice.name
    assert local_voice("af_heart") == "af_heart"
    with pytest.raises(KeyError):
        local_voice("Rachel")


def test_speech_is_24_khz_and_repeats_with_its_seed(speaker):
    first = speaker.synthesize("Do you know what we are eating?", "Sarah", "first_text_input", seed=3)
    assert first.dtype == np.float32 and 0.5 < len(first) / synthesis.SAMPLE_RATE < 5
    assert np.array_equal(first, speaker.synthesize("Do you know what we are eating?", "Sarah", "x", seed=3))
    assert not np.array_equal(first, speaker.synthesize("Do you know what we are eating?", "Sarah", "x", seed=4))
    assert not np.array_equal(first, speaker.synthesize("Do you know what we are eating?", "Roger", "x", seed=3))


def test_british_voices_read_with_the_british_pronunciation(speaker):
    assert speaker.phonemes("tomato", british=False) != speaker.phonemes("tomato", british=True)


def test_the_g2p_downloads_nothing():
    """misaki's own G2P downloads a spaCy model at first use; ours must not even try (in a fresh process, so that the
    G2P is built there, under the trap)."""
    script = ("import spacy.cli\n"
              "def trap(*args, **kwargs): raise SystemExit('a model download was attempted')\n"
              "spacy.cli.download = trap\n"
              "from model.speech.synthesis import offline_g2p\n"
              "print(offline_g2p(british=False)('It costs $12.50, Dr. Smith!')[0])\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dˈɑləɹz" in done.stdout and "," in done.stdout and "!" in done.stdout  # currency, numbers, punctuation


def test_a_text_with_nothing_to_speak_names_its_field(speaker):
    """The submit-time rules refuse a text without letters or digits; one whose words the G2P drops is refused here."""
    with pytest.raises(InputError) as error:
        speaker.synthesize("…", "Sarah", "text_input", seed=0)
    assert error.value.field == "text_input"


def test_missing_weights_say_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="multitalk weights download"):
        synthesis.SpeechSynthesizer(tmp_path)


def _text_request(tmp_path, *texts: str, num_frames: int = 41) -> GenerationRequest:
    spoken = [SpokenText(text, voice, field, voice_field) for text, (voice, field, voice_field) in
              zip(texts, [("Sarah", "first_text_input", "voice1"), ("Roger", "second_text_input", "voice2")])]
    return GenerationRequest(image=tmp_path / "a.png", audio=[], output=tmp_path / "o.mp4", prompt="p",
                             num_frames=num_frames, speech=spoken)


def test_speech_longer_than_the_video_is_spoken_faster_to_fit(tiny_pipeline, tmp_path):
    request = _text_request(tmp_path, "Do you know what we are eating?")  # 2.3 s of tiny speech; 1.64 s video
    at_normal_speed = tiny_pipeline.synthesizer.synthesize(request.speech[0].text, "Sarah", "x", seed=0)
    assert len(at_normal_speed) / synthesis.SAMPLE_RATE > 41 / 25, "the test's text must be longer than the video"
    [track] = tiny_pipeline.speak(request, seed=0, should_cancel=lambda: False)
    assert len(track) <= 41 / 25 * SAMPLE_RATE


def test_speech_that_would_need_more_than_the_speed_limit_names_the_last_text(tiny_pipeline, tmp_path):
    request = _text_request(tmp_path, "Hello.", "Do you know what we are eating? I think it is milky pie.")
    with pytest.raises(InputError) as error:
        tiny_pipeline.speak(request, seed=0, should_cancel=lambda: False)
    assert error.value.field == "second_text_input" and f"{MAX_SPEED_UP}× faster" in error.value.reason


def test_a_cancel_stops_the_synthesis(tiny_pipeline, tmp_path):
    with pytest.raises(GenerationCancelled, match="synthesising speech"):
        tiny_pipeline.speak(_text_request(tmp_path, "Hello."), seed=0, should_cancel=lambda: True)


def test_a_request_gives_speech_as_audio_or_text_not_both(tmp_path):
    request = _text_request(tmp_path, "Hello.")
    request.check()
    with pytest.raises(InputError, match="as audio or as text, not both"):
        replace(request, audio=[tmp_path / "a.wav"]).check()
    with pytest.raises(InputError) as error:
        replace(request, speech=[replace(request.speech[0], voice="Rachel")]).check()
    assert error.value.field == "voice1"
