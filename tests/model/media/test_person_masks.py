"""Person masks: box formats and validation, the original's default halves, mask geometry through the
image's crop, and automatic speaker placement from faces (golden-exact masks are checked by the
manifest-driven golden checker)."""

import pytest
import torch
from PIL import Image

from model.contract.errors import InputError
from model.media.image_input import load_image
from model.media.person_masks import (
    boxes_from_original_bbox,
    default_boxes,
    detect_speaker_boxes,
    person_masks,
    validate_boxes,
)

FIELD = "speaker_boxes"
SRC_HW = (1440, 2560)  # the shipped two-person example, 16:9
TARGET_HW, LATENT_HW = (448, 896), (56, 112)  # its 480p bucket


def test_original_bbox_is_read_rows_first():
    bbox = {"person1": [160, 120, 1280, 1080], "person2": [160, 1320, 1280, 2280]}
    assert boxes_from_original_bbox(bbox) == [(120, 160, 1080, 1280), (1320, 160, 2280, 1280)]


def test_original_bbox_needs_four_numbers():
    with pytest.raises(InputError, match="person2") as caught:
        boxes_from_original_bbox({"person1": [0, 0, 1, 1], "person2": [0, 0, 1]})
    assert caught.value.field == "bbox"


def test_default_boxes_are_the_original_halves():
    # rows [72, 1368); columns [64, 1216) and [1344, 2496), as the golden capture records
    assert default_boxes(*SRC_HW) == [(64, 72, 1216, 1368), (1344, 72, 2496, 1368)]
    # odd sizes: half = 101; int(5.05) = 5, int(95.95) = 95, int(5.05 + 101) = 106, int(95.95 + 101) = 196
    assert default_boxes(101, 203) == [(5, 5, 95, 95), (106, 5, 196, 95)]


def test_validate_boxes_truncates_like_the_original():
    boxes = [[0, 0.9, 10.7, 20], (5, 5, 2560, 1440)]
    assert validate_boxes(boxes, *SRC_HW, 2, FIELD) == [(0, 0, 10, 20), (5, 5, 2560, 1440)]


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        ([(0, 0, 10, 10)], "2 expected, 1 given"),
        ([(0, 0, 10, 10)] * 3, "2 expected, 3 given"),
        ("0,0,10,10", "must be a list"),
        ([(0, 0, 10, 10), (0, 0, 10)], "box 2 must be 4 numbers"),
        ([(0, 0, 10, 10), (0, "a", 10, 10)], "box 2 must be 4 numbers"),
        ([(0, 0, 10, float("nan")), (0, 0, 10, 10)], "box 1 must be 4 numbers"),
        ([(0, 0, 10, 10), (0, 0, True, 10)], "box 2 must be 4 numbers"),
        ([(10, 0, 10, 10), (0, 0, 10, 10)], "box 1 [10, 0, 10, 10] is empty"),
        ([(0, 0, 10, 10), (0, 20, 10, 10)], "box 2 [0, 20, 10, 10] is empty"),
        ([(0, 0, 10, 10), (5.2, 0, 5.8, 10)], "box 2 [5.2, 0, 5.8, 10] is empty"),
        ([(-1, 0, 10, 10), (0, 0, 10, 10)], "box 1 [-1, 0, 10, 10] is not inside the 2560×1440 image"),
        ([(0, 0, 10, 10), (0, 0, 2561, 10)], "box 2 [0, 0, 2561, 10] is not inside"),
        ([(0, 0, 10, 1441), (0, 0, 10, 10)], "box 1 [0, 0, 10, 1441] is not inside"),
    ],
)
def test_validate_boxes_rejects_with_field_and_box(boxes, message):
    with pytest.raises(InputError) as caught:
        validate_boxes(boxes, *SRC_HW, 2, FIELD)
    assert caught.value.field == FIELD
    assert message in caught.value.reason


def test_one_speaker_masks_are_all_ones():
    masks = person_masks(SRC_HW, TARGET_HW, LATENT_HW, num_speakers=1)
    assert masks.shape == (3, *LATENT_HW) and masks.dtype == torch.float32 and bool((masks == 1).all())


@pytest.mark.parametrize(
    "boxes", [None, [(0, 0, 1280, 1440), (1280, 0, 2560, 1440)], [(300, 200, 900, 1300), (1500, 100, 2400, 1400)]]
)
def test_two_speaker_masks_partition_the_grid(boxes):
    masks = person_masks(SRC_HW, TARGET_HW, LATENT_HW, num_speakers=2, boxes=boxes)
    assert masks.shape == (3, *LATENT_HW) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(0), torch.ones(LATENT_HW))
    assert masks[0].any() and masks[1].any()


def test_box_lands_where_the_crop_puts_it():
    # 1440×2560 → cover 504×896 (×0.35), rows from 28 kept, then ÷8: latent row j shows source row
    # ≈ (28 + 8j)/0.35, latent column k source column ≈ 8k/0.35 (boxes avoid landing on exact boundaries).
    boxes = [(0, 60, 650, 700), (1300, 60, 2560, 1440)]
    masks = person_masks(SRC_HW, TARGET_HW, LATENT_HW, num_speakers=2, boxes=boxes)
    rows = masks[0].any(dim=1).nonzero().flatten().tolist()
    columns = masks[0].any(dim=0).nonzero().flatten().tolist()
    assert rows == list(range(28)) and columns == list(range(29))  # source rows ≤ 697, columns ≤ 640
    assert bool(masks[1, :, 57:].all()) and not masks[1, :, :57].any()  # source column 1302.9 onwards


def test_box_in_the_cropped_away_margin_is_an_input_error():
    # the top 28 of 504 cover rows (80 source rows) are cropped away
    with pytest.raises(InputError) as caught:
        person_masks(SRC_HW, TARGET_HW, LATENT_HW, num_speakers=2, boxes=[(100, 0, 900, 60), (1300, 100, 2200, 1300)])
    assert caught.value.field == FIELD and "box 1" in caught.value.reason


def test_user_boxes_are_validated_with_the_callers_field():
    with pytest.raises(InputError) as caught:
        person_masks(SRC_HW, TARGET_HW, LATENT_HW, num_speakers=2, boxes=[(0, 0, 10, 10)], field="bbox")
    assert caught.value.field == "bbox"


def test_face_detection_finds_the_two_example_speakers_left_to_right(golden_dir):
    image = load_image(golden_dir / "multi1.png", "image_url")  # 2560×1440: man on the left, woman on the right
    boxes = detect_speaker_boxes(image, num_speakers=2)
    assert boxes is not None and len(boxes) == 2
    (left_x0, _, left_x1, left_y1), (right_x0, _, right_x1, right_y1) = boxes
    assert left_x1 <= right_x0 and left_x0 < 700 < left_x1 and right_x0 < 2200 < right_x1
    assert left_y1 == right_y1 == image.height
    assert validate_boxes(boxes, image.height, image.width, 2, FIELD) == boxes
    assert person_masks((image.height, image.width), TARGET_HW, LATENT_HW, 2, boxes).sum(0).eq(1).all()


def test_face_detection_without_faces_falls_back():
    blank = Image.new("RGB", (640, 360), (128, 128, 128))
    assert detect_speaker_boxes(blank, num_speakers=2) is None
