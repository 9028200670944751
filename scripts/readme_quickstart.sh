#!/usr/bin/env bash
# Run the README's quickstart command 1 exactly as written there (extracted from README.md, not
# copied), on a fresh data dir, then check the video it produced and stop the server it started.
# CI runs this before the README's test command (command 2), so the README cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

command=$(awk '/^# 1\./ { getline; print; exit }' README.md)
[ -n "$command" ] || { echo "README.md has no '# 1.' quickstart line" >&2; exit 1; }
video=$(grep -o -- '--out [^ ]*' <<<"$command" | tail -1 | cut -d' ' -f2)

export XDG_DATA_HOME
XDG_DATA_HOME=$(mktemp -d)  # a fresh machine: no tiny weights, no jobs yet
rm -f "$video"
trap 'pkill -f "multitalk serve" || true; rm -rf "$XDG_DATA_HOME"' EXIT

echo "README command 1: $command"
bash -c "$command"

frames=$(ffprobe -v error -select_streams v:0 -count_frames -show_entries stream=nb_read_frames -of csv=p=0 "$video")
audio=$(ffprobe -v error -select_streams a:0 -show_entries stream=codec_name -of csv=p=0 "$video")
echo "video: $video, $frames frames, audio $audio"
[ "$frames" = 181 ] && [ "$audio" = aac ]
