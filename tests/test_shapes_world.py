"""The shapes world renderer and the analytic detector of the composition benchmark (bench/shapes)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.shapes import detector as D
from bench.shapes import world as W


def _random_scenes(seed: int, n: int):
    """Scenes of one or two objects with random patterns (plain included), rendered."""
    return D.random_scenes(seed, n)


def test_detector_accuracy_on_rendered_ground_truth():
    # other scenes than the README's 2,000 (seed 2024)
    acc, misses = D.ground_truth_accuracy(n=600, seed=12345)
    assert acc >= 0.98, misses[:10]


@pytest.mark.parametrize("pattern", W.PATTERNS)
def test_detector_reads_each_pattern_on_every_shape_and_colour(pattern):
    rng = np.random.default_rng(7)
    wrong = []
    for shape in W.SHAPES:
        for colour in W.COLOURS:
            obj = W.Obj(shape, colour, 12, 15.3, 16.1, pattern)
            img = W.render(W.Scene(235, (obj,)), rng)
            found = D.kinds_of(D.detect(img))
            if found != [(shape, colour, pattern)]:
                wrong.append((shape, colour, found))
    assert wrong == []


def test_render_is_deterministic_and_seed_dependent():
    a = [img for _s, img in _random_scenes(seed=3, n=5)]
    b = [img for _s, img in _random_scenes(seed=3, n=5)]
    c = [img for _s, img in _random_scenes(seed=4, n=5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_base_world_follows_the_data_readme():
    rng = np.random.default_rng(0)
    n_two, empty = 0, 0
    for _ in range(400):
        scene, text = W.sample_base_scene(rng)
        assert 215 <= scene.background <= 255
        assert len(scene.objects) in (1, 2)
        n_two += len(scene.objects) == 2
        empty += text == ""
        for o in scene.objects:
            assert 8 <= o.size <= 14 and o.pattern == "plain"
            assert o.size / 2 + 1 <= o.cx <= 32 - o.size / 2 - 1
            assert o.size / 2 + 1 <= o.cy <= 32 - o.size / 2 - 1
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert (a.shape, a.colour) != (b.shape, b.colour)
            (al, at, ar, ab), (bl, bt, br, bb) = a.box(), b.box()
            assert ar + 3 < bl or br + 3 < al or ab + 3 < bt or bb + 3 < at
        if text:
            assert text == " and ".join(f"a {o.colour} {o.shape}" for o in scene.objects)
    assert 160 < n_two < 240 and 20 < empty < 65


def test_shapes_match_their_definitions_at_pixel_centres():
    # A circle of size 10 at (16, 16): pixel (row 16, col 20) has its centre at (20.5, 16.5), 4.5² + 0.5² <= 25.
    circle = W.shape_mask(W.Obj("circle", "red", 10, 16.0, 16.0))
    assert circle[16, 20] and not circle[16, 21] and circle.sum() == 80  # rows of 10, 10, 8, 8, 4 per half
    square = W.shape_mask(W.Obj("square", "red", 10, 16.0, 16.0))
    assert square.sum() == 100  # centres 11.5 .. 20.5 on both axes
    tri = W.shape_mask(W.Obj("triangle", "red", 10, 16.0, 16.0))
    rows = tri.sum(axis=1)
    assert rows[11] < rows[15] < rows[20]  # widening downwards: apex up
    assert rows[20] == 10 and rows[10] == 0


def test_background_noise_and_palette():
    rng = np.random.default_rng(1)
    obj = W.Obj("square", "blue", 14, 16.0, 16.0)
    img = W.render(W.Scene(230, (obj,)), rng).astype(float)
    inside = W.shape_mask(obj)
    assert abs(img[~inside].mean() - 230) < 0.5 and 1.5 < img[~inside].std() < 2.5
    assert np.allclose(img[inside].mean(axis=0), W.COLOURS["blue"], atol=0.5)


def test_patterns_use_the_dark_shade_of_the_objects_colour():
    obj = W.Obj("square", "green", 12, 16.0, 16.0, "checker")
    inside = W.shape_mask(obj)
    dark = W.pattern_mask(obj, inside)
    assert 0.4 < dark[inside].mean() < 0.6
    img = W.render(W.Scene(240, (obj,)), np.random.default_rng(0)).astype(float)
    expected = np.round(np.array(W.COLOURS["green"]) * W.DARK)
    assert np.allclose(img[dark].mean(axis=0), expected, atol=0.6)


def _darkened_with_light_sliver(pattern: str) -> np.ndarray:
    """A patterned red circle whose body came out darkened (as generated images do) while a sliver of its edge pixels
    stayed light, blended with the background."""
    rng = np.random.default_rng(0)
    obj = W.Obj("circle", "red", 12, 15.3, 16.1, pattern)
    img = W.render(W.Scene(235, (obj,)), rng).astype(np.float64)
    inside = W.shape_mask(obj)
    edge = inside & ~D._erode(inside)
    img[inside & ~edge] *= 0.5
    light = np.zeros_like(edge)
    light[tuple(np.argwhere(edge)[::3].T)] = True  # every third edge pixel: ~13 % of the object
    img[edge & light] = 0.8 * np.array(W.COLOURS["red"]) + 0.2 * 235
    img[edge & ~light] *= 0.5
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("pattern", ["stripes", "columns", "checker"])
def test_detector_ignores_a_light_sliver_of_blended_edge_pixels(pattern, monkeypatch):
    img = _darkened_with_light_sliver(pattern)
    assert D.kinds_of(D.detect(img)) == [("circle", "red", pattern)]
    # without the interior rule the sliver is the "light" group and the pattern is lost
    monkeypatch.setattr(D, "_SLIVER", 0.0)
    assert D.kinds_of(D.detect(img)) != [("circle", "red", pattern)]
