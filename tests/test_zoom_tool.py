"""The image zoom tool: pixel math, validation, resizing, image modes, never raising."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from axpo_nemo.agent.tools.base import Tool, ToolContext
from axpo_nemo.agent.tools.zoom import ImageZoomTool, ZoomConfig, output_size, parse_bbox


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose red channel is x mod 256 and green channel y mod 256."""
    x = np.arange(width, dtype=np.uint32) % 256
    y = np.arange(height, dtype=np.uint32) % 256
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = x[None, :]
    arr[..., 1] = y[:, None]
    return Image.fromarray(arr)


@pytest.fixture
def tool():
    return ImageZoomTool()


def ctx(*images):
    return ToolContext(images=list(images))


def test_implements_tool_protocol(tool):
    assert isinstance(tool, Tool)
    schema = tool.schema()
    assert schema["function"]["name"] == "image_zoom_in" == tool.name
    assert schema["function"]["parameters"]["required"] == ["bbox_2d"]


def test_pixel_math_by_hand(tool):
    # 1000x500 image: x_px = x/1000*1000, y_px = y/1000*500
    res = tool({"bbox_2d": [100, 200, 300, 400]}, ctx(Image.new("RGB", (1000, 500))))
    assert res.ok, res.text
    assert res.metadata["pixel_box"] == (100, 100, 300, 200)
    # 200x100 crop: short side 100 -> 224, scale 2.24 -> 448x224
    assert res.images[0].size == (448, 224) == res.metadata["output_size"]
    assert res.text == "Zoomed into [100, 200, 300, 400] of image 0 (200x100 px region, shown at 448x224)."


def test_crop_content_comes_from_the_original_image():
    tool = ImageZoomTool(ZoomConfig(min_short_side=1))  # no upscaling: the crop itself
    img = gradient(400, 200)
    res = tool({"bbox_2d": [250, 500, 500, 1000]}, ctx(img))  # x 100..200, y 100..200
    assert res.metadata["pixel_box"] == (100, 100, 200, 200)
    out = np.asarray(res.images[0])
    assert out.shape == (100, 100, 3)
    assert out[0, 0, 0] == 100 and out[0, 0, 1] == 100
    assert out[-1, -1, 0] == 199 and out[-1, -1, 1] == 199


def test_fractional_coordinates_cover_the_box(tool):
    res = tool({"bbox_2d": [100.4, 100.4, 300.6, 300.6]}, ctx(Image.new("RGB", (1000, 1000))))
    assert res.metadata["pixel_box"] == (100, 100, 301, 301)


def test_clamping_to_the_image(tool):
    res = tool({"bbox_2d": [-50, -10, 1200, 1500]}, ctx(Image.new("RGB", (640, 480))))
    assert res.ok
    assert res.metadata["pixel_box"] == (0, 0, 640, 480)
    assert res.metadata["bbox_2d"] == [0, 0, 1000, 1000]


@pytest.mark.parametrize(
    "box", [[300, 100, 200, 400], [100, 400, 300, 200], [500, 500, 500, 600], [1200, 0, 1500, 100]]
)
def test_inverted_or_empty_boxes(tool, box):
    res = tool({"bbox_2d": box}, ctx(Image.new("RGB", (100, 100))))
    assert res.error == "bad_arguments"
    assert "x1 < x2" in res.text and "top-left" in res.text


def test_tiny_box_is_expanded_around_its_centre(tool):
    res = tool({"bbox_2d": [500, 500, 501, 501]}, ctx(Image.new("RGB", (1000, 1000))))
    assert res.ok and res.metadata["expanded"]
    left, top, right, bottom = res.metadata["pixel_box"]
    assert (right - left, bottom - top) == (28, 28)
    assert left <= 500 < right and top <= 500 < bottom
    assert res.images[0].size == (224, 224)


def test_tiny_box_at_the_edge_stays_inside(tool):
    res = tool({"bbox_2d": [999, 0, 1000, 1]}, ctx(Image.new("RGB", (1000, 1000))))
    assert res.metadata["pixel_box"] == (972, 0, 1000, 28)


def test_image_smaller_than_min_box(tool):
    res = tool({"bbox_2d": [0, 0, 500, 500]}, ctx(Image.new("RGB", (10, 6))))
    assert res.ok and res.metadata["pixel_box"] == (0, 0, 10, 6)


def test_extreme_aspect_ratio_is_refused(tool):
    res = tool({"bbox_2d": [0, 0, 1000, 1]}, ctx(Image.new("RGB", (10000, 100))))  # 10000x28 after expansion
    assert res.error == "bad_arguments" and "aspect ratio" in res.text
    ok = tool({"bbox_2d": [0, 0, 250, 1000]}, ctx(Image.new("RGB", (10000, 100))))  # 2500x100: ratio 25
    assert ok.ok


def test_upscale_respects_caps():
    assert output_size(50, 100, ZoomConfig()) == (224, 448)
    assert output_size(1000, 28, ZoomConfig()) == (2048, 57)  # long side capped
    assert output_size(4000, 3000, ZoomConfig()) == (2048, 1536)  # large crops are shrunk
    assert output_size(3000, 3000, ZoomConfig(max_pixels=1000 * 1000)) == (1000, 1000)
    assert output_size(300, 400, ZoomConfig()) == (300, 400)  # already big enough


def test_large_image_is_cropped_and_capped(tool):
    img = Image.new("L", (8000, 6000), 128)
    res = tool({"bbox_2d": [0, 0, 1000, 1000]}, ctx(img))
    assert res.ok and res.images[0].size == (2048, 1536) and res.images[0].mode == "RGB"
    small = tool({"bbox_2d": [500, 500, 510, 510]}, ctx(img))
    assert small.metadata["pixel_box"] == (4000, 3000, 4080, 3060)
    palette = tool({"bbox_2d": [0, 0, 1000, 1000]}, ctx(Image.new("P", (6000, 6000), 3)))
    assert palette.images[0].size == (2048, 2048) and palette.images[0].mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "I", "I;16", "F", "CMYK"])
def test_any_mode_gives_rgb(tool, mode):
    res = tool({"bbox_2d": [0, 0, 1000, 1000]}, ctx(Image.new(mode, (64, 48))))
    assert res.ok, res.text
    assert res.images[0].mode == "RGB" and res.images[0].size == (299, 224)


def test_transparent_pixels_become_background(tool):
    img = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
    out = tool({"bbox_2d": [0, 0, 1000, 1000]}, ctx(img)).images[0]
    assert out.getpixel((10, 10)) == (255, 255, 255)
    black = ImageZoomTool(ZoomConfig(background="black"))({"bbox_2d": [0, 0, 1000, 1000]}, ctx(img)).images[0]
    assert black.getpixel((10, 10)) == (0, 0, 0)


def test_image_index_selects_the_image(tool):
    a, b = Image.new("RGB", (100, 100), "red"), Image.new("RGB", (200, 100), "blue")
    res = tool({"bbox_2d": [0, 0, 1000, 1000], "image_index": 1, "label": "sky"}, ctx(a, b))
    assert res.ok and res.metadata["pixel_box"] == (0, 0, 200, 100)
    assert res.images[0].getpixel((0, 0)) == (0, 0, 255)
    assert res.text.startswith('Zoomed into "sky" [0, 0, 1000, 1000] of image 1')


@pytest.mark.parametrize("index", [2, -1, 1.5, "0", True, [0]])
def test_bad_image_index(tool, index):
    img = Image.new("RGB", (10, 10))
    res = tool({"bbox_2d": [0, 0, 1000, 1000], "image_index": index}, ctx(img, img))
    assert res.error == "bad_arguments"
    assert "0 to 1" in res.text


def test_no_images(tool):
    res = tool({"bbox_2d": [0, 0, 100, 100]}, ctx())
    assert res.error == "no_image"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([0, 0, 100, float("nan")], "finite"),
        ([0, 0, float("inf"), 100], "finite"),
        ([0, "0", 100, 100], "must be a number"),
        ([0, True, 100, 100], "must be a number"),
        ([0, 0, 100], "exactly 4"),
        ([0, 0, 100, 100, 5], "exactly 4"),
        ([[0, 0], [100, 100]], "exactly 4"),
        ([[0], 0, 100, 100], "must be a number"),
        ("[0, 0, 100, 100]", "list of 4 numbers"),
        (None, "list of 4 numbers"),
        ({"x1": 0}, "list of 4 numbers"),
    ],
)
def test_bad_bbox(tool, value, fragment):
    res = tool({"bbox_2d": value}, ctx(Image.new("RGB", (10, 10))))
    assert res.error == "bad_arguments"
    assert fragment in res.text
    assert parse_bbox(value)[0] is None


@pytest.mark.parametrize("arguments", [None, [], "not json", '{"label": "x"}', {}, {"bbox": [0, 0, 1, 1]}])
def test_bad_argument_objects(tool, arguments):
    res = tool(arguments, ctx(Image.new("RGB", (10, 10))))
    assert res.error == "bad_arguments"


def test_unknown_arguments_are_rejected_by_name(tool):
    res = tool({"bbox_2d": [0, 0, 500, 500], "zoom": 4}, ctx(Image.new("RGB", (100, 100))))
    assert res.error == "bad_arguments"
    assert "unexpected argument(s) zoom; the image_zoom_in tool takes only 'bbox_2d', 'label', 'image_index'" in res.text


def test_json_string_arguments_are_accepted(tool):
    res = tool('{"bbox_2d": [0, 0, 500, 500]}', ctx(Image.new("RGB", (100, 100))))
    assert res.ok


def test_bad_label(tool):
    res = tool({"bbox_2d": [0, 0, 500, 500], "label": 3}, ctx(Image.new("RGB", (100, 100))))
    assert res.error == "bad_arguments"


def test_broken_image_is_reported_not_raised(tool):
    class Broken:
        size = (100, 100)
        mode = "RGB"

        def resize(self, *a, **k):
            raise OSError("truncated file")

    res = tool({"bbox_2d": [0, 0, 500, 500]}, ToolContext(images=[Broken()]))  # type: ignore[list-item]
    assert res.error == "crashed" and "truncated file" in res.text


def test_config_validation():
    with pytest.raises(ValueError, match="min_short_side"):
        ZoomConfig(min_short_side=0)
    with pytest.raises(ValueError, match="background"):
        ZoomConfig(background="not-a-colour")


_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_BBOXISH = st.lists(
    st.one_of(st.floats(-2000, 3000), st.integers(-2000, 3000), st.just(float("nan")), st.text(max_size=3)),
    min_size=0,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    arguments=st.one_of(
        _JSONISH,
        st.fixed_dictionaries({"bbox_2d": _BBOXISH}, optional={"image_index": _JSONISH, "label": _JSONISH}),
    ),
)
def test_fuzz_never_raises(arguments):
    tool = ImageZoomTool()
    res = tool(arguments, ToolContext(images=[Image.new("RGB", (300, 200)), Image.new("RGBA", (50, 900))]))
    assert isinstance(res.text, str)
    assert res.error in (None, "bad_arguments")
    if res.ok:
        (out,) = res.images
        w, h = out.size
        assert out.mode == "RGB" and max(w, h) <= 2048 and w * h <= 2048 * 2048
        left, top, right, bottom = res.metadata["pixel_box"]
        assert 0 <= left < right and 0 <= top < bottom
        assert max((right - left) / (bottom - top), (bottom - top) / (right - left)) <= 100 + 1e-9
        assert not math.isnan(w)
