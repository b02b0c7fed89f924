"""Preview images (clora/preview.py): the mask overlay and the attention grid say which colour is which LoRA."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from clora.preview import attention_grid, colour_of, mask_overlay


def _masks() -> torch.Tensor:
    m = torch.zeros(3, 1, 8, 8)
    m[0] = 1
    m[1, :, :, :4] = 1  # binding 1: the left half
    m[2, :, :, 4:] = 1  # binding 2: the right half
    return m


def _has_colour(region: np.ndarray, colour) -> bool:
    return bool((region.reshape(-1, 3) == np.array(colour)).all(axis=1).any())


def test_mask_overlay_has_a_colour_key_below_the_image():
    image = Image.new("RGB", (256, 192), (200, 200, 200))
    out = mask_overlay(image, _masks(), ["base", "cat_lora", "dog_lora"], concepts=["cat", "dog"])
    a = np.asarray(out)
    assert out.width == 256 and out.height > 192
    # the image itself is not covered by any label: the left half is tinted with binding 1's colour everywhere
    top = a[:192]
    left = top[:, :128].reshape(-1, 3)
    assert (left == left[0]).all() and not (left[0] == 200).all()
    # the key below holds each LoRA's swatch in exactly its overlay colour
    key = a[192:]
    assert _has_colour(key, colour_of(1)) and _has_colour(key, colour_of(2))
    assert colour_of(1) != colour_of(2)


def test_attention_grid_masks_in_the_overlay_colours_with_a_key():
    maps = torch.rand(3, 8, 8, 6)
    groups = [[[1], [1], [1]], [[3], [3], [3]]]
    cell = 64
    out = attention_grid(maps, groups, ["cat", "dog"], ["base", "cat_lora", "dog_lora"], cell=cell, masks=_masks())
    a = np.asarray(out)
    assert out.width == 4 * cell and out.height > 2 * cell
    mask_col = a[: 2 * cell, 3 * cell:]
    assert _has_colour(mask_col[:cell], colour_of(1)) and not _has_colour(mask_col[:cell], colour_of(2))
    assert _has_colour(mask_col[cell:], colour_of(2))
    key = a[2 * cell:]
    assert _has_colour(key, colour_of(1)) and _has_colour(key, colour_of(2))
