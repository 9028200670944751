"""The memory plan of the published model: where a request's peak is, and what fits which GPU.

The numbers are measured on fake tensors (`tools/memory_plan.py`), so they are deterministic and may be
asserted; the headroom below is what the estimates on top of them (allocator margin, CUDA context) leave.
"""

import pytest
import torch

from model.runtime.memory_budget import (
    ACTIVATION_CASES,
    GiB,
    MemoryCase,
    MemoryPlan,
    keeps_text_encoder_on_cpu,
    predict,
    predicted_cases,
    published_plan,
)

GPU_80GB = 80 * GiB
GPU_24GB = 24 * GiB
HEADROOM = 0.9  # a prediction counts as fitting with headroom when it leaves a tenth of the GPU free
HOST_64GB = 64 * 10**9


def test_the_published_plan_has_every_case():
    plan = published_plan()
    assert sorted(plan.clip_activation) == sorted(f"{r}/{s}/{p}" for r, s, p in ACTIVATION_CASES)
    assert set(plan.weights) == {"transformer", "text_encoder", "image_encoder", "vae", "audio_encoder"}
    # 18.9B parameters in bf16 (Wan2.1-I2V's 16.4B + the audio adapter), and the linears at 1 byte about halve it.
    assert 37e9 < plan.transformer["bf16"] < 39e9
    assert plan.transformer["one_byte"] < 0.55 * plan.transformer["bf16"]


@pytest.mark.parametrize("passes", [2, 3])  # `regular` with the FusionX LoRA, or its TeaCache fallback without it
def test_the_default_request_fits_80_gb_with_headroom(passes):
    prediction = predict(MemoryCase("480p", 2, passes, "bf16", "none"), gpu_bytes=GPU_80GB)
    assert prediction.gpu_peak_bytes <= HEADROOM * GPU_80GB


def test_720p_with_3_passes_fits_80_gb_with_headroom_once_the_text_encoder_leaves_the_gpu():
    prediction = predict(MemoryCase("720p", 2, 3, "bf16", "none"), gpu_bytes=GPU_80GB)
    assert prediction.gpu_peak_bytes <= HEADROOM * GPU_80GB
    assert prediction.text_encoder_on_cpu  # with umT5 resident it would not
    assert not predict(MemoryCase("720p", 2, 3, "bf16", "none"), gpu_bytes=141 * GiB).text_encoder_on_cpu


@pytest.mark.parametrize("weights", ["bf16", "fp8", "int8"])
def test_offload_at_480p_fits_a_24_gb_gpu_and_64_gb_of_host_memory(weights):
    for speakers in (1, 2):
        prediction = predict(MemoryCase("480p", speakers, 3, weights, "blocks"), gpu_bytes=GPU_24GB)
        assert prediction.gpu_peak_bytes <= GPU_24GB
        assert prediction.host_bytes <= HOST_64GB
        assert prediction.text_encoder_on_cpu


def test_one_byte_weights_and_offload_each_lower_the_peak():
    for case in predicted_cases():
        if case.weights == "bf16" and case.offload == "none":
            peak = predict(case).gpu_peak_bytes
            for weights, offload in (("fp8", "none"), ("int8", "none"), ("bf16", "blocks")):
                smaller = MemoryCase(case.resolution, case.speakers, case.passes, weights, offload)
                assert predict(smaller).gpu_peak_bytes < peak


def test_the_text_encoder_stays_where_it_is_on_a_cpu_device_and_leaves_the_gpu_with_offload():
    assert not keeps_text_encoder_on_cpu("bf16", "none", torch.device("cpu"))
    assert keeps_text_encoder_on_cpu("bf16", "blocks", torch.device("cpu"))


def test_an_unmeasured_case_is_refused():
    with pytest.raises(ValueError, match="no measured clip"):
        MemoryCase("1080p")


@pytest.mark.slow
def test_the_published_plan_agrees_with_a_fresh_measurement_on_fake_tensors():
    from tools.memory_plan import measure

    fresh = measure(cases=[("480p", 1, 2)], log=lambda message: None)
    published = MemoryPlan.load()
    assert fresh.weights == published.weights
    assert fresh.transformer == published.transformer
    assert (fresh.text_activation, fresh.audio_activation) == (published.text_activation, published.audio_activation)
    assert fresh.clip_activation["480p/1/2"] == published.clip_activation["480p/1/2"]
