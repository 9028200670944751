"""Distilled LoRAs as switchable adapters: same numbers as merging by hand, exact base when off, bad files named."""

import copy
import re
from pathlib import Path

import pytest
import torch
from diffusers.hooks import HookRegistry
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_wan_lora_to_diffusers,
)
from safetensors.torch import load_file, save_file

from model.network.transformer_multitalk import MultiTalkTransformer3DModel
from model.runtime.lora import LoraError, load_lora, loaded_loras, use_lora
from model.runtime.memory import apply_offload
from model.weights.keymaps import original_dit_key_map
from model.weights.layout import find_layout, load_transformer
from model.weights.tiny import write_tiny_lora


@pytest.fixture(scope="module")
def base(tiny_weights) -> MultiTalkTransformer3DModel:
    return load_transformer(find_layout(tiny_weights["multitalk"]), torch.float32)


@pytest.fixture
def transformer(base) -> MultiTalkTransformer3DModel:
    return copy.deepcopy(base)


@pytest.fixture(scope="module")
def inputs(base) -> dict[str, torch.Tensor]:
    cfg, g = base.config, torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 36, 3, 8, 8, generator=g), timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 7, cfg.text_dim, generator=g),
        encoder_hidden_states_image=torch.randn(1, 257, cfg.image_dim, generator=g),
        audio_embeds=torch.randn(1, 1, 9, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=g),
        ref_target_masks=torch.ones(3, 8, 8),
    )


def run(model: MultiTalkTransformer3DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def merged_by_hand(base: MultiTalkTransformer3DModel, path: Path, scale: float) -> MultiTalkTransformer3DModel:
    """The base with the file merged into its weights: W += scale·(alpha/rank)·up@down (factor 1 without
    alpha), W += scale·diff, b += scale·diff_b."""
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    lora = {k.removeprefix("diffusion_model."): v for k, v in load_file(str(path)).items()}

    def ours(name: str) -> torch.nn.Parameter:
        return params[original_dit_key_map([name])[name]]

    with torch.no_grad():
        for key, tensor in lora.items():
            if key.endswith(".lora_down.weight"):
                module = key.removesuffix(".lora_down.weight")
                alpha = lora.get(f"{module}.alpha")
                factor = 1.0 if alpha is None else alpha.item() / tensor.shape[0]
                ours(f"{module}.weight").add_(scale * factor * lora[f"{module}.lora_up.weight"] @ tensor)
            elif key.endswith(".diff"):
                ours(key.removesuffix(".diff") + ".weight").add_(scale * tensor)
            elif key.endswith(".diff_b"):
                ours(key.removesuffix(".diff_b") + ".bias").add_(scale * tensor)
    return merged


def rewritten(source: Path, target: Path, edit) -> Path:
    """Copy of a LoRA file with its {key: tensor} dict passed through `edit`."""
    save_file(edit(load_file(str(source))), str(target))
    return target


@pytest.mark.parametrize("alpha", [8.0, None], ids=["alpha=2·rank", "no-alpha"])
def test_active_lora_equals_weights_merged_by_hand(base, transformer, inputs, tmp_path, alpha):
    path = write_tiny_lora(tmp_path / "lora.safetensors", base, rank=4, alpha=alpha)
    info = load_lora(transformer, path, "fast")
    assert (info.pairs, info.diffs, info.bias_diffs, info.ranks, info.has_alpha) == (24, 5, 25, (4,), alpha is not None)

    use_lora(transformer, "fast", 0.8)
    output, reference = run(transformer, inputs), run(merged_by_hand(base, path, 0.8), inputs)
    torch.testing.assert_close(output, reference, rtol=0, atol=1e-5)
    assert (output - run(base, inputs)).abs().max() > 0.1  # the LoRA matters


def test_lora_on_the_audio_adapter_modules(base, transformer, inputs, tmp_path):
    g = torch.Generator().manual_seed(1)
    lora = {}
    for module, (out_dim, in_dim) in {"blocks.1.audio_cross_attn.q_linear": (64, 64),
                                      "blocks.1.audio_cross_attn.kv_linear": (128, 32),
                                      "blocks.0.audio_cross_attn.proj": (64, 64), "audio_proj.proj3": (1024, 32)}.items():
        lora[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(2, in_dim, generator=g) * 0.2
        lora[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(out_dim, 2, generator=g) * 0.2
    lora["diffusion_model.blocks.0.norm_x.diff"] = torch.randn(64, generator=g) * 0.1
    lora["diffusion_model.blocks.0.norm_x.diff_b"] = torch.randn(64, generator=g) * 0.1
    save_file(lora, str(tmp_path / "audio.safetensors"))

    load_lora(transformer, tmp_path / "audio.safetensors", "audio")
    use_lora(transformer, "audio")
    torch.testing.assert_close(run(transformer, inputs), run(merged_by_hand(base, tmp_path / "audio.safetensors", 1.0), inputs),
                               rtol=0, atol=1e-5)


def test_no_lora_is_exactly_the_base_and_switching_is_repeatable(base, transformer, inputs, tmp_path):
    plain = run(base, inputs)
    load_lora(transformer, write_tiny_lora(tmp_path / "a.safetensors", base, seed=1, alpha=4.0), "a")
    load_lora(transformer, write_tiny_lora(tmp_path / "b.safetensors", base, rank=2, seed=2), "b")
    assert loaded_loras(transformer) == ["a", "b"]
    assert torch.equal(run(transformer, inputs), plain)  # loading activates nothing

    use_lora(transformer, "a")
    with_a = run(transformer, inputs)
    use_lora(transformer, None)
    assert torch.equal(run(transformer, inputs), plain)
    use_lora(transformer, "b", 1.3)
    with_b = run(transformer, inputs)
    use_lora(transformer, "a")
    assert torch.equal(run(transformer, inputs), with_a)
    use_lora(transformer, None)
    assert torch.equal(run(transformer, inputs), plain)
    assert not torch.equal(with_a, with_b)
    with pytest.raises(LoraError, match="no LoRA named 'c'"):
        use_lora(transformer, "c")


def _offloading_group(block: torch.nn.Module):
    return HookRegistry.check_if_exists_or_initialize(block).get_hook("group_offloading").group


def _onload_to_copies(model: MultiTalkTransformer3DModel) -> None:
    """Make each offloaded block onload as on a GPU. There (CUDA streams) diffusers keeps the block's CPU tensors and,
    while the block is onloaded, binds its parameters to device copies of them, which offloading drops by binding the
    CPU tensors again; a CPU onload binds the CPU tensors themselves, so no change to an onloaded block could be lost.
    """
    for block in model.blocks:
        cpu_tensors = {tensor: tensor.data for tensor in (*block.parameters(), *block.buffers())}

        def onload(cpu_tensors=cpu_tensors) -> None:
            for tensor, cpu_tensor in cpu_tensors.items():
                tensor.data = cpu_tensor.clone()

        def offload(cpu_tensors=cpu_tensors) -> None:
            for tensor, cpu_tensor in cpu_tensors.items():
                tensor.data = cpu_tensor

        group = _offloading_group(block)
        group.onload_, group.offload_ = onload, offload


def test_a_switch_while_a_block_is_onloaded_changes_the_weights_that_persist(base, inputs, tmp_path):
    """Under `offload blocks` on a GPU, a step that TeaCache skips leaves block 0 onloaded (prefetched by the hook
    outside the blocks, never run): a LoRA switch must still change the CPU weights the next onload copies."""
    path = write_tiny_lora(tmp_path / "lora.safetensors", base, rank=4)
    resident = copy.deepcopy(base)
    load_lora(resident, path, "fast")
    use_lora(resident, "fast")
    model = copy.deepcopy(base)
    load_lora(model, path, "fast")
    apply_offload(model, "blocks", "cpu")
    _onload_to_copies(model)

    _offloading_group(model.blocks[0]).onload_()
    use_lora(model, "fast")
    assert torch.equal(run(model, inputs), run(resident, inputs))
    _offloading_group(model.blocks[0]).onload_()
    use_lora(model, None)
    assert torch.equal(run(model, inputs), run(base, inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="prefetching (streamed offloading) needs CUDA")
def test_a_switch_after_a_skipped_step_under_offload_on_cuda_changes_the_weights_that_persist(base, inputs, tmp_path):
    path = write_tiny_lora(tmp_path / "lora.safetensors", base, rank=4)
    on_cuda = {name: value.cuda() for name, value in inputs.items()}
    skipped = {**on_cuda, "block_cache": lambda hidden_states, temb, timestep_proj, run_blocks: hidden_states}
    resident = copy.deepcopy(base)
    load_lora(resident, path, "fast")
    apply_offload(resident, "none", "cuda")
    use_lora(resident, "fast")
    model = copy.deepcopy(base)
    load_lora(model, path, "fast")
    apply_offload(model, "blocks", "cuda")

    plain = run(model, on_cuda)  # the first forward finds the blocks' order; from the next on, block 0 is prefetched
    run(model, skipped)
    use_lora(model, "fast")
    assert torch.equal(run(model, on_cuda), run(resident, on_cuda))
    run(model, skipped)
    use_lora(model, None)
    assert torch.equal(run(model, on_cuda), plain)


def test_lora_a_b_naming_and_missing_prefix_load_the_same(base, transformer, inputs, tmp_path):
    path = write_tiny_lora(tmp_path / "down_up.safetensors", base, alpha=2.0)
    renamed = rewritten(path, tmp_path / "a_b.safetensors", lambda lora: {
        k.removeprefix("diffusion_model.").replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
        for k, v in lora.items()})
    load_lora(transformer, path, "down_up")
    load_lora(transformer, renamed, "a_b")
    use_lora(transformer, "down_up")
    expected = run(transformer, inputs)
    use_lora(transformer, "a_b")
    assert torch.equal(run(transformer, inputs), expected)


def test_pair_targets_and_alpha_agree_with_diffusers_converter(base, transformer, tmp_path):
    path = write_tiny_lora(tmp_path / "lora.safetensors", base, alpha=8.0, with_diffs=False)
    load_lora(transformer, path, "fast")
    converted = _convert_non_diffusers_wan_lora_to_diffusers(load_file(str(path)))
    modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in converted}
    assert modules == {n for n, m in transformer.named_modules() if "fast" in getattr(m, "lora_A", {})}
    for name in modules:
        layer = transformer.get_submodule(name)
        theirs = converted[f"transformer.{name}.lora_B.weight"] @ converted[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(layer.lora_B["fast"].weight @ layer.lora_A["fast"].weight, theirs)


def _unknown_module(lora: dict) -> dict:
    return {**lora, "diffusion_model.blocks.0.self_attn.qq.lora_down.weight": torch.zeros(4, 64),
            "diffusion_model.blocks.0.self_attn.qq.lora_up.weight": torch.zeros(64, 4)}


def _wrong_shape(lora: dict) -> dict:
    return {**lora, "diffusion_model.blocks.1.ffn.2.lora_up.weight": torch.zeros(32, 4)}


@pytest.mark.parametrize("edit, key, reason", [
    (_unknown_module, "diffusion_model.blocks.0.self_attn.qq.lora_down.weight", "no module blocks.0.attn1.qq"),
    (_wrong_shape, "diffusion_model.blocks.1.ffn.2.lora_down.weight", r"lora_up \(32, 4\)"),
    (lambda lora: {"blocks.0.self_attn.q.weight": torch.zeros(64, 64)}, "", "no LoRA keys"),
], ids=["unknown-module", "wrong-shape", "no-lora-keys"])
def test_unusable_files_are_named_with_the_first_offending_key(base, transformer, inputs, tmp_path, edit, key, reason):
    path = rewritten(write_tiny_lora(tmp_path / "good.safetensors", base), tmp_path / "bad.safetensors", edit)
    with pytest.raises(LoraError, match=f"{re.escape(f'{path}: {key}')}.*{reason}"):
        load_lora(transformer, path, "bad")
    assert loaded_loras(transformer) == []
    assert torch.equal(run(transformer, inputs), run(base, inputs))


def test_unreadable_file_and_reused_name_are_refused(base, transformer, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(LoraError, match=f"{re.escape(str(corrupt))}: not a readable safetensors file"):
        load_lora(transformer, corrupt, "corrupt")
    with pytest.raises(LoraError, match="not a readable"):
        load_lora(transformer, tmp_path / "missing.safetensors", "missing")
    load_lora(transformer, write_tiny_lora(tmp_path / "lora.safetensors", base), "fast")
    with pytest.raises(LoraError, match="already loaded"):
        load_lora(transformer, tmp_path / "lora.safetensors", "fast")
