"""contrastive_loss / concept_loss against pytorch-metric-learning's NTXentLoss (test-only dependency)."""
from __future__ import annotations

import math

import pytest
import torch

from clora.loss import batched_concept_loss, concept_embeddings, concept_loss, contrastive_loss

import pytorch_metric_learning.losses as pml_losses

TOL = 1e-6


def _ref_minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    out = []
    for row in flat:
        out.append((row - row.min()) / (row.max() - row.min()))
    return torch.stack(out)


def _pml(maps: torch.Tensor, labels, temperature: float) -> torch.Tensor:
    return pml_losses.NTXentLoss(temperature=temperature)(_ref_minmax(maps), torch.as_tensor(labels))


def _brute_force(maps: torch.Tensor, labels: list[int], temperature: float) -> float:
    """The formula written out pair by pair in plain Python floats."""
    emb = _ref_minmax(maps).tolist()

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    terms = []
    n = len(labels)
    for a in range(n):
        for p in range(n):
            if a == p or labels[a] != labels[p]:
                continue
            num = math.exp(cos(emb[a], emb[p]) / temperature)
            den = num + sum(math.exp(cos(emb[a], emb[q]) / temperature) for q in range(n) if labels[q] != labels[a])
            terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


LAYOUTS = {
    "2x3": [0, 0, 0, 1, 1, 1],
    "3_unequal": [0, 0, 1, 1, 1, 1, 2, 2, 2],
    "4_groups": [0, 1, 2, 3, 0, 1, 2, 3, 3, 2],
    "singletons_mixed": [0, 0, 1, 2, 2, 2, 3, 4],
    "shuffled_ids": [7, 3, 7, 3, 5, 5, 7],
}

_MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("temperature", [0.5, 0.07, 1.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_pml_value_and_gradient(name: str, temperature: float, dtype: torch.dtype) -> None:
    labels = LAYOUTS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)) + int(temperature * 100))
    raw = torch.rand(len(labels), 6, 5, generator=g, dtype=torch.float64).pow(3).to(dtype)

    ours_in = raw.clone().requires_grad_(True)
    ref_in = raw.clone().requires_grad_(True)
    ours = contrastive_loss(ours_in, labels, temperature)
    ref = _pml(ref_in, labels, temperature)
    (g_ours,) = torch.autograd.grad(ours, ours_in)
    (g_ref,) = torch.autograd.grad(ref, ref_in)

    value_err = abs(ours.item() - ref.item())
    grad_err = (g_ours - g_ref).abs().max().item()
    _MEASURED[f"{name}/{temperature}/{dtype}"] = (value_err, grad_err)
    assert ours.dim() == 0
    assert value_err <= TOL, value_err
    # gradients up to ~4.4 here: 1e-6 relative to the largest component
    assert grad_err <= TOL * max(1.0, g_ref.abs().max().item()), grad_err
    if dtype == torch.float64:
        assert abs(ours.item() - _brute_force(raw, labels, temperature)) <= 1e-9


def test_labels_as_tensor_or_list_and_flat_maps() -> None:
    raw = torch.rand(6, 30, dtype=torch.float64)
    labels = [0, 0, 1, 1, 2, 2]
    a = contrastive_loss(raw, labels)
    b = contrastive_loss(raw.reshape(6, 5, 6), torch.tensor(labels))
    ref = _pml(raw, labels, 0.5)
    assert abs(float(a) - float(ref)) <= TOL
    assert abs(float(b) - float(ref)) <= TOL


def test_batch_of_images_is_sum_of_per_image_pml_losses() -> None:
    torch.manual_seed(3)
    B, V, h, w, T = 3, 3, 4, 4, 9
    maps = torch.rand(B, V, h, w, T, dtype=torch.float64).requires_grad_(True)
    groups = [[[1, 2], [1], []], [[5], [], [4, 6]]]
    ours = batched_concept_loss(maps, groups)
    ref = 0.0
    for b in range(B):
        emb, lab = [], []
        for k, group in enumerate(groups):
            for v, positions in enumerate(group):
                for t in positions:
                    emb.append(maps[b, v, :, :, t])
                    lab.append(k)
        ref = ref + _pml(torch.stack(emb), lab, 0.5)
    assert abs(ours.item() - ref.item()) <= TOL
    (g1,) = torch.autograd.grad(ours, maps)
    (g2,) = torch.autograd.grad(ref, maps)
    assert float((g1 - g2).abs().max()) <= TOL


def test_concept_embeddings_gather_the_right_maps() -> None:
    maps = torch.rand(3, 4, 5, 8)
    groups = [[[1], [2, 3], []], [[6], [], [7]]]
    emb, lab = concept_embeddings(maps, groups)
    expected = [maps[0, :, :, 1], maps[1, :, :, 2], maps[1, :, :, 3], maps[0, :, :, 6], maps[2, :, :, 7]]
    assert torch.equal(emb, torch.stack(expected))
    assert lab.tolist() == [0, 0, 0, 1, 1]
    assert abs(float(concept_loss(maps, groups)) - float(_pml(torch.stack(expected), [0, 0, 0, 1, 1], 0.5))) <= 1e-6


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [4, 4, 4]])
def test_zero_without_positives_or_negatives_keeps_graph(labels: list[int]) -> None:
    raw = torch.rand(len(labels), 3, 3, requires_grad=True)
    loss = contrastive_loss(raw, labels)
    assert loss.item() == 0.0
    assert _pml(raw, labels, 0.5).item() == 0.0
    assert loss.requires_grad
    (grad,) = torch.autograd.grad(loss, raw)
    assert torch.equal(grad, torch.zeros_like(raw))


def test_constant_map_gives_no_nan() -> None:
    raw = torch.rand(4, 3, 3, dtype=torch.float64)
    raw[1] = 0.25
    raw.requires_grad_(True)
    loss = contrastive_loss(raw, [0, 0, 1, 1])
    (grad,) = torch.autograd.grad(loss, raw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # The constant map becomes the zero vector: cosine 0 with everything.
    emb = _ref_minmax(raw.detach()).clone()
    emb[1] = 0.0
    ref = pml_losses.NTXentLoss(temperature=0.5)(emb, torch.tensor([0, 0, 1, 1]))
    assert abs(loss.item() - ref.item()) <= TOL


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="3 maps but 2 labels"):
        contrastive_loss(torch.rand(3, 4), [0, 1])
    with pytest.raises(ValueError, match="token position 9"):
        concept_loss(torch.rand(2, 3, 3, 5), [[[9], [1]], [[2], [3]]])
    with pytest.raises(ValueError, match="2 variants"):
        concept_loss(torch.rand(2, 3, 3, 5), [[[1]], [[2]]])


def test_report_measured_errors(capsys) -> None:
    """Prints the largest pml discrepancy seen (run with -s to read it)."""
    if not _MEASURED:
        pytest.skip("run together with the pml comparisons")
    lines = []
    for dt in ("float64", "float32"):
        vals = [v for k, v in _MEASURED.items() if k.endswith(dt)]
        lines.append(f"{dt}: value {max(v[0] for v in vals):.3e}, grad {max(v[1] for v in vals):.3e}")
        assert max(v[0] for v in vals) <= TOL
    with capsys.disabled():
        print("\n[pml NTXent] max |ours - pml| over", len(_MEASURED) // 2, "cases;", "; ".join(lines))
