"""Sequence parallelism: two gloo processes under torchrun compute what one process computes (tiny weights)."""

import os
import subprocess
import sys

import pytest
import torch

from model.network.sequence_parallel import LocalTokens

from parallel_forward import tiny_transformer, velocities
from repo_paths import REPO_ROOT

pytestmark = [pytest.mark.slow]


def test_two_ranks_under_torchrun_match_one_process(tiny_weights, tmp_path):
    """Ulysses over 2 ranks (all-to-all over heads). A 3-frame video split in mid-frame covers the audio
    attention's padding to whole frames; a one-frame video, whose reference keys are spread over both ranks,
    covers the key gathering; the 2-speaker cases cover the cross-rank L-RoPE normalisation."""
    out = tmp_path / "velocities.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO_ROOT / "tests" / "parallel_forward.py"), str(out), str(tiny_weights["multitalk"]), "2"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]

    parallel = torch.load(out)
    single = velocities(tiny_transformer(tiny_weights["multitalk"]))
    # Each rank ran half the tokens: 96 of a 3-frame 8x16 grid → 48 (a frame and a half); 32 → 16.
    assert parallel.pop("shard_lengths").tolist() == [48, 16, 48]
    assert parallel.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-5, atol=1e-5, msg=name)


def test_local_tokens_pad_to_whole_frames_and_back():
    local = LocalTokens(start=5, stop=13, tokens_per_frame=4)  # tokens 5..12: frames 1..3
    assert local.frames == slice(1, 4)
    x = torch.arange(8.0).view(1, 8, 1)
    padded = local.pad_to_frames(x)
    assert padded.shape == (1, 12, 1)
    assert padded[0, :, 0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    torch.testing.assert_close(local.unpad(padded), x)


def test_indivisible_token_count_is_refused_naming_the_frame_size():
    class Mesh:
        def get_group(self):
            return None

        def size(self):
            return 2

    class Config:
        class context_parallel_config:
            _flattened_mesh = Mesh()

    with pytest.raises(ValueError, match="frame_size: .* divisible by 2, got 45"):
        LocalTokens.of(45, 15, Config())


def test_cli_generate_under_torchrun_writes_the_single_process_video(tiny_weights, example_inputs, tmp_path):
    """`torchrun --nproc-per-node 2 … generate --sequence-parallel 2` without a seed: the ranks agree on one,
    rank 0 alone writes the video, and it is the video one process makes with that seed."""
    import re

    common = ["generate", "--weights", str(tiny_weights["multitalk"]), "--image", str(example_inputs["image"]),
              "--audio", str(example_inputs["audio1"]), "--audio2", str(example_inputs["audio2"]),
              "--prompt", "two people talking", "--steps", "1", "--frame-size", "64x128", "--num-frames", "41"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    parallel = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "server.cli.main", *common, "--sequence-parallel", "2", "--out", str(tmp_path / "sp.mp4")],
                              env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert parallel.returncode == 0, parallel.stderr[-4000:]
    seed = re.search(r"seed (\d+)", parallel.stdout).group(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp.mp4"]  # rank 1's copy is gone

    single = subprocess.run([sys.executable, "-m", "server.cli.main", *common, "--seed", seed, "--out", str(tmp_path / "one.mp4")],
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    assert (tmp_path / "sp.mp4").read_bytes() == (tmp_path / "one.mp4").read_bytes()


def test_cli_refuses_sequence_parallel_without_torchrun(tiny_weights, example_inputs, tmp_path):
    run = subprocess.run([sys.executable, "-m", "server.cli.main", "generate", "--weights", str(tiny_weights["multitalk"]),
                          "--image", str(example_inputs["image"]), "--audio", str(example_inputs["audio1"]),
                          "--prompt", "x", "--out", str(tmp_path / "x.mp4"), "--sequence-parallel", "2"],
                         env={**os.environ, "WORLD_SIZE": "1"}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "torchrun --nproc-per-node 2" in run.stderr
