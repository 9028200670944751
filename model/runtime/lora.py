"""Distilled LoRAs (FusionX, lightx2v) as named adapters of a loaded transformer, switchable per request.

The server loads the 14B transformer once; one request may run the 8-step LoRA, the next none. So a
LoRA is not merged into the weights (as the original does, once, at start-up): its low-rank pairs go
to diffusers/peft as a named adapter, and `use_lora` picks which adapter (if any) runs and how strongly.

Published files use the original Wan key names: `diffusion_model.<module>.lora_down.weight` [r, in]
and `.lora_up.weight` [out, r] (or `lora_A`/`lora_B`, with or without the prefix), an optional
`.alpha`, and full-tensor deltas `.diff` (added to `<module>.weight`) and `.diff_b` (to `.bias`).
Module names are translated with the project's own key map, which knows every original tensor name
including the audio adapter's. diffusers' `_convert_non_diffusers_wan_lora_to_diffusers` is not used:
it drops `.diff` deltas (all but the head's) and every norm `.diff`/`.diff_b`, fails on audio-adapter
keys, and assumes the `diffusion_model.` prefix (a test checks that our pair targets equal its own).

- alpha: folded into `lora_up` as alpha/rank (factor 1 without alpha); peft then runs with
  lora_alpha = r, so its own scaling is just the request's strength. (The original ignores alpha.)
- `.diff` / `.diff_b`: peft cannot express a full delta of a norm weight, so these are kept beside the
  adapter and added in place (`p += strength · delta`) when it is activated; the parameter's previous
  value is saved and copied back when it is deactivated, so "no LoRA" is bit-identical to the base.
  With `offload blocks` both go to the blocks' CPU copies, which persist (a block left onloaded is
  offloaded first), never to a device copy that the next onload replaces.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open

from model.network.transformer_multitalk import MultiTalkTransformer3DModel
from model.runtime.memory import offload_onloaded_blocks
from model.weights.keymaps import original_dit_key_map

_PREFIX = "diffusion_model."
# key ending → role; `.diff` is not a suffix of `.diff_b`, so endings never overlap.
_ROLES = {
    ".lora_down.weight": "down", ".lora_A.weight": "down",
    ".lora_up.weight": "up", ".lora_B.weight": "up",
    ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
}
_DELTA_TARGET = {"diff": "weight", "diff_b": "bias"}

Target = tuple[str, str]  # (our module path, "weight" | "bias")
Groups = dict[str, dict[str, tuple[str, torch.Tensor]]]  # original module path → role → (key in the file, tensor)


class LoraError(ValueError):
    """A LoRA file that cannot be used on this transformer; the message names the file and the first offending key."""


@dataclass(frozen=True)
class LoraInfo:
    """What `load_lora` found in a file, for logs and status pages."""

    name: str
    path: Path
    pairs: int  # low-rank pairs (peft layers)
    diffs: int  # full weight deltas (`.diff`)
    bias_diffs: int  # full bias deltas (`.diff_b`)
    ranks: tuple[int, ...]  # distinct ranks of the pairs
    has_alpha: bool


@dataclass
class _Loras:
    """What peft does not hold: each LoRA's full deltas, and the active choice with the values it replaced."""

    deltas: dict[str, dict[Target, torch.Tensor]] = field(default_factory=dict)
    active: tuple[str, float] | None = None
    saved: dict[Target, torch.Tensor] = field(default_factory=dict)


def load_lora(transformer: MultiTalkTransformer3DModel, path: Path, name: str) -> LoraInfo:
    """Add the LoRA file at `path` as adapter `name`; what was active before stays active."""
    path = Path(path)
    loras = _loras(transformer)
    if name in loras.deltas:
        raise LoraError(f"{path}: a LoRA named {name!r} is already loaded")
    if not name or "." in name:  # peft keeps adapters in ModuleDicts, whose keys cannot hold dots
        raise LoraError(f"{path}: {name!r} cannot name a LoRA (empty or with a dot)")
    try:
        groups = _read_groups(path)
        pairs, deltas, ranks = _convert(transformer, groups)
    except LoraError as error:
        raise LoraError(f"{path}: {error}") from None
    if pairs:
        with warnings.catch_warnings():  # several named adapters on one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.load_lora_adapter(pairs, prefix=None, adapter_name=name)
    loras.deltas[name] = deltas
    active, strength = loras.active or (None, 1.0)
    use_lora(transformer, active, strength)  # peft has just activated the new adapter; undo that
    return LoraInfo(
        name=name, path=path, pairs=len(ranks), diffs=sum(a == "weight" for _, a in deltas),
        bias_diffs=sum(a == "bias" for _, a in deltas), ranks=tuple(sorted(set(ranks))),
        has_alpha=any("alpha" in parts for parts in groups.values()),
    )


def use_lora(transformer: MultiTalkTransformer3DModel, name: str | None, scale: float = 1.0) -> None:
    """Run the transformer with LoRA `name` at strength `scale` (1.0 = as trained), or with none."""
    loras = _loras(transformer)
    if name is not None and name not in loras.deltas:
        raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {sorted(loras.deltas)})")
    with torch.no_grad():
        offload_onloaded_blocks(transformer)  # the deltas must change the weights that persist, not a device copy
        for (module, attribute), value in loras.saved.items():
            getattr(_base_layer(transformer, module), attribute).copy_(value)
        loras.saved.clear()
        if name in getattr(transformer, "peft_config", {}):
            transformer.enable_lora()
            transformer.set_adapters(name, scale)
        elif getattr(transformer, "peft_config", None):
            transformer.disable_lora()
        for (module, attribute), delta in loras.deltas.get(name, {}).items():
            param = getattr(_base_layer(transformer, module), attribute)
            loras.saved[(module, attribute)] = param.detach().clone()
            _add_delta(param, delta, scale)
    loras.active = None if name is None else (name, scale)


def _add_delta(param: torch.Tensor, delta: torch.Tensor, scale: float) -> None:
    """`param += scale · delta` in the parameter's own dtype; a float8-stored one (weights='fp8-storage' keeps the
    blocks' Linear biases in float8, which has no arithmetic) is summed in fp32 and rounded back once, as its
    storage rounds every weight. The value before is saved by the caller, so switching back stays exact."""
    delta = delta.to(param.device)
    if param.dtype.itemsize == 1 and param.is_floating_point():
        param.copy_(param.float().add_(delta.float(), alpha=scale))
    else:
        param.add_(delta.to(param.dtype), alpha=scale)


def loaded_loras(transformer: MultiTalkTransformer3DModel) -> list[str]:
    return sorted(_loras(transformer).deltas)


def _loras(transformer: MultiTalkTransformer3DModel) -> _Loras:
    if not hasattr(transformer, "_multitalk_loras"):
        transformer._multitalk_loras = _Loras()
    return transformer._multitalk_loras


def _read_groups(path: Path) -> Groups:
    """The file's tensors (as fp32) grouped by module, `diffusion_model.` dropped from the module paths."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key).float() for key in f.keys()}
    except (OSError, SafetensorError) as error:
        raise LoraError(f"not a readable safetensors file ({error})") from error
    if not any(key.endswith(tuple(_ROLES)) for key in tensors):
        first = next(iter(tensors), "none")
        raise LoraError(f"no LoRA keys (lora_down/lora_up, lora_A/lora_B, alpha, diff, diff_b); first key: {first}")
    groups: Groups = {}
    for key, tensor in tensors.items():
        ending = next((e for e in _ROLES if key.endswith(e)), None)
        if ending is None:
            raise LoraError(f"{key}: not a LoRA key (expected an ending among {sorted(_ROLES)})")
        module = key.removeprefix(_PREFIX).removesuffix(ending)
        groups.setdefault(module, {})[_ROLES[ending]] = (key, tensor)
    return groups


def _convert(
    transformer: MultiTalkTransformer3DModel, groups: Groups,
) -> tuple[dict[str, torch.Tensor], dict[Target, torch.Tensor], list[int]]:
    """Groups → (peft state dict `<our module>.lora_A/B.weight`, full deltas by target, rank of each pair)."""
    ours = _our_names(groups)
    pairs: dict[str, torch.Tensor] = {}
    deltas: dict[Target, torch.Tensor] = {}
    ranks: list[int] = []
    for module, parts in groups.items():
        if ("down" in parts) != ("up" in parts) or ("alpha" in parts and "down" not in parts):
            key = next(iter(parts.values()))[0]
            raise LoraError(f"{key}: incomplete pair: has {sorted(parts)}, needs both lora_down and lora_up")
        if "down" in parts:
            (key, down), up = parts["down"], parts["up"][1]  # [r, in], [out, r]
            target = ours[f"{module}.weight"].removesuffix(".weight")
            weight = _parameter(transformer, target, "weight", key, linear=True)  # [out, in]
            if down.ndim != 2 or up.shape != (weight.shape[0], down.shape[0]) or down.shape[1] != weight.shape[1]:
                raise LoraError(f"{key}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} "
                                f"do not fit {target}.weight {tuple(weight.shape)}")
            factor = 1.0
            if "alpha" in parts:
                alpha_key, alpha = parts["alpha"]
                if alpha.numel() != 1:
                    raise LoraError(f"{alpha_key}: alpha must be one number, not of shape {tuple(alpha.shape)}")
                factor = alpha.item() / down.shape[0]
            pairs[f"{target}.lora_A.weight"] = down
            pairs[f"{target}.lora_B.weight"] = up * factor
            ranks.append(down.shape[0])
        for role, attribute in _DELTA_TARGET.items():
            if role in parts:
                key, delta = parts[role]
                target = ours[f"{module}.{attribute}"].removesuffix(f".{attribute}")
                param = _parameter(transformer, target, attribute, key)
                if delta.shape != param.shape:
                    raise LoraError(f"{key}: shape {tuple(delta.shape)} does not fit {target}.{attribute} {tuple(param.shape)}")
                deltas[(target, attribute)] = delta
    return pairs, deltas, ranks


def _our_names(groups: Groups) -> dict[str, str]:
    """Original tensor name (`<module>.weight` / `.bias`) → ours, for every tensor the groups touch."""
    names = [f"{module}.{attribute}" for module, parts in groups.items()
             for attribute in {_DELTA_TARGET.get(role, "weight") for role in parts}]
    return original_dit_key_map(names)


def _base_layer(transformer: MultiTalkTransformer3DModel, module: str) -> torch.nn.Module:
    """The module at `module`; for a layer peft has wrapped, the original layer inside it."""
    found = transformer.get_submodule(module)
    return found.get_base_layer() if isinstance(found, BaseTunerLayer) else found


def _parameter(
    transformer: MultiTalkTransformer3DModel, module: str, attribute: str, key: str, linear: bool = False
) -> torch.nn.Parameter:
    """Our `module`'s `attribute` parameter, which the file's `key` changes; LoraError when there is none."""
    try:
        layer = _base_layer(transformer, module)
    except AttributeError:
        raise LoraError(f"{key}: the transformer has no module {module}") from None
    if linear and not isinstance(layer, torch.nn.Linear):
        raise LoraError(f"{key}: {module} is a {type(layer).__name__}; LoRA pairs are supported on Linear layers only")
    param = getattr(layer, attribute, None)
    if not isinstance(param, torch.nn.Parameter):
        raise LoraError(f"{key}: {module} has no {attribute}")
    return param
