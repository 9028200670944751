"""Stream checkpoint tensors into a model built on the meta device.

A 14B DiT is ~66 GB in fp32 on disk and ~38 GB in bf16 in memory, so a load must never hold two
copies: the model is built without storage (`accelerate.init_empty_weights`), the file headers are
read first to check every name and shape, and then the tensors are read one file at a time, cast to
the runtime dtype and placed on the target device one by one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open

from model.weights.keymaps import TensorRule

log = logging.getLogger(__name__)


class WeightsError(Exception):
    """A checkpoint is missing, incomplete or does not fit the model; the message names what and where."""


@dataclass
class CheckpointFiles:
    """Lazy key → file index over safetensors shards and/or torch `.pth` files.

    Safetensors are read through their headers (no data) until a tensor is asked for. A `.pth` file
    is opened with `torch.load(mmap=True)`, which maps the file instead of reading it.
    """

    files: list[Path]
    _file_of: dict[str, Path] = field(default_factory=dict, init=False)
    _pth: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, init=False)
    _meta: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for path in self.files:
            if not path.is_file():
                raise WeightsError(f"checkpoint file not found: {path}")
            for key, shape, dtype in self._header(path):
                if key in self._file_of and self._file_of[key] != path:
                    raise WeightsError(f"tensor {key!r} is in both {self._file_of[key]} and {path}")
                self._file_of[key] = path
                self._meta[key] = (shape, dtype)

    def _header(self, path: Path) -> Iterable[tuple[str, tuple[int, ...], str]]:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        piece = f.get_slice(key)
                        yield key, tuple(piece.get_shape()), str(piece.get_dtype())
            except Exception as exc:  # safetensors raises its own error types for broken headers
                raise WeightsError(f"cannot read safetensors file {path}: {exc}") from exc
        else:
            state = self._load_pth(path)
            for key, tensor in state.items():
                yield key, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")

    def _load_pth(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pth:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:
                raise WeightsError(f"cannot read torch checkpoint {path}: {exc}") from exc
            if not isinstance(state, dict):
                raise WeightsError(f"{path} does not hold a state dict")
            self._pth[path] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._pth[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for k, (shape, _) in self._meta.items()}

    def dtype_name(self, key: str) -> str:
        return self._meta[key][1]

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def read(self, keys: Iterable[str]) -> Iterable[tuple[str, torch.Tensor]]:
        """Yield (key, tensor), opening each file once, in file order."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self._file_of[key]].append(key)
        for path in self.files:
            wanted = by_file.get(path)
            if not wanted:
                continue
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in wanted:
                        yield key, f.get_tensor(key)
            else:
                state = self._load_pth(path)
                for key in wanted:
                    yield key, state[key]
                self._pth.pop(path, None)  # drop the mapping once its tensors are placed

    def release(self) -> None:
        self._pth.clear()


def plan_problems(
    expected: Mapping[str, tuple[int, ...]], source: CheckpointFiles, rules: Mapping[str, TensorRule]
) -> list[str]:
    """Everything that keeps `rules` from filling a model with these expected names → shapes:
    missing, unexpected, absent from the files, or of the wrong shape. Reads headers only."""
    shapes = source.shapes()
    missing = sorted(set(expected) - set(rules))
    unexpected = sorted(set(rules) - set(expected))
    absent = sorted({r.source for r in rules.values() if r.source not in shapes})
    wrong = [
        f"{rule.source} in {source.file_of(rule.source)} has shape {tuple(shapes[rule.source])}, "
        f"the model expects {expected[target]} for {target}"
        for target, rule in sorted(rules.items())
        if rule.transform is None and target in expected and rule.source in shapes
        and tuple(shapes[rule.source]) != expected[target]
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("not in the files", absent)):
        if names:
            problems.append(f"{label} {len(names)} tensor(s): {_preview(names)}")
    return problems + wrong


def load_into_empty_model(
    model: torch.nn.Module,
    source: CheckpointFiles,
    rules: Mapping[str, TensorRule],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    keep_in_fp32: Iterable[str] = (),
    tied: Mapping[str, str] | None = None,
    what: str = "model",
) -> None:
    """Fill every parameter/persistent buffer of a meta-device `model` from `source` via `rules`.

    rules: target name → source tensor rule. Raises `WeightsError` naming every missing, unexpected
    or misshapen tensor before anything is read. `keep_in_fp32`: module names (as in diffusers'
    `_keep_in_fp32_modules`) whose tensors stay fp32. `tied`: target → target it shares storage with
    (re-tied after loading, not read twice).
    """
    tied = dict(tied or {})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    problems = plan_problems(expected, source, rules)
    if problems:
        raise WeightsError(f"{what}: " + "; ".join(problems))

    fp32_modules = set(keep_in_fp32)
    targets_of: dict[str, list[str]] = defaultdict(list)
    for target, rule in rules.items():
        targets_of[rule.source].append(target)
    for source_key, tensor in source.read(targets_of):
        for target in targets_of[source_key]:
            rule = rules[target]
            value = rule.transform(tensor) if rule.transform else tensor
            if tuple(value.shape) != expected[target]:
                raise WeightsError(f"{what}: {source_key} gives shape {tuple(value.shape)} for {target}, expected {expected[target]}")
            keep = value.is_floating_point() and any(part in fp32_modules for part in target.split("."))
            target_dtype = torch.float32 if keep else (dtype if value.is_floating_point() else value.dtype)
            placed = value.to(device=device, dtype=target_dtype)
            if placed.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                # Still a view into the file's storage (mmap, arbitrary alignment), possibly through a
                # reshape or a q/k/v split. An own,
                # aligned copy releases the mapping and keeps matmul results independent of file offsets.
                placed = placed.clone()
            # dtype given explicitly: accelerate otherwise casts the value back to the empty model's (fp32) dtype.
            set_module_tensor_to_device(model, target, device, value=placed.contiguous(), dtype=target_dtype)
    source.release()

    for target, shared in tied.items():
        module_path, _, name = target.rpartition(".")
        owner_path, _, owner_name = shared.rpartition(".")
        setattr(model.get_submodule(module_path), name, getattr(model.get_submodule(owner_path), owner_name))
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise WeightsError(f"{what}: parameters left unloaded: {_preview(still_meta)}")


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … (+{len(names) - limit} more)" if len(names) > limit else "")
