"""Live: the X/Y/Z plot script with CLoRA axes through the API.

The axis index of ``script_args`` is found through ``GET /sdapi/v1/script-info``: the X/Y/Z plot script's first
argument ("X type") lists the axis labels as its choices, in the order the script indexes them.
"""
from __future__ import annotations

import re
from typing import Optional

import pytest

from tests.live.webui_api import WebUI, mean_abs_diff, named_args, same_pixels, skip_without_webui

skip_without_webui()

XYZ_TITLE = "x/y/z plot"
STEP_AXIS = "[CLoRA] Step size"
ENABLED_AXIS = "[CLoRA] Enabled"
STEP_VALUES = (0.0, 60.0)


def _step_size(infotext: str) -> Optional[float]:
    m = re.search(r"CLoRA step size: ([^,\n]+)", infotext)
    return float(m.group(1)) if m else None


def axis_labels(webui: WebUI, is_img2img: bool = False) -> list[str]:
    r = webui.get("/sdapi/v1/script-info")
    assert r.ok, r.error_text()
    for script in r.body:
        if script.get("name") == XYZ_TITLE and bool(script.get("is_img2img")) == is_img2img:
            return list(script["args"][0]["choices"])
    pytest.skip("the server has no X/Y/Z plot script")


def xyz_args(x_type: int, x_values: str, y_type: int, y_dropdown: list[str]) -> list:
    """The X/Y/Z plot script's 18 positional arguments (A1111 1.8 / Forge order); no legend, no margins, so the
    grid is an exact tiling of the cells."""
    return [
        x_type, x_values, [],
        y_type, "", y_dropdown,
        0, "", [],
        False,  # draw legend
        True,  # include sub images (the cells)
        False,  # include sub grids
        False,  # keep -1 for seeds
        False, False, False,  # vary seeds for X / Y / Z
        0,  # grid margins
        False,  # text inputs instead of dropdowns
    ]


def test_clora_axes_are_listed(webui):
    labels = axis_labels(webui)
    for label in (STEP_AXIS, ENABLED_AXIS, "[CLoRA] Mask threshold \u03bb", "[CLoRA] Binding 1 weight",
                  "[CLoRA] Gradient memory", "[CLoRA] Attention layers"):
        assert label in labels
    assert STEP_AXIS in axis_labels(webui, is_img2img=True)


def test_xyz_grid_with_clora_axes(webui, loras, reference):
    labels = axis_labels(webui)
    x, y = labels.index(STEP_AXIS), labels.index(ENABLED_AXIS)
    args = named_args(loras)
    payload = webui.payload(
        script_name=XYZ_TITLE,
        script_args=xyz_args(x, ", ".join(str(v) for v in STEP_VALUES), y, ["True", "False"]),
        alwayson_scripts={"clora": {"args": args}},
    )
    r = webui.txt2img(payload)
    assert r.ok, f"X/Y/Z plot with CLoRA axes failed ({r.status}): {r.error_text()}"
    images = r.images()
    infotexts = r.info()["infotexts"]
    assert len(images) == 5, "expected the grid followed by its 4 cells"
    grid, cells = images[0], images[1:]
    w, h = reference.size
    assert grid.size == (2 * w, 2 * h)
    for k, cell in enumerate(cells):  # cell k is x = k % 2, y = k // 2
        tile = grid.crop(((k % 2) * w, (k // 2) * h, (k % 2 + 1) * w, (k // 2 + 1) * h))
        assert same_pixels(tile, cell), f"grid tile {k} is not cell {k}"
    on_0, on_60, off_0, off_60 = cells
    assert [_step_size(t) for t in infotexts[1:3]] == list(STEP_VALUES)
    assert "CLoRA" not in infotexts[3] and "CLoRA" not in infotexts[4]
    assert mean_abs_diff(on_0, on_60) > 0.5, "the step size axis did not change the image"
    assert mean_abs_diff(on_0, reference) > 0.5
    assert same_pixels(off_0, reference) and same_pixels(off_60, reference), "CLoRA switched off by the axis ran"
    direct = webui.generate(named_args(loras, step_size=STEP_VALUES[1]))
    assert direct.ok, direct.error_text()
    assert same_pixels(direct.images()[0], on_60), "a grid cell differs from the same settings sent directly"
