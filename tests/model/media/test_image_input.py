"""Reference image: buckets, cover size and crop arithmetic, safe loading of odd and hostile files, and
bit-exact crops of the extra example photos (shared/fixtures/set2) as the original produced them."""

import io
import os
import struct
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from model.contract.errors import InputError
from model.media.image_input import (
    ASPECT_RATIO_627,
    ASPECT_RATIO_960,
    center_crop_offsets,
    choose_bucket,
    cover_size,
    load_image,
    pixels_to_tensor,
    resize_and_center_crop,
)

from repo_paths import SHARED_DIR

FIXTURES_DIR = SHARED_DIR / "fixtures" / "set2"
FIELD = "image_url"


def fixtures_dir_or_skip() -> Path:
    """shared/fixtures/set2; skipped when absent (a user's clone), a failure under MULTITALK_REQUIRE_GOLDEN=1."""
    if FIXTURES_DIR.is_dir():
        return FIXTURES_DIR
    reason = f"example fixtures not found at {FIXTURES_DIR} (they live beside the project, in shared/)"
    if os.environ.get("MULTITALK_REQUIRE_GOLDEN") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC Pillow verifies."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR claiming width×height, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 16)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


# --- buckets and crop arithmetic ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("src_hw", "resolution", "expected"),
    [
        ((1080, 1920), "480p", ("0.50", (448, 896))),
        ((1080, 1920), "720p", ("0.55", (704, 1280))),
        ((1920, 1080), "480p", ("1.86", (832, 448))),
        ((1920, 1080), "720p", ("1.82", (1280, 704))),
        ((1000, 1000), "480p", ("1.00", (640, 640))),
        ((1000, 1000), "720p", ("1.00", (960, 960))),
    ],
)
def test_choose_bucket_examples(src_hw, resolution, expected):
    assert choose_bucket(*src_hw, resolution) == expected


def test_choose_bucket_tie_goes_to_the_earlier_key():
    # h/w = 0.32 lies exactly between "0.26" and "0.38" in real arithmetic; whichever float distance
    # is smaller must win, and on an exact tie the first key, as sorted(...)[0] in the original.
    for src_h, src_w in [(32, 100), (16, 50), (320, 1000)]:
        ratio = src_h / src_w
        expected = sorted(ASPECT_RATIO_627, key=lambda k: abs(float(k) - ratio))[0]
        assert choose_bucket(src_h, src_w, "480p")[0] == expected


def test_bucket_tables_keep_the_original_order_and_multiples_of_64():
    for table in (ASPECT_RATIO_627, ASPECT_RATIO_960):
        assert list(table) == sorted(table, key=float)
        assert all(h % 64 == 0 and w % 64 == 0 for h, w in table.values())
    assert len(ASPECT_RATIO_627) == 15 and len(ASPECT_RATIO_960) == 21


def test_unknown_resolution_names_the_field():
    with pytest.raises(InputError) as caught:
        choose_bucket(100, 100, "1080p")
    assert caught.value.field == "resolution"


def test_cover_size_uses_float_ceil():
    assert cover_size((1440, 2560), (448, 896)) == (504, 896)  # 0.35·1440 = 503.99999999999994 → 504
    assert cover_size((1440, 2560), (704, 1280)) == (720, 1280)
    assert cover_size((1000, 1000), (448, 896)) == (896, 896)
    assert cover_size((333, 1000), (320, 1216)) == (405, 1216)  # 1.216·333 = 404.93 → 405


def test_center_crop_offsets_round_half_to_even():
    assert center_crop_offsets((504, 896), (448, 896)) == (28, 0)
    assert center_crop_offsets((449, 896), (448, 896)) == (0, 0)  # round(0.5) = 0
    assert center_crop_offsets((451, 901), (448, 896)) == (2, 2)  # round(1.5) = 2, round(2.5) = 2


def test_resize_and_center_crop_shape_and_content():
    image = Image.new("RGB", (300, 100), (10, 20, 30))
    image.paste((200, 0, 0), (0, 0, 50, 100))  # a red left sixth, well inside the part cropped away
    crop = resize_and_center_crop(image, (64, 64))
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8 and crop.flags.writeable
    assert (crop == (10, 20, 30)).all()


def test_pixels_to_tensor_range_and_layout():
    crop = np.zeros((4, 6, 3), dtype=np.uint8)
    crop[..., 1] = 255
    crop[0, 0] = (0, 128, 51)
    tensor = pixels_to_tensor(crop)
    assert tensor.shape == (1, 3, 1, 4, 6) and tensor.dtype == torch.float32
    assert tensor[0, :, 0, 1, 1].tolist() == [-1.0, 1.0, -1.0]
    expected = (torch.tensor([0, 128, 51], dtype=torch.uint8) / 255 - 0.5) * 2
    assert torch.equal(tensor[0, :, 0, 0, 0], expected)


@pytest.mark.parametrize("resolution", ["480p", "720p"])
@pytest.mark.parametrize(
    ("source", "reference"), [("single1.png", "single1_cond_crop_{}.png"), ("multi3.png", "cond_crop_{}.png")]
)
def test_crop_matches_original_on_example_photos(source, reference, resolution):
    folder = fixtures_dir_or_skip()
    image = load_image(folder / source, FIELD)
    _, target_hw = choose_bucket(image.height, image.width, resolution)
    expected = rgb(folder / reference.format(resolution[:-1]))
    assert np.array_equal(resize_and_center_crop(image, target_hw), expected)


# --- loading: odd but valid images ----------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (120, 80), (0, 200, 0))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = np.asarray(load_image(tmp_path / "rotated.jpg", FIELD))
    assert loaded.shape == (120, 80, 3)
    assert loaded[5, -5, 0] > 200 and loaded[5, 5, 0] < 50  # the marker is now top-right


@pytest.mark.parametrize(
    ("mode", "colour", "options"),
    [("RGBA", (0, 0, 0, 0), {}), ("LA", (0, 0), {}), ("P", 0, {"transparency": 0})],
    ids=["RGBA", "LA", "P-transparency"],
)
def test_transparency_is_composited_on_white(tmp_path, mode, colour, options):
    Image.new(mode, (80, 64), colour).save(tmp_path / "clear.png", **options)
    loaded = load_image(tmp_path / "clear.png", FIELD)
    assert loaded.mode == "RGB" and (np.asarray(loaded) == 255).all()


def test_half_transparent_black_becomes_mid_grey(tmp_path):
    Image.new("RGBA", (80, 64), (0, 0, 0, 128)).save(tmp_path / "half.png")
    assert (np.asarray(load_image(tmp_path / "half.png", FIELD)) == 127).all()


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", "png"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif")])
def test_high_depth_greyscale_is_scaled_not_clipped(tmp_path, mode, suffix):
    ramp = np.linspace(0.0, 1.0, 64 * 128).reshape(64, 128)
    if mode == "F":
        image = Image.fromarray(ramp.astype(np.float32))
    elif mode == "I":
        image = Image.fromarray((ramp * 65535).astype(np.int32))
    else:
        image = Image.frombytes(mode, (128, 64), (ramp * 65535).astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    image.save(tmp_path / f"grey.{suffix}")
    loaded = np.asarray(load_image(tmp_path / f"grey.{suffix}", FIELD))
    assert loaded[0, 0].tolist() == [0, 0, 0] and loaded[-1, -1].tolist() == [255, 255, 255]
    assert abs(int(loaded[32, 64, 0]) - 128) <= 2  # mid-ramp is mid-grey, not white


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (80, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    loaded = np.asarray(load_image(tmp_path / "cmyk.jpg", FIELD)).astype(int)
    assert loaded.shape == (64, 80, 3) and np.abs(loaded - (255, 0, 0)).max() <= 3


@pytest.mark.parametrize("suffix", ["gif", "png", "webp"])
def test_animated_image_gives_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (80, 64), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / f"anim.{suffix}", save_all=True, append_images=frames[1:], lossless=True)
    loaded = np.asarray(load_image(tmp_path / f"anim.{suffix}", FIELD)).astype(int)
    assert np.abs(loaded - (255, 0, 0)).max() <= 3


# --- loading: unusable files ----------------------------------------------------------------------


def _write_wav(path: Path) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(np.zeros(1600, dtype="<i2").tobytes())


def _truncated(suffix: str):
    def write(path: Path) -> None:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path.with_suffix(f".full.{suffix}"))
        path.write_bytes(path.with_suffix(f".full.{suffix}").read_bytes()[:20_000])

    return write


BAD_FILES = {
    "missing": (lambda path: None, "not found"),
    "empty": (lambda path: path.write_bytes(b""), "empty"),
    "text": (lambda path: path.write_text("hello, this is not a picture\n"), "not an image"),
    "wav-named-png": (_write_wav, "not an image"),
    "truncated-png": (_truncated("png"), "truncated or corrupt"),
    "truncated-jpeg": (_truncated("jpg"), "truncated or corrupt"),
    "bomb-header": (lambda path: png_header_only(path, 100_000, 100_000), "too large"),
    "too-small": (lambda path: Image.new("RGB", (63, 500)).save(path, format="PNG"), "too small"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unusable_file_raises_input_error_naming_the_field(tmp_path, name):
    write, reason = BAD_FILES[name]
    path = tmp_path / "upload.png"
    write(path)
    with pytest.raises(InputError) as caught:
        load_image(path, FIELD)
    assert caught.value.field == FIELD
    assert reason in caught.value.reason


# --- loading: hostile files that Pillow refuses while opening or decoding (issue 15) -----------------
# Each once escaped `load_image` as an OSError or ValueError, ending a job as a 500 instead of a 422.


def _encoded(format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 80), (200, 40, 10)).save(buffer, format=format, **options)
    return buffer.getvalue()


def _png_with_chunk_inflating_past_pillows_limit(kind: bytes, head: bytes) -> bytes:
    """A valid PNG with one extra ancillary chunk after IHDR: `head`, then zlib data that inflates to
    one byte more than PngImagePlugin.MAX_TEXT_CHUNK (Pillow's ValueError "Decompressed data too large")."""
    png = _encoded("PNG")
    after_ihdr = 8 + 12 + 13  # signature, then IHDR: length, type, 13 data bytes, CRC
    inflating = zlib.compress(b"\0" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), 9)
    return png[:after_ihdr] + png_chunk(kind, head + inflating) + png[after_ihdr:]


def _webp_with_zeroed_vp8_payload() -> bytes:
    webp = bytearray(_encoded("WEBP", lossless=False))
    assert webp[12:16] == b"VP8 "  # simple lossy layout: RIFF header, then the one VP8 chunk
    size = struct.unpack("<I", webp[16:20])[0]
    webp[20 : 20 + size] = bytes(size)
    return bytes(webp)


def _bmp_with_bit_count(bits: int) -> bytes:
    bmp = bytearray(_encoded("BMP"))
    bmp[28:30] = struct.pack("<H", bits)  # biBitCount: file header (14) + 14 bytes into BITMAPINFOHEADER
    return bytes(bmp)


HOSTILE_FILES = {
    "jpeg-header-only": lambda: _encoded("JPEG")[:200],
    "png-ztxt-inflates-too-far": lambda: _png_with_chunk_inflating_past_pillows_limit(b"zTXt", b"Comment\0\0"),
    # keyword, compression flag 1 and method 0, empty language tag and translated keyword
    "png-itxt-inflates-too-far": lambda: _png_with_chunk_inflating_past_pillows_limit(b"iTXt", b"Comment\0\1\0\0\0"),
    "png-iccp-inflates-too-far": lambda: _png_with_chunk_inflating_past_pillows_limit(b"iCCP", b"icc\0\0"),
    "webp-zeroed-vp8": _webp_with_zeroed_vp8_payload,
    "bmp-info-header-cut-short": lambda: _encoded("BMP")[: 14 + 20],  # 20 of BITMAPINFOHEADER's 40 bytes
    "bmp-7-bits-per-pixel": lambda: _bmp_with_bit_count(7),
}


def write_hostile_image(name: str, directory: Path) -> Path:
    """The hostile file `name` of HOSTILE_FILES in `directory` (the HTTP tests send the same files)."""
    path = directory / f"hostile-{name}"
    path.write_bytes(HOSTILE_FILES[name]())
    return path


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_hostile_file_raises_input_error_naming_the_field(tmp_path, name):
    with pytest.raises(InputError) as caught:
        load_image(write_hostile_image(name, tmp_path), FIELD)
    assert caught.value.field == FIELD
    assert "truncated or corrupt" in caught.value.reason


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    path = png_header_only(tmp_path / "claims.png", 5000, 5000)  # 25 MP claimed, pixel data missing
    with pytest.raises(InputError, match="too large"):
        load_image(path, FIELD, max_pixels=20_000_000)  # rejected before the (failing) decode
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(path, FIELD)  # allowed size: decoding is attempted and fails cleanly


def test_pillow_bomb_warning_counts_as_too_large(tmp_path):
    path = png_header_only(tmp_path / "claims.png", 10_000, 9_000)  # over Pillow's ~89 MP warning limit
    with pytest.raises(InputError, match="too large"):
        load_image(path, FIELD, max_pixels=10**9)
