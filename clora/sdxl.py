"""SDXL conditioning, host-free: the pooled vector ``y`` and the two text encoders' outputs, as sgm computes them.

SDXL's UNet takes ``context`` (``(N, 77, D1 + D2)``: the first encoder's penultimate hidden states beside the
second's) and ``y`` (``(N, P + 6·F)``: the second encoder's pooled, projected output beside Fourier embeddings of
the original size, the crop's top-left corner and the target size, ``F`` = 256 per scalar in SDXL, sgm's
``ConcatTimestepEmbedderND``).  Everything here takes the modules as arguments (transformers' ``CLIPTextModel`` /
``CLIPTextModelWithProjection``, open_clip's ``TextTransformer``) and never imports a host or those libraries.

The open_clip tower (SDXL's second encoder in A1111) runs its attention through ``nn.MultiheadAttention``, whose
fused weights forward hooks cannot reach: `open_clip_encode` applies a variant's LoRAs through
`clora.lora.functional` (``W + ΔW`` given to ``torch.func.functional_call``), never writing the model.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .lora.functional import ParamTarget, lora_parameters

__all__ = ["fourier_embedding", "size_vector", "hf_clip_encode", "OpenClipEncode", "open_clip_encode", "SDXL_SIZE_DIM"]

#: Fourier features per size scalar in SDXL (sgm ``ConcatTimestepEmbedderND(outdim=256)``; 6 scalars -> 1536).
SDXL_SIZE_DIM = 256


def fourier_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``(N, k)`` scalars -> ``(N, k·dim)``: each scalar as ``[cos(v·f_i), sin(v·f_i)]`` with
    ``f_i = max_period^(-i/half)``, ``half = dim // 2`` (sgm's ``timestep_embedding``; a zero column for odd ``dim``)."""
    if values.dim() == 1:
        values = values[:, None]
    n, k = values.shape
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.reshape(n, k * dim)


def size_vector(n: int, original_size: Sequence[int], crop_top_left: Sequence[int], target_size: Sequence[int],
                dim: int = SDXL_SIZE_DIM, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(n, 6·dim)``: Fourier embeddings of (original h, w), (crop top, left), (target h, w), in that order (sgm's
    ``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple`` embedders)."""
    parts = []
    for pair in (original_size, crop_top_left, target_size):
        v = torch.tensor([[float(pair[0]), float(pair[1])]], device=device).expand(n, 2)
        parts.append(fourier_embedding(v, dim))
    return torch.cat(parts, dim=-1).to(dtype)


def hf_clip_encode(model: nn.Module, ids: torch.Tensor, layer: int = -2) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(hidden, pooled)`` of a transformers CLIP text model: ``hidden_states[layer]`` (-2: the penultimate layer,
    before the final layer norm, as SDXL uses both encoders) and, for a ``CLIPTextModelWithProjection``, its
    ``text_embeds`` (the final-norm EOS token projected), else ``None``."""
    out = model(input_ids=ids, output_hidden_states=True)
    pooled = getattr(out, "text_embeds", None)
    return out.hidden_states[layer], pooled


class OpenClipEncode(nn.Module):
    """sgm's ``FrozenOpenCLIPEmbedder2`` computation (``layer="penultimate"``, pooled) around an open_clip
    ``TextTransformer``, as a module so that ``functional_call`` can give it other parameters.  Holds the tower as
    ``model`` (its parameters are ``model.<name>``); owns no parameters of its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND (open_clip 2.20's resblocks are not batch-first)
        blocks = list(m.transformer.resblocks)
        penultimate = None
        for i, r in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x.permute(1, 0, 2)
            x = r(x, attn_mask=m.attn_mask)
        last = m.ln_final(x.permute(1, 0, 2))
        pooled = last[torch.arange(last.shape[0], device=ids.device), ids.argmax(dim=-1)] @ m.text_projection
        return penultimate, pooled


def open_clip_encode(model: nn.Module, ids: torch.Tensor, targets: Sequence[ParamTarget] = (),
                     row_loras: Optional[Sequence[Iterable[tuple[int, float]]]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penultimate hidden, pooled)`` of an open_clip text tower for ``ids`` ``(N, T)``.

    ``row_loras[r]`` lists the ``(lora_index, weight)`` applied to row ``r``: rows with the same LoRAs run together in
    one call with ``W + ΔW`` (`lora_parameters`) through ``torch.func.functional_call``; the tower's parameters are
    never written (the same objects, bit-identical values afterwards, also after an exception)."""
    enc = OpenClipEncode(model)
    n = ids.shape[0]
    if row_loras is None or not targets:
        return enc(ids)
    if len(row_loras) != n:
        raise ValueError(f"{n} token rows but {len(row_loras)} LoRA lists")
    groups: dict[tuple, list[int]] = {}
    for r, loras in enumerate(row_loras):
        key = tuple(sorted((int(i), float(w)) for i, w in loras if float(w) != 0.0))
        groups.setdefault(key, []).append(r)
    hidden: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None
    for key, rows in groups.items():
        idx = torch.tensor(rows, device=ids.device)
        params = {f"model.{k}": v for k, v in lora_parameters(model, targets, key).items()}
        if params:
            h, p = torch.func.functional_call(enc, params, (ids[idx],), strict=False)
        else:
            h, p = enc(ids[idx])
        if hidden is None:
            hidden = h.new_empty((n, *h.shape[1:]))
            pooled = p.new_empty((n, *p.shape[1:]))
        hidden[idx] = h
        pooled[idx] = p
    return hidden, pooled
