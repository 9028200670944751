"""Reading a golden folder: references, transforms, tolerance comparison, results."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

MANIFEST_SCHEMA = "multitalk-golden-manifest"


class Skip(Exception):
    """A check that cannot run here; the message is the reason."""


@dataclass
class CheckResult:
    name: str
    status: str  # PASS | FAIL | SKIPPED
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    reason: str = ""
    worst: str = ""  # the expected entry with the largest relative error

    def line(self) -> str:
        status = f"SKIPPED({self.reason})" if self.status == "SKIPPED" else self.status
        detail = f"  [{self.worst}]" if self.status == "FAIL" and self.worst else ""
        return f"{self.name} {self.max_abs:.3e} {self.max_rel:.3e} {status}{detail}"


class GoldenFolder:
    """Reads references (tensors, JSON values, whole files) relative to one golden folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        if self.manifest.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"{self.root}/manifest.json is not a {MANIFEST_SCHEMA}")
        self._tensor_files: dict[str, dict[str, torch.Tensor]] = {}

    def _tensors(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._tensor_files:
            self._tensor_files[file] = load_file(str(self.root / file))
        return self._tensor_files[file]

    def value(self, ref: dict) -> Any:
        if "tensor" in ref:
            tensor = self._tensors(ref["file"])[ref["tensor"]]
            return apply_transform(tensor, ref.get("transform"))
        if "json_path" in ref:
            return _json_path(json.loads((self.root / ref["file"]).read_text()), ref["json_path"])
        if ref.get("format") == "png":  # compare decoded RGB uint8 pixels
            with Image.open(self.root / ref["file"]) as image:
                return np.asarray(image.convert("RGB"))
        return self.root / ref["file"]

    def model_entry(self, name: str) -> dict:
        return self.manifest["models"][name]


def apply_transform(tensor: torch.Tensor, transform: str | None) -> torch.Tensor:
    """An input reference's value derived from its stored tensor (`first_human`, `zero_audio`); a subscript
    transform such as `video[:, :, ::8, ::8]` is applied by `subsample` instead (to the implementation's output)."""
    if transform is None:
        return tensor
    if transform == "first_human":
        return tensor[:1]
    if transform == "zero_audio":
        return torch.zeros_like(tensor)[-1:]
    if is_subscript(transform):
        return tensor  # stored already subsampled: the transform says how to cut the actual value
    raise Skip(f"unknown transform {transform!r}")


def is_subscript(transform: str | None) -> bool:
    return bool(transform) and _subscript(transform) is not None


def subsample(actual: Any, transform: str | None) -> Any:
    """The implementation's value cut as an expected reference's subscript transform says (`video[:, :, ::8, ::8]`:
    compare every 8th row and column), so a folder can store a large output at a fraction of its size."""
    if not is_subscript(transform):
        return actual
    return torch.as_tensor(actual)[_subscript(transform)]


def _subscript(transform: str) -> tuple | None:
    """`name[<slices>]` as a tuple of slices and integers, or None if `transform` is not of that form."""
    try:
        node = ast.parse(transform, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)):
        return None
    items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]

    def bound(expr: ast.expr | None) -> int | None:
        if expr is None:
            return None
        value = ast.literal_eval(expr)
        if not isinstance(value, int):
            raise ValueError(transform)
        return value

    try:
        return tuple(slice(bound(i.lower), bound(i.upper), bound(i.step)) if isinstance(i, ast.Slice)
                     else Ellipsis if isinstance(i, ast.Constant) and i.value is Ellipsis else bound(i) for i in items)
    except ValueError:
        return None


def _json_path(value: Any, path: list) -> Any:
    for i, step in enumerate(path):
        if step == "*":
            return [_json_path(item, path[i + 1:]) for item in value]
        value = value[step]
    return value


def _is_numeric(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray, bool, int, float)):
        return True
    return isinstance(value, list) and all(_is_numeric(v) for v in value)


def compare(actual: Any, expected: Any, tolerance: dict) -> tuple[float, float, bool]:
    """(max |a − e|, that relative to max |e|, pass) under `exact` or allclose(atol, rtol).

    Non-numeric values (strings, records of a pass's routing) must be equal.
    """
    if not _is_numeric(expected):
        equal = actual == expected
        return (0.0, 0.0, True) if equal else (float("inf"), float("inf"), False)
    a = torch.as_tensor(np.array(actual) if not isinstance(actual, torch.Tensor) else actual).double()
    e = torch.as_tensor(np.array(expected) if not isinstance(expected, torch.Tensor) else expected).double()
    if a.shape != e.shape:
        return float("inf"), float("inf"), False
    diff = (a - e).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
    if tolerance.get("exact"):
        return max_abs, max_rel, bool(torch.equal(a, e))
    ok = bool(torch.all(diff <= tolerance.get("atol", 0.0) + tolerance.get("rtol", 0.0) * e.abs()))
    return max_abs, max_rel, ok
