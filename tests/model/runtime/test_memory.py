"""Memory options (model/memory.py): each changes the outputs only by its documented storage rounding.

Every test builds fresh tiny transformers (the options rewrite a model in place) and compares the
3-pass guidance batch with two speakers, so audio attention and the reference map run in every block.
"""

import gc
import itertools
import sys

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from model.network.audio_attention import AudioConditioning
from model.runtime.memory import (
    apply_offload,
    apply_weight_storage,
    is_block_linear,
    prepare_memory,
)
from model.runtime.pinned_blocks import pack_blocks, page_locked_bytes
from model.weights.layout import find_layout, load_transformer

from guidance_inputs import tiny_guidance_inputs

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _model(tiny_weights, dtype=torch.float32):
    # Loaded in fp32, then cast: the loader's own dtype argument is not what this file tests.
    return load_transformer(find_layout(tiny_weights["multitalk"]), torch.float32).to(dtype)


def _velocity(model, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Raw predictions [3, 16, 3, 8, 8] of one batched cond / drop-text / uncond forward, inputs on `device`."""
    generator = torch.Generator().manual_seed(0)
    kwargs = tiny_guidance_inputs(model, 2, generator).transformer_kwargs(5.0, dtype)
    kwargs = {name: value.to(device) if torch.is_tensor(value) else value for name, value in kwargs.items()}
    latent = torch.randn(1, 36, 3, 8, 8, generator=generator).to(dtype).expand(3, -1, -1, -1, -1)
    with torch.no_grad():
        return model(latent.to(device), torch.tensor([700.0], device=device).expand(3), **kwargs).sample


def _block_linears(model) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules() if is_block_linear(module, name)}


def _assert_differs(a: torch.Tensor, b: torch.Tensor, at_least: float = 1e-3) -> None:
    """The option did something: outputs differ by more than `at_least` of their scale."""
    assert (a - b).abs().max() > at_least * b.abs().max()


def test_block_linears_are_every_linear_layer_inside_the_blocks(tiny_weights):
    names = set(_block_linears(_model(tiny_weights)))
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj", "audio_attn.to_q", "audio_attn.to_kv",
                 "audio_attn.to_out", "ffn.net.0.proj", "ffn.net.2"}
    assert names == {f"blocks.{i}.{layer}" for i in range(2) for layer in per_block}


def test_offload_blocks_is_bit_identical(tiny_weights):
    from diffusers.hooks import HookRegistry

    expected = _velocity(_model(tiny_weights))
    model = _model(tiny_weights)
    apply_offload(model, "blocks", "cpu")  # cpu → cpu: the same hooks and copies, no accelerator needed
    assert all(HookRegistry.check_if_exists_or_initialize(block).get_hook("group_offloading") for block in model.blocks)
    seen = []
    model.blocks[0].audio_attn.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    for _ in range(2):  # the second forward runs on the hooks' state after the first
        assert torch.equal(_velocity(model), expected)
    assert all(isinstance(audio, AudioConditioning) for audio in seen) and len(seen) == 2


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `tensor`'s values: itself, or those inside a tensor subclass (torchao's int8)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [inner for name in names for inner in _plain_tensors(getattr(tensor, name))]
    return [tensor]


def _block_storage(block) -> torch.UntypedStorage:
    """The one storage holding all of `block`'s parameters and buffers, checked to be exactly their packed bytes:
    each plain tensor from a multiple of 64 bytes (torch's CPU alignment), none overlapping."""
    tensors = [plain for tensor in (*block.parameters(), *block.buffers()) for plain in _plain_tensors(tensor)]
    storage = tensors[0].untyped_storage()
    assert {tensor.untyped_storage().data_ptr() for tensor in tensors} == {storage.data_ptr()}
    assert storage.nbytes() == sum(-(-tensor.nbytes // 64) * 64 for tensor in tensors)
    spans = sorted((tensor.data_ptr() - storage.data_ptr(), tensor.nbytes) for tensor in tensors)
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(start + nbytes <= following for (start, nbytes), (following, _) in itertools.pairwise(spans))
    return storage


@pytest.mark.parametrize("weights", ["bf16", "fp8-storage", "int8"])
def test_offload_blocks_keeps_each_block_in_one_buffer_of_its_exact_bytes_and_frees_the_old_ones(tiny_weights, weights):
    resident = _model(tiny_weights, torch.bfloat16)
    prepare_memory(resident, weights, "none", "cpu")
    model = _model(tiny_weights, torch.bfloat16)
    apply_weight_storage(model, weights, "cpu")
    before = [StorageWeakRef(plain.untyped_storage()) for tensor in model.blocks.parameters()
              for plain in _plain_tensors(tensor)]
    apply_offload(model, "blocks", "cpu")
    assert len({_block_storage(block).data_ptr() for block in model.blocks}) == len(model.blocks)
    assert all(storage.expired() for storage in before)  # the packing copied each tensor once, keeping no original
    assert torch.equal(_velocity(model, torch.bfloat16), _velocity(resident, torch.bfloat16))


class _RecordingCudart:
    """Stands in for `torch.cuda.cudart()`: records host registrations, answers cudaHostRegister with `error`."""

    def __init__(self, error: int = 0):
        self.error, self.registered, self.unregistered = error, [], []

    def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:
        self.registered.append((address, nbytes))
        return self.error

    def cudaHostUnregister(self, address: int) -> int:
        self.unregistered.append(address)
        return 0

    def cudaGetErrorString(self, error: int) -> str:
        return "out of memory"


def test_pinning_registers_each_block_buffer_once_in_place_until_it_is_freed(tiny_weights, monkeypatch):
    """What the CUDA path asks of CUDA (the registration's effect needs a GPU: see the CUDA test below)."""
    cudart = _RecordingCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    before = page_locked_bytes()
    model = _model(tiny_weights)
    pack_blocks(model.blocks, pin=True)
    storages = [_block_storage(block) for block in model.blocks]
    assert cudart.registered == [(storage.data_ptr(), storage.nbytes()) for storage in storages]
    assert cudart.unregistered == []
    assert page_locked_bytes() - before == sum(storage.nbytes() for storage in storages)  # what /metrics reports
    del model, storages
    gc.collect()
    assert sorted(cudart.unregistered) == sorted(address for address, _ in cudart.registered)
    assert page_locked_bytes() == before


def test_a_refused_page_lock_names_the_block_and_the_cuda_error(tiny_weights, monkeypatch):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _RecordingCudart(error=2))
    with pytest.raises(RuntimeError, match=r"could not page-lock the \d+ bytes of host memory of block 0 for CUDA "
                                           r"copies: cudaHostRegister failed with error 2 \(out of memory\)"):
        pack_blocks(_model(tiny_weights).blocks, pin=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory and streamed offloading need CUDA")
@pytest.mark.parametrize("weights", ["bf16", "fp8-storage", "int8"])
def test_offload_blocks_on_cuda_streams_every_block_from_its_pinned_buffer(tiny_weights, weights):
    """diffusers keeps the packed, page-locked buffers as its CPU copies (no copy of its own), every block returns
    to them after each forward, and the outputs equal the resident model's."""
    from diffusers.hooks import HookRegistry

    resident = _model(tiny_weights, torch.bfloat16)
    prepare_memory(resident, weights, "none", "cuda")
    model = _model(tiny_weights, torch.bfloat16)
    prepare_memory(model, weights, "blocks", "cuda")
    storages = [_block_storage(block) for block in model.blocks]
    for block, storage in zip(model.blocks, storages):
        copies = HookRegistry.check_if_exists_or_initialize(block).get_hook("group_offloading").group.cpu_param_dict
        assert len(copies) == len(list(block.parameters()))
        for tensor, copy in copies.items():
            assert copy is not tensor  # a torchao weight's own copy would follow it to the GPU
            for plain in _plain_tensors(copy):
                assert plain.untyped_storage().data_ptr() == storage.data_ptr() and plain.is_pinned()
    expected = _velocity(resident, torch.bfloat16, "cuda")
    for _ in range(2):  # the second forward runs on the hooks' state after the first (prefetching)
        assert torch.equal(_velocity(model, torch.bfloat16, "cuda"), expected)
        assert [_block_storage(block).data_ptr() for block in model.blocks] == [s.data_ptr() for s in storages]


def test_offload_none_places_the_model_on_the_device(tiny_weights):
    model = _model(tiny_weights)
    apply_offload(model, "none", "meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_fp8_storage_equals_the_model_with_block_weights_rounded_to_fp8(tiny_weights):
    plain = _model(tiny_weights)
    reference = _model(tiny_weights)
    with torch.no_grad():
        for layer in _block_linears(reference).values():
            for param in layer.parameters():
                param.copy_(param.to(torch.float8_e4m3fn).float())

    model = _model(tiny_weights)
    apply_weight_storage(model, "fp8-storage", "cpu")
    cast = {name for name, module in model.named_modules()
            if getattr(module, "_diffusers_hook", None) and module._diffusers_hook.get_hook("layerwise_casting")}
    assert cast == set(_block_linears(model))  # embeddings, norms, proj_out and audio_proj stay fp32
    assert all(p.dtype == torch.float8_e4m3fn for layer in _block_linears(model).values() for p in layer.parameters())
    assert model.proj_out.weight.dtype == model.audio_proj.proj1.weight.dtype == torch.float32

    output = _velocity(model)
    assert torch.equal(output, _velocity(reference))  # the same fp32 computation on the same rounded weights
    _assert_differs(output, _velocity(plain))


def test_int8_equals_the_model_holding_the_dequantised_int8_weights(tiny_weights):
    from torchao.quantization import Int8Tensor

    model = _model(tiny_weights)
    apply_weight_storage(model, "int8", "cpu")
    layers = _block_linears(model)
    assert all(isinstance(layer.weight, Int8Tensor) and layer.weight.qdata.dtype == torch.int8 for layer in layers.values())
    assert type(model.proj_out.weight) is type(model.audio_proj.proj1.weight) is torch.nn.Parameter

    reference = _model(tiny_weights)
    with torch.no_grad():
        for name, layer in _block_linears(reference).items():
            layer.weight.copy_(layers[name].weight.dequantize())
    output = _velocity(model)
    torch.testing.assert_close(output, _velocity(reference), rtol=1e-4, atol=1e-5)
    _assert_differs(output, _velocity(_model(tiny_weights)))


def _fp8_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8: t [..., K] → (values [..., K] in float8_e4m3fn, fp32 scales [..., 1]), scale = amax/448
    computed in t's dtype (torchao's recipe)."""
    scale = (t.abs().amax(-1, keepdim=True) / FP8_MAX).float()
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _fp8_linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """What a float8 linear computes: row-wise fp8 activations × row-wise fp8 weights, fp32 accumulation."""
    xq, x_scale = _fp8_rowwise(x)  # [..., K]
    wq, w_scale = _fp8_rowwise(layer.weight.detach())  # [N, K]
    return ((xq.float() @ wq.float().T) * x_scale * w_scale.T + layer.bias.float()).to(x.dtype)


def test_fp8_runs_float8_matmuls_on_rowwise_fp8_weights_and_activations(tiny_weights, monkeypatch):
    """torchao quantises float8 only where it sees a capable GPU, but torch's CPU `_scaled_mm` is the same
    float8 GEMM: with the GPU checks answered "Hopper", torchao's own quantisation and matmul dispatch run
    here, the way the server prepares them (quantised on the CPU for a CUDA target)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torchao.quantization import Float8Tensor

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("torchao.quantization.quant_api._check_hardware_support", lambda granularity: None)
    plain = _model(tiny_weights, torch.bfloat16)
    model = _model(tiny_weights, torch.bfloat16)
    apply_weight_storage(model, "fp8", "cuda")

    layers = _block_linears(model)
    originals = _block_linears(plain)
    for name, layer in layers.items():
        assert isinstance(layer.weight, Float8Tensor)
        values, scale = _fp8_rowwise(originals[name].weight.detach())
        assert torch.equal(layer.weight.qdata.view(torch.uint8), values.view(torch.uint8))
        assert torch.equal(layer.weight.scale, scale)
    assert type(model.proj_out.weight) is torch.nn.Parameter

    class CountScaledMM(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountScaledMM.calls += func is torch.ops.aten._scaled_mm.default
            return func(*args, **(kwargs or {}))

    records = []
    for name, layer in layers.items():
        layer.register_forward_hook(lambda module, args, out, name=name: records.append((name, args[0], out)))
    with CountScaledMM():
        output = _velocity(model, torch.bfloat16)
    assert CountScaledMM.calls == len(records) == len(layers)  # one float8 GEMM per layer, no fallback
    for name, x, out in records:  # each layer, on the activations it really saw: within 2 bf16 ulps
        torch.testing.assert_close(out, _fp8_linear(x, originals[name]), rtol=2**-6, atol=1e-5)
    assert torch.isfinite(output).all()
    _assert_differs(output, _velocity(plain, torch.bfloat16), at_least=1e-2)


def test_fp8_keeps_a_token_whose_activations_are_all_zero_exact(tiny_weights, monkeypatch):
    """An all-zero input row (text padding or a silent speaker's audio tokens through layers with zero biases) has
    amax 0: without a floor its scale would be 0 and it would quantise to 0/0 = NaN, which attention spreads to every
    token (the first H200 run's fp8 output was all NaN, 2026-12-04). With the floor the row gives exactly the bias."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("torchao.quantization.quant_api._check_hardware_support", lambda granularity: None)
    model = _model(tiny_weights, torch.bfloat16)
    apply_weight_storage(model, "fp8", "cuda")
    layer = model.blocks[0].attn2.to_k
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    x[0, 1] = 0
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1], layer.bias.detach())


def test_fp8_refuses_devices_without_float8_matmuls(tiny_weights, monkeypatch):
    model = _model(tiny_weights, torch.bfloat16)
    with pytest.raises(ValueError, match=r"weights='fp8' needs float8 matmuls.*found device cpu"):
        apply_weight_storage(model, "fp8", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # Ampere
    with pytest.raises(ValueError, match=r"8\.9 or newer.*found CUDA capability 8\.6"):
        apply_weight_storage(model, "fp8", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match="needs a bfloat16 transformer, got torch.float32"):
        apply_weight_storage(_model(tiny_weights), "fp8", "cuda")
    assert type(model.blocks[0].ffn.net[2].weight) is torch.nn.Parameter  # refused before touching anything


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_quantised_modes_say_how_to_install_torchao(tiny_weights, monkeypatch, mode):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match=f"weights='{mode}' needs torchao: pip install torchao"):
        apply_weight_storage(_model(tiny_weights, torch.bfloat16), mode, "cuda")


@pytest.mark.parametrize("weights", ["int8", "fp8-storage"])
def test_prepare_memory_quantises_then_offloads(tiny_weights, weights):
    quantised = _model(tiny_weights)
    prepare_memory(quantised, weights, "none", "cpu")
    model = _model(tiny_weights)
    prepare_memory(model, weights, "blocks", "cpu")
    assert torch.equal(_velocity(model), _velocity(quantised))  # quantised weights move with their blocks


@pytest.mark.parametrize("weights", ["int8", "fp8-storage"])
def test_lora_adapters_keep_the_compute_dtype_while_their_base_layers_are_converted(tiny_weights, tmp_path, weights):
    from model.runtime.lora import load_lora
    from model.weights.tiny import write_tiny_lora

    model = _model(tiny_weights)
    load_lora(model, write_tiny_lora(tmp_path / "lora.safetensors", model, rank=4), "distilled")
    apply_weight_storage(model, weights, "cpu")
    base = model.blocks[0].attn1.to_q.base_layer
    adapter = model.blocks[0].attn1.to_q.lora_A["distilled"]
    # int8: a torchao tensor subclass; fp8-storage: a plain float8 tensor.
    assert type(base.weight.data) is not torch.Tensor or base.weight.dtype == torch.float8_e4m3fn
    assert type(adapter.weight.data) is torch.Tensor and adapter.weight.dtype == torch.float32
    assert all(".lora_" not in name for name in _block_linears(model))
    assert _velocity(model).isfinite().all()


@pytest.mark.parametrize("weights", ["bf16", "int8", "fp8-storage"])
def test_an_active_lora_with_full_deltas_runs_under_every_weight_storage(tiny_weights, tmp_path, weights):
    """The distilled LoRAs carry `.diff_b` deltas for the blocks' Linear biases, which fp8-storage keeps in float8
    (no arithmetic there): switching the LoRA on runs and changes the output, switching it off restores it."""
    from model.runtime.lora import load_lora, use_lora
    from model.weights.tiny import write_tiny_lora

    model = _model(tiny_weights, torch.bfloat16)
    load_lora(model, write_tiny_lora(tmp_path / "lora.safetensors", model, rank=4), "distilled")
    if weights != "bf16":
        apply_weight_storage(model, weights, "cpu")
    without = _velocity(model, torch.bfloat16)
    use_lora(model, "distilled", 1.0)
    with_lora = _velocity(model, torch.bfloat16)
    assert with_lora.isfinite().all()
    _assert_differs(with_lora, without)
    use_lora(model, None)
    assert torch.equal(_velocity(model, torch.bfloat16), without)
