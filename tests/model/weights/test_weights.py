"""Loading the published layouts in place: equivalence, clear errors, memory, `multitalk weights check`."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.weights.layout import (
    INDEX_FILE,
    MULTITALK_DIR,
    WAN_ORIGINAL_DIR,
    find_layout,
    load_components,
    load_transformer,
)
from model.weights.streaming import WeightsError

from repo_paths import REPO_ROOT


@pytest.fixture(scope="module")
def components(tiny_weights):
    return {layout: load_components(find_layout(root)) for layout, root in tiny_weights.items()}


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_both_layouts_from_one_seed_load_identical_models(components):
    a, b = components["multitalk"], components["diffusers"]
    _state_equal(a.transformer, b.transformer)
    _state_equal(a.text_encoder.model, b.text_encoder.model)
    _state_equal(a.image_encoder.model, b.image_encoder.model)
    _state_equal(a.vae.vae, b.vae.vae)
    _state_equal(a.audio_encoder.model, b.audio_encoder.model)


def test_both_layouts_give_identical_outputs(components):
    g = torch.Generator().manual_seed(1)
    frame = torch.rand(1, 3, 1, 64, 64, generator=g) * 2 - 1
    outputs = {}
    for layout, c in components.items():
        context = c.text_encoder.encode(["a man and a woman talking in a car", "blurred details"])
        features = c.image_encoder.encode(frame)
        latent = c.vae.encode(torch.cat([frame, torch.zeros(1, 3, 8, 64, 64)], dim=2))
        audio = c.audio_encoder.encode(torch.randn(16000, generator=torch.Generator().manual_seed(2)).numpy()).embedding
        windows = audio[:9].unfold(0, 1, 1)[..., 0][:, None].expand(-1, 5, -1, -1)[None]  # [1, 9, 5, layers, dim]
        x = torch.cat([torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
                       torch.zeros(1, 4, 3, 8, 8), latent], dim=1)
        with torch.no_grad():
            out = c.transformer(x, torch.tensor([800.0]), context[0][None], features, windows[None], torch.ones(3, 8, 8)).sample
        outputs[layout] = (context[0], features, latent, audio, out, c.vae.decode(latent))
    for name, first, second in zip(("text", "image", "latent", "audio", "transformer", "decoded"), outputs["multitalk"], outputs["diffusers"]):
        torch.testing.assert_close(first, second, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_text_encoder_trims_to_real_tokens(components):
    encoder = components["multitalk"].text_encoder
    short, long = encoder.encode(["two people", "a man and a woman talking inside a car"])
    assert short.shape == (3, encoder.model.config.d_model)  # two words + </s>
    assert long.shape[0] == 10


@pytest.fixture
def multitalk_copy(tiny_weights, tmp_path):
    return Path(shutil.copytree(tiny_weights["multitalk"], tmp_path / "weights"))


def test_missing_shard_is_named(multitalk_copy):
    (multitalk_copy / WAN_ORIGINAL_DIR / "diffusion_pytorch_model-00004-of-00007.safetensors").unlink()
    with pytest.raises(WeightsError, match="diffusion_pytorch_model-00004-of-00007.safetensors"):
        find_layout(multitalk_copy)


def test_missing_adapter_is_named(multitalk_copy):
    (multitalk_copy / MULTITALK_DIR / "multitalk.safetensors").unlink()
    with pytest.raises(WeightsError, match="multitalk.safetensors"):
        find_layout(multitalk_copy)


def test_missing_tensor_is_named(multitalk_copy):
    adapter_path = multitalk_copy / MULTITALK_DIR / "multitalk.safetensors"
    adapter = load_file(str(adapter_path))
    del adapter["blocks.1.norm_x.bias"]
    save_file(adapter, str(adapter_path))
    with pytest.raises(WeightsError) as error:
        load_transformer(find_layout(multitalk_copy), torch.float32)
    assert "blocks.1.norm_audio.bias" in str(error.value)


def test_wrong_shape_is_named(multitalk_copy):
    adapter_path = multitalk_copy / MULTITALK_DIR / "multitalk.safetensors"
    adapter = load_file(str(adapter_path))
    adapter["blocks.0.audio_cross_attn.proj.bias"] = torch.zeros(3)
    save_file(adapter, str(adapter_path))
    with pytest.raises(WeightsError, match=r"blocks.0.audio_cross_attn.proj.bias .* shape \(3,\)"):
        load_transformer(find_layout(multitalk_copy), torch.float32)


def test_unexpected_tensor_is_named(multitalk_copy):
    adapter_path = multitalk_copy / MULTITALK_DIR / "multitalk.safetensors"
    adapter = load_file(str(adapter_path))
    adapter["blocks.0.audio_cross_attn.extra.weight"] = torch.zeros(2)
    save_file(adapter, str(adapter_path))
    with pytest.raises(WeightsError, match="audio_attn2.extra.weight|audio_cross_attn.extra"):
        load_transformer(find_layout(multitalk_copy), torch.float32)


def test_without_the_replacement_index_or_with_it_swapped_in(multitalk_copy, tiny_weights):
    reference = load_transformer(find_layout(tiny_weights["multitalk"]), torch.float32)
    replacement = multitalk_copy / MULTITALK_DIR / INDEX_FILE
    # The README's manual step: MultiTalk's index replaces Wan's (the user's own swap is honoured) ...
    shutil.copy(replacement, multitalk_copy / WAN_ORIGINAL_DIR / INDEX_FILE)
    _state_equal(load_transformer(find_layout(multitalk_copy), torch.float32), reference)
    # ... and with no replacement index at all the adapter file is still found next to Wan's index.
    replacement.unlink()
    (multitalk_copy / WAN_ORIGINAL_DIR / INDEX_FILE).unlink()
    _state_equal(load_transformer(find_layout(multitalk_copy), torch.float32), reference)


@pytest.mark.slow
def test_weights_check_cli(tiny_weights, multitalk_copy):
    ok = subprocess.run([sys.executable, "-m", "server.cli.main", "weights", "check", str(tiny_weights["diffusers"])],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "layout:  diffusers" in ok.stdout and "audio adapter" in ok.stdout and ok.stdout.strip().endswith("OK")
    (multitalk_copy / WAN_ORIGINAL_DIR / "Wan2.1_VAE.pth").unlink()
    bad = subprocess.run([sys.executable, "-m", "server.cli.main", "weights", "check", str(multitalk_copy), "--json"],
                         capture_output=True, text=True)
    report = json.loads(bad.stdout)
    assert bad.returncode == 1 and not report["ok"] and "Wan2.1_VAE.pth" in report["problems"][0]


@pytest.mark.slow
def test_sharded_load_peaks_well_under_twice_the_checkpoint_size(tmp_path):
    """Stream a ~170 MB 7-shard original-layout DiT; the load must not hold a second copy."""
    from model.network.transformer_multitalk import MultiTalkTransformer3DModel
    from model.weights.tiny import write_original_transformer

    torch.manual_seed(0)
    model = MultiTalkTransformer3DModel(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=8,
                                        text_dim=64, freq_dim=64, image_dim=64, added_kv_proj_dim=512, audio_layers=2,
                                        audio_dim=32, audio_intermediate_dim=32, audio_output_dim=32)
    wan, adapter_dir = tmp_path / "wan", tmp_path / "multitalk"
    write_original_transformer(model, wan, adapter_dir, shards=7)
    (wan / "config.json").write_text(json.dumps({"num_heads": 8}))
    files = sorted(wan.glob("*.safetensors")) + [adapter_dir / "multitalk.safetensors"]
    size = sum(f.stat().st_size for f in files)
    del model
    script = textwrap.dedent(f"""
        import json, psutil, torch
        from pathlib import Path
        from model.weights.layout import load_transformer_files
        files = [Path(p) for p in {[str(f) for f in files]!r}]
        before = psutil.Process().memory_info().rss
        model = load_transformer_files(files, {{"num_heads": 8}}, "original", audio_encoder_layers=2, audio_encoder_dim=32)
        # VmHWM: peak RSS of this address space (ru_maxrss would carry the parent's over fork+exec)
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak = int(status["VmHWM"].split()[0]) * 1024
        print(json.dumps({{"before": before, "peak": peak}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["before"]
    assert size > 150e6
    assert growth < 1.5 * size, f"load grew RSS by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"


def test_tiny_weights_cache_is_written_once_and_reused(tmp_path):
    from model.weights.layout import find_layout
    from model.weights.tiny import cached_tiny_weights

    first = cached_tiny_weights(tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    assert cached_tiny_weights(tmp_path) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamp
    assert find_layout(first).kind == "multitalk"
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folder left behind


def test_transformer_loads_in_the_requested_dtype_with_fp32_kept_modules(tiny_weights):
    """bf16 weights stay bf16 (accelerate would cast them back to the empty model's fp32), except the modules
    diffusers keeps in fp32 (norms, time embedding, modulation tables) and our audio norm."""
    model = load_transformer(find_layout(tiny_weights["multitalk"]), torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.ffn.net.0.proj.weight"] == torch.bfloat16
    assert dtypes["blocks.0.audio_attn.to_kv.weight"] == torch.bfloat16
    assert dtypes["blocks.0.norm_audio.weight"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert model.dtype == torch.bfloat16
