"""What a text to speak may be, and how much of it a video holds (torch-free rules the API and the worker share)."""

import pytest

from model.speech.text_rules import max_speech_chars, speech_length_problem, speech_text_problem


@pytest.mark.parametrize("text", ["Hello, world!", "Café au lait — 3 for €2.50… “quoted” ‘too’", "Zoë's naïve façade",
                                  "line one\nline two\ttabbed", "50% off: #1 deal (today) & more @ 5pm; a/b = c"])
def test_english_prose_is_speakable(text):
    assert speech_text_problem(text) is None


@pytest.mark.parametrize("text, found", [("smile 😀", "'😀'"), ("日本", "'日'"), ("Ωmega", "'Ω'"), ("zero\u200bwidth", "ZERO WIDTH SPACE"),
                                         ("rtl \u202e", "RIGHT-TO-LEFT OVERRIDE")])
def test_other_scripts_emoji_and_invisible_characters_are_named_with_their_position(text, found):
    problem = speech_text_problem(text)
    assert problem is not None and found in problem and "at position" in problem


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "…", "!!! ?"])
def test_a_text_without_words_is_refused(text):
    assert "must contain words" in speech_text_problem(text)


def test_the_limit_is_twenty_characters_per_second_of_video_for_all_texts_together():
    assert [max_speech_chars(frames, 25) for frames in (41, 136, 191, 241)] == [32, 108, 152, 192]
    assert speech_length_problem([("a", "x" * 32)], 41, 25) is None
    field, reason = speech_length_problem([("a", "x" * 20), ("b", "y" * 13)], 41, 25)
    assert field == "b" and "33 characters together with the text before it, at most 32 fit" in reason
    assert speech_length_problem([("a", "x" * 33), ("b", "y")], 41, 25)[0] == "a"
