"""How much GPU and host memory a request needs with the published weights, before anything is loaded.

The numbers come from `memory_plan.json`, which `tools/memory_plan.py --write` measures by running every
model at its published size on torch's fake tensors (no data, no kernels; every storage counted): the
weights of each model, the transformer's bytes per weight storage, and the peak activation bytes of
each phase of a request — text encoding, audio encoding, and one 81-frame clip (conditioning encode,
the denoising steps with every guidance pass batched, VAE decode) per resolution, speaker count and
number of guidance passes. A test re-measures a case and checks the file still agrees, so the numbers
follow the code.

`predict` composes them for a configuration: which weights are resident on the GPU during each phase,
plus that phase's activations, plus estimates for what fake tensors cannot see (the caching allocator's
rounding and fragmentation, the CUDA context), and the host memory (pinned offloaded blocks, the text
encoder kept in CPU memory, the transformer while it is converted on the CPU). The pipeline and
`multitalk doctor` use it: the text encoder leaves the GPU after encoding whenever keeping it there
would not leave room for the largest request (`text_encoder_fits`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

GiB = 2**30
PLAN_PATH = Path(__file__).with_name("memory_plan.json")

RESOLUTIONS = ("480p", "720p")
# (resolution, speakers, guidance passes) of the measured clips: 3 passes = `none` and the TeaCache fallbacks
# of `regular`/`high` (measured with TeaCache's residual cache), 2 passes = the distilled LoRA recipes.
ACTIVATION_CASES = tuple((r, s, p) for r in RESOLUTIONS for s in (1, 2) for p in (3, 2))
WEIGHT_MODES = ("bf16", "fp8", "fp8-storage", "int8")
OFFLOAD_MODES = ("none", "blocks")

# Estimates for what fake tensors do not see (not measured; the GPU proof compares them with a real run):
ALLOCATOR_MARGIN = 1.05  # the caching allocator rounds blocks up and fragments under varying shapes
CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS/cuDNN workspaces
HOST_BASELINE_BYTES = 4 * GiB  # Python, torch and the CUDA libraries, the server, decoded inputs
DEFAULT_GPU_BYTES = 80 * GiB  # H100 / A100 80 GB: the GPU the defaults are chosen for


@dataclass(frozen=True)
class MemoryCase:
    """One configuration: the request's size (the largest bucket of `resolution`) and the execution options."""

    resolution: str = "480p"
    speakers: int = 2
    passes: int = 3
    weights: str = "bf16"
    offload: str = "none"

    def __post_init__(self) -> None:
        if (self.resolution, self.speakers, self.passes) not in ACTIVATION_CASES:
            raise ValueError(f"no measured clip for {self.resolution}, {self.speakers} speaker(s), {self.passes} passes")
        if self.weights not in WEIGHT_MODES or self.offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown weights {self.weights!r} or offload {self.offload!r}")


@dataclass(frozen=True)
class MemoryPlan:
    """What `tools/memory_plan.py` measured (bytes)."""

    weights: dict[str, int]  # per model: transformer, text_encoder, image_encoder, vae, audio_encoder
    transformer: dict[str, int]  # bf16, one_byte, outside_blocks, block_bf16, block_one_byte, largest_block_linear_bf16
    text_activation: int
    audio_activation: int
    clip_activation: dict[str, int] = field(default_factory=dict)  # "480p/2/3" → bytes

    @classmethod
    def load(cls, path: Path = PLAN_PATH) -> "MemoryPlan":
        return cls(**json.loads(path.read_text()))

    def to_json(self) -> dict:
        return asdict(self)

    def clip(self, case: MemoryCase) -> int:
        return self.clip_activation[f"{case.resolution}/{case.speakers}/{case.passes}"]


@dataclass(frozen=True)
class MemoryPrediction:
    gpu_peak_bytes: int
    peak_phase: str  # "text", "audio" or "clip"
    host_bytes: int
    text_encoder_on_cpu: bool


@cache
def published_plan() -> MemoryPlan:
    return MemoryPlan.load()


def predict(case: MemoryCase, plan: MemoryPlan | None = None, gpu_bytes: int = DEFAULT_GPU_BYTES) -> MemoryPrediction:
    """Peak GPU memory and host memory of `case` on a GPU of `gpu_bytes`, with the text encoder on the GPU
    unless block offload keeps it in CPU memory or it does not fit beside the largest clip (`text_encoder_fits`)."""
    plan = plan or published_plan()
    on_cpu = case.offload == "blocks" or not text_encoder_fits(case, gpu_bytes, plan)
    phases = _gpu_phases(case, plan, text_encoder_resident=not on_cpu)
    phase = max(phases, key=phases.get)
    return MemoryPrediction(phases[phase], phase, _host_bytes(case, plan, on_cpu), on_cpu)


def text_encoder_fits(case: MemoryCase, gpu_bytes: int, plan: MemoryPlan | None = None) -> bool:
    """Whether umT5 can stay on the GPU between requests: the largest clip of `case`'s options (720p, 2 speakers,
    3 passes) still fits beside it."""
    plan = plan or published_plan()
    largest = MemoryCase("720p", 2, 3, case.weights, case.offload)
    return max(_gpu_phases(largest, plan, text_encoder_resident=True).values()) <= gpu_bytes


def keeps_text_encoder_on_cpu(weights: str, offload: str, device) -> bool:
    """Whether the pipeline keeps umT5-XXL (≈ 11 GB) in CPU memory, visiting the GPU once per request for the
    prompts: always with block offload (the small-GPU mode), and on a GPU too small for it beside the largest
    request of the published model under these options (bf16 on 80 GB: 720p with 3 passes needs the room).
    Never on a CPU device, where there is nothing to save."""
    import torch

    device = torch.device(device)
    if offload == "blocks":
        return True
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return not text_encoder_fits(MemoryCase(weights=weights, offload=offload), total)


def _transformer_on_gpu(case: MemoryCase, plan: MemoryPlan) -> int:
    t = plan.transformer
    if case.offload == "blocks":  # everything outside the blocks, the block running and the one being prefetched
        return t["outside_blocks"] + 2 * t["block_one_byte" if case.weights != "bf16" else "block_bf16"]
    return _transformer_bytes(case, plan)


def _gpu_phases(case: MemoryCase, plan: MemoryPlan, text_encoder_resident: bool) -> dict[str, int]:
    w = plan.weights
    resident = _transformer_on_gpu(case, plan) + w["image_encoder"] + w["vae"] + w["audio_encoder"]
    if text_encoder_resident:
        resident += w["text_encoder"]
    # A 1-byte block linear runs on a compute-dtype copy of its weight (fp8-storage, int8) or of its input (fp8).
    layer_copy = plan.transformer["largest_block_linear_bf16"] if case.weights != "bf16" else 0
    phases = {
        "text": resident + (0 if text_encoder_resident else w["text_encoder"]) + plan.text_activation,
        "audio": resident + plan.audio_activation,
        "clip": resident + plan.clip(case) + layer_copy,
    }
    return {name: int(size * ALLOCATOR_MARGIN) + CUDA_CONTEXT_BYTES for name, size in phases.items()}


def _host_bytes(case: MemoryCase, plan: MemoryPlan, text_encoder_on_cpu: bool) -> int:
    """Steady state or start-up, whichever is larger. A quantised or offloaded transformer is loaded in bf16 on the
    CPU and converted there (`ExecutionOptions.loads_on_cpu_first`); offloaded blocks then stay in CPU memory,
    pinned once at their exact size (one more block while they are packed)."""
    t = plan.transformer
    text = plan.weights["text_encoder"] if text_encoder_on_cpu else 0
    blocks = _transformer_bytes(case, plan) - t["outside_blocks"] if case.offload == "blocks" else 0
    steady = HOST_BASELINE_BYTES + text + blocks
    loads_on_cpu = case.weights != "bf16" or case.offload == "blocks"
    start = HOST_BASELINE_BYTES + text + (t["bf16"] + t["block_bf16"] if loads_on_cpu else 0)
    return max(steady, start)


def _transformer_bytes(case: MemoryCase, plan: MemoryPlan) -> int:
    return plan.transformer["one_byte" if case.weights != "bf16" else "bf16"]


def predicted_cases() -> list[MemoryCase]:
    """Every case of the published table: both resolutions, 1 and 2 speakers, 3 and 2 passes, bf16 / fp8 / int8
    (fp8-storage stores the same bytes as fp8), offload off and on."""
    return [MemoryCase(r, s, p, w, o) for r, s, p in ACTIVATION_CASES for w in ("bf16", "fp8", "int8")
            for o in OFFLOAD_MODES]
