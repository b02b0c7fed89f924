"""fusion_masks / fuse against an independent numpy + scipy.ndimage implementation of the paper's rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clora.masks import MORPHOLOGY, apply_morphology, fuse, fusion_masks

import scipy.ndimage as ndimage

SQUARE = np.ones((3, 3), dtype=bool)


def _np_morph(m: np.ndarray, op: str) -> np.ndarray:
    """scipy reference with the documented border: outside counts as 0 for dilation, 1 for erosion."""
    dil = lambda a: ndimage.binary_dilation(a, structure=SQUARE, border_value=0)  # noqa: E731
    ero = lambda a: ndimage.binary_erosion(a, structure=SQUARE, border_value=1)  # noqa: E731
    if op == "none":
        return m
    if op == "dilate":
        return dil(m)
    if op == "erode":
        return ero(m)
    if op == "open":
        return dil(ero(m))
    return ero(dil(m))


def _np_nearest(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = m.shape
    rows = np.minimum((np.arange(size[0]) * h) // size[0], h - 1)
    cols = np.minimum((np.arange(size[1]) * w) // size[1], w - 1)
    return m[rows][:, cols]


def _np_masks(maps: np.ndarray, tokens, lam: float, op: str, size) -> np.ndarray:
    """Paper's rule for one image: maps (V, h, w, T) -> (V, H, W) bool."""
    V, h, w, _ = maps.shape
    out = []
    for v in range(V):
        m = np.zeros((h, w), dtype=bool)
        for t in tokens[v]:
            a = maps[v, :, :, t]
            m |= a >= lam * a.max()
        out.append(_np_morph(m, op) if tokens[v] else m)
    out = np.stack(out)
    out[0] |= ~out.any(axis=0)
    if size is not None:
        out = np.stack([_np_nearest(m, size) for m in out])
    return out


def _random_maps(seed: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # softmax over tokens, like real attention probabilities, with some spatial structure
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 2.0
    return logits.softmax(dim=-1)


@pytest.mark.parametrize("lam", [0.2, 0.4, 0.7, 1.0])
@pytest.mark.parametrize("op", MORPHOLOGY)
def test_matches_numpy_reference(lam: float, op: str) -> None:
    maps = _random_maps(int(lam * 10) + len(op), (3, 8, 8, 10))
    tokens = [[], [2, 5], [7]]
    ours = fusion_masks(maps, tokens, threshold=lam, morphology=op, size=(16, 16))
    ref = _np_masks(maps.numpy(), tokens, lam, op, (16, 16))
    assert ours.shape == (3, 1, 16, 16)
    assert ours.dtype == maps.dtype
    assert set(torch.unique(ours).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(ours[:, 0].numpy().astype(bool), ref)


@pytest.mark.parametrize("op", ["dilate", "erode", "open", "close"])
def test_morphology_matches_scipy_on_random_binary_masks(op: str) -> None:
    rng = np.random.default_rng(len(op))
    for density in (0.2, 0.5, 0.85):
        m = rng.random((5, 9, 7)) < density
        ours = apply_morphology(torch.from_numpy(m.astype(np.float32)), op).numpy().astype(bool)
        ref = np.stack([_np_morph(x, op) for x in m])
        np.testing.assert_array_equal(ours, ref)


def test_border_convention() -> None:
    full = torch.ones(1, 5, 5)
    assert torch.equal(apply_morphology(full, "erode"), full)  # erosion does not eat from the border
    dot = torch.zeros(1, 5, 5)
    dot[0, 0, 0] = 1
    dil = apply_morphology(dot, "dilate")
    assert dil.sum().item() == 4.0 and dil[0, :2, :2].sum().item() == 4.0


def test_threshold_is_inclusive_and_union_over_tokens() -> None:
    maps = torch.zeros(2, 2, 3, 3)
    maps[1, 0, 0, 0], maps[1, 0, 1, 0] = 1.0, 0.5  # token 0: max 1, one pixel exactly at 0.5·max
    maps[1, 1, 2, 1] = 2.0  # token 1
    maps[1, 0, 2, 0] = 0.49
    m = fusion_masks(maps, [[], [0, 1]], threshold=0.5)
    assert m.shape == (2, 1, 2, 3)
    expected = torch.zeros(2, 3)
    expected[0, 0] = expected[0, 1] = expected[1, 2] = 1
    assert torch.equal(m[1, 0], expected)
    assert torch.equal(m[0, 0], 1 - expected)  # base covers the rest


def test_base_rule_keeps_its_own_mask_and_covers_gaps() -> None:
    maps = _random_maps(11, (3, 8, 8, 6))
    m = fusion_masks(maps, [[1], [2], [3]], threshold=0.6)[:, 0]
    a = maps.numpy()
    own, c1, c2 = (a[v, :, :, t] >= 0.6 * a[v, :, :, t].max() for v, t in ((0, 1), (1, 2), (2, 3)))
    assert own.any() and not own.all()
    np.testing.assert_array_equal(m[1].numpy().astype(bool), c1)
    np.testing.assert_array_equal(m[0].numpy().astype(bool), own | ~(own | c1 | c2))
    assert (m.sum(dim=0) >= 1).all()


def test_empty_variant_tokens_give_zero_masks() -> None:
    maps = _random_maps(5, (3, 4, 4, 5))
    m = fusion_masks(maps, [[], [], [1]])
    assert m[1].sum().item() == 0.0
    assert torch.equal(m[0] + m[2], torch.ones_like(m[0]))


def test_batched_equals_per_image() -> None:
    maps = _random_maps(7, (2, 3, 8, 8, 9))
    tokens = [[], [1, 4], [6]]
    batched = fusion_masks(maps, tokens, 0.4, "close", (32, 24))
    assert batched.shape == (2, 3, 1, 32, 24)
    for b in range(2):
        ref = _np_masks(maps[b].numpy(), tokens, 0.4, "close", (32, 24))
        np.testing.assert_array_equal(batched[b, :, 0].numpy().astype(bool), ref)


def test_nearest_resize_non_integer_factor() -> None:
    maps = _random_maps(9, (2, 8, 8, 4))
    m = fusion_masks(maps, [[], [2]], 0.3, size=(13, 21))
    ref = _np_masks(maps.numpy(), [[], [2]], 0.3, "none", (13, 21))
    np.testing.assert_array_equal(m[:, 0].numpy().astype(bool), ref)


def test_errors_name_the_problem() -> None:
    maps = torch.rand(2, 4, 4, 5)
    with pytest.raises(ValueError, match="3 prompt variants, but there are 2"):
        fusion_masks(maps, [[], [1], [2]])
    with pytest.raises(ValueError, match="position 8"):
        fusion_masks(maps, [[], [8]])
    with pytest.raises(ValueError, match="'blur'"):
        fusion_masks(maps, [[], [1]], morphology="blur")


def test_fuse_is_masked_weighted_average() -> None:
    g = torch.Generator().manual_seed(0)
    V, B, C, H, W = 3, 2, 4, 5, 6
    preds = torch.randn(V, B, C, H, W, generator=g, dtype=torch.float64)
    masks = (torch.rand(V, B, 1, H, W, generator=g) > 0.5).double()
    masks[0] = torch.where(masks.sum(0) == 0, torch.ones_like(masks[0]), masks[0])
    ours = fuse(preds, masks)
    ref = torch.empty(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                vs = [v for v in range(V) if masks[v, b, 0, y, x] == 1]
                ref[b, :, y, x] = sum(preds[v, b, :, y, x] for v in vs) / len(vs)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_pixel_covered_twice_gets_the_average_and_4d_preds() -> None:
    preds = torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 3.0), torch.full((4, 2, 2), 8.0)])
    masks = torch.zeros(3, 1, 2, 2)
    masks[0, 0, 0, 0] = 1  # base only
    masks[1, 0, 0, 1] = masks[2, 0, 0, 1] = 1  # two concepts
    masks[1, 0, 1, :] = 1  # concept 1 only
    out = fuse(preds, masks)
    assert out.shape == (4, 2, 2)
    assert torch.equal(out[:, 0, 0], torch.full((4,), 1.0))
    assert torch.equal(out[:, 0, 1], torch.full((4,), 5.5))
    assert torch.equal(out[:, 1, :], torch.full((4, 2), 3.0))


def test_fuse_guards_uncovered_pixels() -> None:
    preds = torch.randn(2, 3, 2, 2)
    masks = torch.zeros(2, 1, 2, 2)
    out = fuse(preds, masks)
    assert torch.isfinite(out).all()
    assert torch.equal(out, preds[0])


def test_fuse_with_fusion_masks_end_to_end() -> None:
    maps = _random_maps(21, (2, 3, 8, 8, 7))
    masks = fusion_masks(maps, [[], [2], [5]], 0.5, size=(16, 16))  # (B, V, 1, H, W)
    preds = torch.randn(3, 2, 4, 16, 16, dtype=torch.float64)
    out = fuse(preds, masks.transpose(0, 1))
    m = masks.transpose(0, 1)
    torch.testing.assert_close(out, (m * preds).sum(0) / m.sum(0))
