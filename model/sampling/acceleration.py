"""The `acceleration` presets: how many steps, which guidance, which cache or distilled LoRA.

The hosted API's field has no counterpart in the original; the mapping (DESIGN.md, spec App. B) is:
  none    — the original's defaults: 40 steps, 3-pass guidance (text 5, audio 4), shift 7 / 11.
  regular — the 8-step FusionX LoRA recipe when that LoRA is installed (text scale 1 → 2-pass guidance,
            audio 2, shift 2); otherwise TeaCache at threshold 0.2 (the original's default) on 40 steps.
  high    — the 4-step lightx2v LoRA recipe when installed (else FusionX at 4 steps); otherwise TeaCache
            at 0.3 on 20 steps.
A LoRA counts as installed when a loaded LoRA's name contains "fusionx" / "lightx2v" (case-insensitive).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from model.contract.fields import ACCELERATION
from model.sampling.guidance import GuidanceConfig
from model.sampling.schedule import DEFAULT_SHIFT


@dataclass(frozen=True)
class SamplingRecipe:
    steps: int
    shift: float
    guidance: GuidanceConfig
    teacache_threshold: float | None = None
    lora: str | None = None
    lora_scale: float = 1.0

    def describe(self) -> str:
        g = self.guidance
        parts = [f"steps={self.steps}", f"shift={self.shift:g}", f"text_scale={g.text_scale:g}",
                 f"audio_scale={g.audio_scale:g}", f"passes={len(g.pass_names)}"]
        if g.use_apg:
            parts.append("apg=on")
        parts.append(f"teacache={self.teacache_threshold:g}" if self.teacache_threshold is not None else "teacache=off")
        parts.append(f"lora={self.lora}@{self.lora_scale:g}" if self.lora else "lora=none")
        return " ".join(parts)


def _find(loras: Iterable[str], needle: str) -> str | None:
    return next((name for name in sorted(loras) if needle in name.lower()), None)


def recipe_for(acceleration: str, resolution: str, loras: Iterable[str] = ()) -> SamplingRecipe:
    if acceleration not in ACCELERATION.choices:
        raise ValueError(f"acceleration must be {ACCELERATION.limits}, got {acceleration!r}")
    loras = list(loras)
    base = SamplingRecipe(steps=40, shift=DEFAULT_SHIFT[resolution], guidance=GuidanceConfig(5.0, 4.0))
    distilled = GuidanceConfig(text_scale=1.0, audio_scale=2.0)
    fusionx, lightx2v = _find(loras, "fusionx"), _find(loras, "lightx2v")
    if acceleration == "none":
        return base
    if acceleration == "regular":
        if fusionx:
            return SamplingRecipe(8, 2.0, distilled, lora=fusionx)
        return replace(base, teacache_threshold=0.2)
    if lightx2v or fusionx:
        return SamplingRecipe(4, 2.0, distilled, lora=lightx2v or fusionx)
    return replace(base, steps=20, teacache_threshold=0.3)
