"""Reference image: safe loading, the original's resolution buckets, and its cover-resize + centre crop.

The bucket tables, the float `ceil` of the cover size, PIL's BILINEAR resize and torchvision's
`round` crop offsets are kept exactly as in MultiTalk's `resize_and_centercrop`, so the
conditioning pixels match the original bit for bit. Loading is stricter than the original's
`Image.open(path).convert("RGB")`: user uploads can be anything, so format, size and integrity are
checked before decoding, and images the original would mangle (EXIF-rotated photos, transparency,
16-bit greyscale, CMYK) are turned into the RGB picture a viewer would show.

The API runs the same `load_image` on every submitted image, so a file the worker could not decode
is refused at submit with a 422; the module therefore imports torch only where it makes a tensor
(the API process never loads torch).
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.contract.errors import InputError
from model.contract.fields import RESOLUTION

if TYPE_CHECKING:
    import torch

# key = target height / width (the original's strings, in its order) → (H, W); every size is a multiple of 64.
ASPECT_RATIO_627 = {  # ≈ 627² pixels: the `multitalk-480` bucket
    "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768),
    "0.82": (576, 704), "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512),
    "1.86": (832, 448), "2.00": (896, 448), "2.50": (960, 384), "2.83": (1088, 384),
    "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
}  # fmt: skip
ASPECT_RATIO_960 = {  # ≈ 960² pixels: the `multitalk-720` bucket
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408),
    "0.55": (704, 1280), "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024),
    "1.00": (960, 960), "1.14": (1024, 896), "1.31": (1088, 832), "1.50": (1152, 768),
    "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704), "2.20": (1408, 640),
    "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}  # fmt: skip
BUCKETS = {"480p": ASPECT_RATIO_627, "720p": ASPECT_RATIO_960}

# Decoders we accept. A whitelist, because Pillow would otherwise also try formats such as EPS,
# whose decoder runs Ghostscript on the upload.
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# What Pillow raises for malformed data, while opening (a BMP header cut short, a PNG text or ICC chunk
# that inflates past Pillow's limit, a WebP whose decoder will not start) as while decoding.
_MALFORMED_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def largest_bucket(resolution: str) -> tuple[int, int]:
    """(H, W) of `resolution`'s bucket with the most pixels: its largest request, which memory plans are sized for."""
    return max(BUCKETS[resolution].values(), key=lambda hw: hw[0] * hw[1])


def choose_bucket(src_h: int, src_w: int, resolution: str) -> tuple[str, tuple[int, int]]:
    """(key, (H, W)) of the bucket whose h/w is nearest the image's; ties go to the earlier entry, as the original."""
    if resolution not in BUCKETS:
        raise InputError(RESOLUTION.name, f"must be {RESOLUTION.limits}, got {resolution!r}")
    table = BUCKETS[resolution]
    ratio = src_h / src_w
    key = min(table, key=lambda k: abs(float(k) - ratio))  # min is stable: first of equal distances, like sorted()[0]
    return key, table[key]


def cover_size(src_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """Smallest scaled size covering the target, ceil'd in float64 as the original (0.35·1440 → 504, not 503)."""
    (src_h, src_w), (target_h, target_w) = src_hw, target_hw
    scale = max(target_h / src_h, target_w / src_w)
    return math.ceil(scale * src_h), math.ceil(scale * src_w)


def center_crop_offsets(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a centred crop, with torchvision's `int(round(·))` (Python's half-to-even)."""
    (h, w), (target_h, target_w) = size_hw, target_hw
    return int(round((h - target_h) / 2)), int(round((w - target_w) / 2))


def resize_and_center_crop(image: Image.Image, target_hw: tuple[int, int]) -> np.ndarray:
    """RGB image → uint8 [H, W, 3]: BILINEAR cover-resize (PIL antialiases when shrinking), then centre crop."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    size_h, size_w = cover_size((image.height, image.width), target_hw)
    resized = np.asarray(image.resize((size_w, size_h), resample=Image.BILINEAR))  # [h', w', 3]
    top, left = center_crop_offsets((size_h, size_w), target_hw)
    return resized[top : top + target_hw[0], left : left + target_hw[1]].copy()  # owned: not a view of PIL's buffer


def pixels_to_tensor(crop: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → float32 [1, 3, 1, H, W] in [−1, 1], as `(x/255 − 0.5)·2` in the original's order."""
    import torch  # here, not at the top: the API imports this module to check images and must not load torch

    pixels = torch.tensor(crop, dtype=torch.uint8).permute(2, 0, 1)[None, :, None]  # [1, 3, 1, H, W]
    return ((pixels / 255 - 0.5) * 2).contiguous()


def load_image(path: Path, field: str, max_pixels: int = 40_000_000, min_side: int = 64) -> Image.Image:
    """Open an uploaded image safely and return it as a fully decoded RGB picture, upright.

    The pixel count is checked from the header before anything is decoded (a few hundred bytes can
    claim gigapixels). Animated images give their first frame. Raises `InputError(field, …)` for a
    missing, empty, unreadable, truncated, corrupt, too large or too small image, and for anything
    Pillow refuses to open or decode, so a bad upload is never a server error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(field, "the image file was not found")
    if path.stat().st_size == 0:
        raise InputError(field, "the image file is empty")
    Image.init()
    formats = [name for name in ACCEPTED_FORMATS if name in Image.OPEN]
    with warnings.catch_warnings():
        # Pillow warns above its own limit (~89 MP) and raises above twice that: both mean too large.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=formats) as image:
                _check_size(image.width, image.height, field, max_pixels, min_side)
                return _decode_rgb(image)
        except InputError:
            raise  # a ValueError too, but already names the field and says why
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InputError(field, f"the image is too large to decode safely ({error})") from error
        except UnidentifiedImageError as error:  # an OSError: before the clause below
            raise InputError(
                field, f"not an image in a supported format (accepted: {', '.join(formats)})"
            ) from error
        except _MALFORMED_IMAGE_ERRORS as error:
            reason = f"the image data is truncated or corrupt, or uses a variant that cannot be decoded ({error})"
            raise InputError(field, reason) from error


def _check_size(width: int, height: int, field: str, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise InputError(field, f"the image is too large: {width}×{height} pixels, at most {max_pixels:,} allowed")
    if min(width, height) < min_side:
        raise InputError(field, f"the image is too small: {width}×{height} pixels, both sides must be ≥ {min_side}")


def _decode_rgb(image: Image.Image) -> Image.Image:
    """Decode the first frame fully (truncation and corruption surface here), turn it upright, make it RGB."""
    image.seek(0)
    image.load()
    upright = ImageOps.exif_transpose(image)
    return _to_rgb(upright)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB as a viewer shows it: transparency over white, high bit depths scaled to 8 bits."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(image)).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # RGB (a copy), L, 1, P, CMYK, YCbCr, ...


def _grey_to_uint8(image: Image.Image) -> np.ndarray:
    """High-depth greyscale → uint8 [H, W] (Pillow's own conversion clips, turning 16-bit images white).

    16-bit modes span 0..65535. Pillow also opens 16-bit PNG/TIFF files as 32-bit 'I', so 'I' values
    within 0..65535 are read as 16-bit; float 'F' values within 0..1 as unit intensities. Anything
    else has no defined range and is stretched from its minimum to its maximum.
    """
    values = np.asarray(image, dtype=np.float64)  # [H, W]
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        full_scale = 1.0
    elif image.mode != "F" and low >= 0.0 and high <= 65535.0:
        full_scale = 65535.0
    else:
        values = values - low
        full_scale = max(high - low, 1e-12)
    return np.rint(values * (255.0 / full_scale)).astype(np.uint8)
