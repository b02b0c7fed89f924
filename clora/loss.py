"""The contrastive attention loss of CLoRA: min-max normalised attention maps compared by NT-Xent.

Every embedding is one token's cross-attention map (flattened), min-max normalised to ``[0, 1]``; its label is the
concept the token belongs to.  Maps of the same concept (the same subject seen through different prompt variants,
or several tokens of one concept) are pulled together, maps of different concepts pushed apart.

The value equals pytorch-metric-learning's ``NTXentLoss(temperature=τ)(embeddings, labels)`` (cosine similarity,
mean over positive pairs) up to its ``log(x + tiny)`` guard; it is computed here with ``logsumexp`` and needs no
extra dependency.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["minmax_normalise", "contrastive_loss", "concept_embeddings", "concept_loss", "batched_concept_loss"]

Labels = Union[torch.Tensor, Sequence[int]]
Groups = Sequence[Sequence[Sequence[int]]]

_EPS = 1e-12


def minmax_normalise(maps: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Flatten ``maps`` (n, ...) to (n, d) and rescale each row to ``(m - min) / (max - min)``.

    A constant row (``max == min``) has its range clamped to ``eps`` and so becomes all zeros instead of NaN.
    """
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    return (flat - lo) / (hi - lo).clamp_min(eps)


def _labels_tensor(labels: Labels, n: int, device: torch.device) -> torch.Tensor:
    lab = torch.as_tensor(labels, device=device).reshape(-1)
    if lab.numel() != n:
        raise ValueError(f"contrastive_loss got {n} maps but {lab.numel()} labels; give one label per map.")
    return lab


def contrastive_loss(maps: torch.Tensor, labels: Labels, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over min-max normalised attention maps; a scalar tensor.

    maps: (n, h, w) or (n, d) raw attention maps (any trailing shape is flattened).
    labels: (n,) concept ids.

    With ``s`` the cosine similarity of the normalised maps and ``τ`` the temperature, every positive pair
    ``(a, p)`` (``a != p``, same label) contributes ``-log(exp(s_ap/τ) / (exp(s_ap/τ) + Σ_n exp(s_an/τ)))`` where
    ``n`` runs over the maps whose label differs from ``a``'s; the loss is the mean over positive pairs.  With no
    positive pair or no negative pair at all the loss is 0, still attached to the graph of ``maps``.  Computed as
    ``logaddexp(s_ap/τ, logsumexp_n s_an/τ) − s_ap/τ``.
    """
    if temperature <= 0:
        raise ValueError(f"The contrastive temperature must be positive, got {temperature}.")
    if maps.dim() < 2:
        raise ValueError(f"contrastive_loss expects maps of shape (n, h, w) or (n, d), got shape {tuple(maps.shape)}.")
    n = maps.shape[0]
    lab = _labels_tensor(labels, n, maps.device)
    zero = maps.sum() * 0.0

    same = lab[:, None] == lab[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=maps.device)
    pos = same & ~eye
    neg = ~same
    if not bool(pos.any()) or not bool(neg.any()):
        return zero

    emb = minmax_normalise(maps)
    unit = emb / emb.norm(dim=1, keepdim=True).clamp_min(_EPS)
    logits = unit @ unit.t() / temperature

    # log Σ_neg exp(s_an/τ) per anchor.  With at least two labels present every anchor has a negative, so each
    # row keeps finite entries and the -inf fill never produces NaN (value or gradient).
    lse_neg = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=1)

    a_idx, p_idx = pos.nonzero(as_tuple=True)
    s_ap = logits[a_idx, p_idx]
    per_pair = torch.logaddexp(s_ap, lse_neg[a_idx]) - s_ap
    return per_pair.mean()


def _check_groups(groups: Groups, variants: int, tokens: int) -> None:
    if len(groups) == 0:
        raise ValueError("concept_loss needs at least one concept group.")
    for k, group in enumerate(groups):
        if len(group) != variants:
            raise ValueError(
                f"Concept group {k} lists token positions for {len(group)} prompt variants, "
                f"but there are {variants} variants."
            )
        for v, positions in enumerate(group):
            for t in positions:
                if not 0 <= int(t) < tokens:
                    raise ValueError(
                        f"Concept group {k}, variant {v}: token position {t} is outside the prompt's {tokens} tokens."
                    )


def concept_embeddings(maps_by_row: torch.Tensor, groups: Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather one map per (concept, variant, token) and its concept label.

    maps_by_row: (V, h, w, T), one attention-map stack per prompt variant (index 0 is the base prompt).
    groups: ``groups[k][v]`` is the list of token positions of concept ``k`` in variant ``v``.
    Returns ``(maps (n, h, w), labels (n,))``, ordered by concept, then variant, then token.
    """
    if maps_by_row.dim() != 4:
        raise ValueError(f"concept_loss expects maps of shape (V, h, w, T), got shape {tuple(maps_by_row.shape)}.")
    variants, tokens = maps_by_row.shape[0], maps_by_row.shape[-1]
    _check_groups(groups, variants, tokens)
    rows: list[int] = []
    cols: list[int] = []
    labels: list[int] = []
    for k, group in enumerate(groups):
        for v, positions in enumerate(group):
            for t in positions:
                rows.append(v)
                cols.append(int(t))
                labels.append(k)
    device = maps_by_row.device
    if not rows:
        empty = maps_by_row[:0, :, :, 0]
        return empty, torch.zeros(0, dtype=torch.long, device=device)
    r = torch.tensor(rows, dtype=torch.long, device=device)
    c = torch.tensor(cols, dtype=torch.long, device=device)
    selected = maps_by_row[r, :, :, c]  # (n, h, w)
    return selected, torch.tensor(labels, dtype=torch.long, device=device)


def concept_loss(maps_by_row: torch.Tensor, groups: Groups, temperature: float = 0.5) -> torch.Tensor:
    """Contrastive loss of one image: :func:`concept_embeddings` then :func:`contrastive_loss`."""
    maps, labels = concept_embeddings(maps_by_row, groups)
    if maps.shape[0] == 0:
        return maps_by_row.sum() * 0.0
    return contrastive_loss(maps, labels, temperature)


def batched_concept_loss(maps: torch.Tensor, groups: Groups, temperature: float = 0.5) -> torch.Tensor:
    """Sum over a batch of images of :func:`concept_loss`; maps: (B, V, h, w, T).

    Images are independent: no map of one image is a positive or a negative for another.
    """
    if maps.dim() != 5:
        raise ValueError(f"batched_concept_loss expects maps of shape (B, V, h, w, T), got shape {tuple(maps.shape)}.")
    total = maps.sum() * 0.0
    for b in range(maps.shape[0]):
        total = total + concept_loss(maps[b], groups, temperature)
    return total
