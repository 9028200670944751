"""Where each speaker is: per-person region masks on the latent grid, from boxes or automatic placement.

The masks tell the audio attention which image tokens belong to which voice. They are drawn in
source-image pixels and then resized and cropped exactly like the image (nearest neighbour), so a
box keeps covering the same person after bucketing. Without boxes the original's default applies:
person 1 = left half, person 2 = right half. `detect_speaker_boxes` offers a better guess from faces.

Boxes here are `(x_min, y_min, x_max, y_max)` in source pixels (x = column, y = row), half-open.
The original's `bbox` JSON is read rows first (`[top, left, bottom, right]` despite its x/y
names); `boxes_from_original_bbox` converts it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from numbers import Real

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.contract.errors import InputError
from model.contract.request import Box
from model.media.image_input import center_crop_offsets, cover_size

logger = logging.getLogger(__name__)


DETECTION_MAX_SIDE = 1024  # faces are searched on a copy at most this big: Haar cost grows with the pixel count
MIN_FACE_FRACTION = 0.08  # smallest face side searched, as a share of the image's shorter side
BODY_WIDTH = 3.0  # a speaker's region is this many face widths wide (head, shoulders, gesturing hands)
HEADROOM = 0.6  # and starts this many face heights above the face (hair, head motion)


def boxes_from_original_bbox(bbox: dict[str, Sequence], field: str = "bbox") -> list[Box]:
    """The original's `{"person1": [top, left, bottom, right], ...}` (dict order = person order) → our boxes."""
    boxes = []
    for name, quad in bbox.items():
        if not isinstance(quad, (list, tuple)) or len(quad) != 4:
            raise InputError(field, f"{name} must be a list of 4 numbers [top, left, bottom, right]")
        top, left, bottom, right = quad
        boxes.append((left, top, right, bottom))
    return boxes


def default_boxes(src_h: int, src_w: int, face_scale: float = 0.05) -> list[Box]:
    """The original's two boxes: left and right halves with a `face_scale` margin (its exact float expressions)."""
    half = src_w // 2
    top, bottom = int(src_h * face_scale), int(src_h * (1 - face_scale))
    left = (int(half * face_scale), int(half * (1 - face_scale)))
    right = (int(half * face_scale + half), int(half * (1 - face_scale) + half))
    return [(left[0], top, left[1], bottom), (right[0], top, right[1], bottom)]


def validate_boxes(boxes: Sequence, src_h: int, src_w: int, num_speakers: int, field: str) -> list[Box]:
    """One box per speaker, each inside the image and covering at least one whole pixel (values are
    truncated like the original's int())."""
    if not isinstance(boxes, (list, tuple)):
        raise InputError(field, f"must be a list of {num_speakers} boxes [x_min, y_min, x_max, y_max]")
    if len(boxes) != num_speakers:
        raise InputError(field, f"needs one box per speaker: {num_speakers} expected, {len(boxes)} given")
    return [_validate_box(box, f"box {index + 1}", src_h, src_w, field) for index, box in enumerate(boxes)]


def _validate_box(box: object, name: str, src_h: int, src_w: int, field: str) -> Box:
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
        raise InputError(field, f"{name} must be 4 numbers [x_min, y_min, x_max, y_max], got {box!r}")
    x_min, y_min, x_max, y_max = box
    if x_min < 0 or y_min < 0 or x_max > src_w or y_max > src_h:
        raise InputError(field, f"{name} {list(box)} is not inside the {src_w}×{src_h} image")
    x_min, y_min, x_max, y_max = (int(v) for v in box)
    if not (x_min < x_max and y_min < y_max):
        raise InputError(field, f"{name} {list(box)} is empty: it needs x_min < x_max and y_min < y_max")
    return x_min, y_min, x_max, y_max


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def person_masks(
    src_hw: tuple[int, int],
    target_hw: tuple[int, int],
    latent_hw: tuple[int, int],
    num_speakers: int,
    boxes: Sequence | None = None,
    face_scale: float = 0.05,
    field: str = "speaker_boxes",
) -> torch.Tensor:
    """Masks [3, h, w] float32 0/1 (person 1, person 2, background) on the latent grid.

    One speaker: all ones (the single-person path ignores them; boxes are not used). Two speakers:
    each box is 1 in its own channel, the background is 1 where no box is; then the same cover
    resize and centre crop as the image, then the latent size, all nearest neighbour.
    """
    if num_speakers == 1:
        return torch.ones(3, *latent_hw)
    if num_speakers != 2:
        raise ValueError(f"MultiTalk drives one or two speakers, not {num_speakers}")
    src_h, src_w = src_hw
    if boxes is None:
        boxes = default_boxes(src_h, src_w, face_scale)
    else:
        boxes = validate_boxes(boxes, src_h, src_w, num_speakers, field)

    masks = torch.zeros(1, 3, src_h, src_w, dtype=torch.uint8)  # uint8: nearest only picks values; ¼ of float
    for person, (x_min, y_min, x_max, y_max) in enumerate(boxes):
        masks[0, person, y_min:y_max, x_min:x_max] = 1
    masks[0, 2] = (masks[0, :2].amax(dim=0) == 0).to(torch.uint8)

    size = cover_size(src_hw, target_hw)
    top, left = center_crop_offsets(size, target_hw)
    masks = F.interpolate(masks, size=size, mode="nearest")[:, :, top : top + target_hw[0], left : left + target_hw[1]]
    masks = F.interpolate(masks, size=latent_hw, mode="nearest")[0] > 0  # [3, h, w]
    for person in range(num_speakers):
        if not masks[person].any():
            raise InputError(
                field,
                f"box {person + 1} {list(boxes[person])} covers no part of the image that remains after cropping "
                f"it to the {target_hw[1]}×{target_hw[0]} video frame; move it towards the centre or make it larger",
            )
    return masks.float()


def detect_speaker_boxes(image: Image.Image, num_speakers: int = 2) -> list[Box] | None:
    """Speaker boxes from faces, person 1 leftmost; None unless exactly one face per speaker is found.

    Each person gets a region of `BODY_WIDTH` face widths centred on the face, from `HEADROOM` face
    heights above it to the image bottom, kept on its own side of the midpoints between neighbouring
    faces so that the regions never overlap.
    """
    faces = _detect_faces(image)
    rounded = [tuple(round(v) for v in face) for face in faces]
    logger.info("face detection: %d face(s) (x, y, w, h) %s, %d speaker(s) wanted", len(faces), rounded, num_speakers)
    if len(faces) != num_speakers:
        return None
    faces.sort(key=lambda face: face[0] + face[2] / 2)
    centres = [x + w / 2 for x, _, w, _ in faces]
    splits = [0.0] + [(a + b) / 2 for a, b in zip(centres, centres[1:])] + [float(image.width)]
    boxes = []
    for (_, y, w, h), centre, lo, hi in zip(faces, centres, splits, splits[1:]):
        x_min, x_max = max(lo, centre - BODY_WIDTH * w / 2), min(hi, centre + BODY_WIDTH * w / 2)
        boxes.append((math.ceil(x_min), int(max(0.0, y - HEADROOM * h)), int(x_max), image.height))
    logger.info("speaker boxes from faces, left to right: %s", boxes)
    return boxes


def _detect_faces(image: Image.Image) -> list[tuple[float, float, float, float]]:
    """Distinct prominent faces as (x, y, w, h) in source pixels.

    OpenCV's bundled Haar cascades need no model download. Frontal faces alone miss speakers turned
    towards each other, so profiles are searched too, in both directions (the cascade knows one
    side; the mirrored image gives the other). Detections whose centres fall inside a larger one are
    the same face; faces under half the largest one's size are background people or false alarms.
    """
    scale = min(1.0, DETECTION_MAX_SIDE / max(image.width, image.height))
    small = image.convert("L").resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    grey = cv2.equalizeHist(np.asarray(small))  # [h, w] uint8
    mirrored = np.ascontiguousarray(grey[:, ::-1])
    min_face = max(24, round(MIN_FACE_FRACTION * min(grey.shape)))
    frontal, profile = (_cascade(name) for name in ("frontalface_default", "profileface"))

    def detect(cascade: cv2.CascadeClassifier, pixels: np.ndarray) -> list[tuple[float, float, float, float]]:
        found = cascade.detectMultiScale(pixels, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
        return [tuple(float(v) for v in face) for face in found]

    width = grey.shape[1]
    candidates = detect(frontal, grey) + detect(profile, grey)
    candidates += [(width - x - w, y, w, h) for x, y, w, h in detect(profile, mirrored)]
    faces: list[tuple[float, float, float, float]] = []
    for x, y, w, h in sorted(candidates, key=lambda face: -face[2]):  # largest first: it represents its group
        centre_x, centre_y = x + w / 2, y + h / 2
        if not any(fx <= centre_x <= fx + fw and fy <= centre_y <= fy + fh for fx, fy, fw, fh in faces):
            faces.append((x, y, w, h))
    prominent = [face for face in faces if face[2] >= 0.5 * faces[0][2]]
    return [tuple(v / scale for v in face) for face in prominent]


@functools.cache
def _cascade(name: str) -> cv2.CascadeClassifier:
    return cv2.CascadeClassifier(cv2.data.haarcascades + f"haarcascade_{name}.xml")
