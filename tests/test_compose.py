"""Unit tests of the engine's pure parts: the per-variant LoRA plan, concept IoU, host-glue helpers."""
from __future__ import annotations

import torch

from clora.compose import build_compose_plan, concept_iou, mask_iou
from clora.hosts.common import pad_tokens, rows_cond, step_from_calls
from clora.settings import Binding, CloraSettings, StyleLora


def _settings(**kw):
    binds = (Binding("cat_v1", ("cat",), "sks", 0.9), Binding("dog_v1", ("dog",), "", 0.7))
    return CloraSettings(enabled=True, bindings=binds, **kw)


GROUPS = [[[2], [2, 3], [2]], [[5], [6], [5, 6]]]
MASKS = [[], [2, 3], [5, 6]]


def test_plan_binding_rows_and_uncond():
    plan = build_compose_plan(GROUPS, MASKS, _settings())
    assert plan.cond_loras == [[], [(0, 0.9)], [(1, 0.7)]]
    assert plan.uncond_loras == plan.cond_loras  # authors: LoRAs on the uncond rows too
    off = build_compose_plan(GROUPS, MASKS, _settings(lora_on_uncond=False))
    assert off.uncond_loras == [[], [], []]
    rp = plan.row_plan(2, uncond=True, cond=True)  # [u base×2, u cat×2, u dog×2, c base×2, c cat×2, c dog×2]
    assert len(rp) == 12
    assert rp.rows[0] == () and rp.rows[2] == ((0, 0.9),) and rp.rows[5] == ((1, 0.7),) and rp.rows[9] == ((0, 0.9),)
    assert len(plan.row_plan(3, uncond=False, cond=True)) == 9


def test_plan_style_whole_and_subjects():
    s = _settings(styles=(StyleLora("ink", 0.5, "whole"), StyleLora("fur", 0.3, "subjects", ("dog",))))
    plan = build_compose_plan(GROUPS, MASKS, s)
    # style indices follow the bindings: ink = 2, fur = 3
    assert plan.cond_loras == [[(2, 0.5)], [(0, 0.9), (2, 0.5)], [(1, 0.7), (2, 0.5), (3, 0.3)]]
    off = build_compose_plan(GROUPS, MASKS, s.__class__(**{**s.__dict__, "lora_on_uncond": False}))
    assert off.uncond_loras == [[(2, 0.5)], [(2, 0.5)], [(2, 0.5), (3, 0.3)]]


def test_concept_iou_matches_direct_count():
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(2, 4, 1, 6, 6, generator=g) > 0.5).float()
    direct = []
    for a, b in [(1, 2), (1, 3), (2, 3)]:
        per_image = []
        for i in range(2):
            x, y = m[i, a, 0].bool(), m[i, b, 0].bool()
            per_image.append((x & y).sum().item() / max((x | y).sum().item(), 1))
        direct.append(sum(per_image) / 2)
    assert abs(concept_iou(m) - sum(direct) / 3) < 1e-6
    assert abs(mask_iou(m, 1, 2) - direct[0]) < 1e-6
    assert concept_iou(m[:, :2]) == 0.0


def test_pad_tokens_with_empty_chunk_and_fallback():
    a = torch.randn(2, 77, 8)
    b = torch.randn(2, 154, 8)
    empty = torch.randn(1, 77, 8)
    pa, pb = pad_tokens([a, b], empty)
    assert pa.shape == pb.shape == (2, 154, 8)
    assert torch.equal(pa[:, :77], a) and torch.equal(pa[:, 77:], empty.expand(2, -1, -1))
    assert torch.equal(pb, b)
    pa2, _ = pad_tokens([a, b], None)
    assert torch.equal(pa2[:, 77:], a[:, -1:].expand(-1, 77, -1))


def test_rows_cond_gathers_image_conditioning():
    crossattn = torch.randn(6, 77, 8)
    concat = torch.arange(2.0).view(2, 1, 1, 1)
    out = rows_cond({"c_crossattn": [torch.zeros(2, 77, 8)], "c_concat": [concat]}, crossattn,
                    torch.tensor([0, 1, 0, 1, 0, 1]))
    assert out["c_crossattn"][0] is crossattn
    assert out["c_concat"][0].flatten().tolist() == [0, 1, 0, 1, 0, 1]
    assert rows_cond(torch.zeros(1), crossattn, torch.tensor([0])) is crossattn


def test_step_from_calls_first_and_second_order():
    assert [step_from_calls(i, 5, 5) for i in range(5)] == [0, 1, 2, 3, 4]
    # Heun-like: 2 calls per step except the last (2*5-1 = 9 calls)
    steps = [step_from_calls(i, 5, 9) for i in range(9)]
    assert steps[0] == 0 and steps[-1] == 4 and steps == sorted(steps) and set(steps) == {0, 1, 2, 3, 4}
