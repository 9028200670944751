"""Speech synthesis for the text endpoints: text → the speech track a video is made from (Kokoro-82M)."""
