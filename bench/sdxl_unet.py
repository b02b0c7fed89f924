"""SDXL-layout ldm UNets for the memory benchmarks and tests (shared by bench/sdxl_memory.py, bench/gpu.py, tests).

The ldm in this environment (Stability's SD2 ``openaimodel.UNetModel``) takes one ``transformer_depth`` for every
level and knows no ``num_classes="sequential"`` / ``adm_in_channels``.  `make_sdxl_unet` builds the UNet with depth 1
and then puts in ``SpatialTransformer``s of the depth each level has (SDXL: 0 / 2 / 10, middle 10), and adds sgm's
``label_emb`` (``Sequential(Sequential(Linear(adm, 4·C), SiLU, Linear(4·C, 4·C)))``) with ``num_classes =
"sequential"``, so that ldm's own forward adds ``label_emb(y)`` to the time embedding as sgm's does.  Module names
and parameter shapes are those of an SDXL checkpoint's ``model.diffusion_model`` (sgm layout).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = ["sdxl_unet_config", "tiny_sdxl_unet_config", "make_sdxl_unet", "sdxl_cross_attention_names"]


def sdxl_unet_config() -> dict[str, Any]:
    """The real SDXL base UNet (sgm's ``sd_xl_base.yaml``), in `make_sdxl_unet`'s form.  A fresh dict per call."""
    return {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4],
        "num_head_channels": 64,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": [0, 2, 10],  # per level (sgm); `make_sdxl_unet` also reads "transformer_depth_middle"
        "transformer_depth_middle": 10,
        "context_dim": 2048,
        "adm_in_channels": 2816,
        "use_checkpoint": False,
        "legacy": False,
    }


def tiny_sdxl_unet_config() -> dict[str, Any]:
    """A small UNet of SDXL's layout (three levels, attention at down-sampling factors 2 and 4 only, linear
    projections, several transformer layers per block, a vector conditioning): about 10 M parameters."""
    return {
        "image_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4],
        "num_head_channels": 16,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": [0, 2, 3],
        "transformer_depth_middle": 3,
        "context_dim": 80,
        "adm_in_channels": 48,
        "use_checkpoint": False,
        "legacy": False,
    }


def _deep_spatial_transformer():
    """ldm's ``SpatialTransformer`` whose forward gives one context to every layer (this ldm indexes a list of
    contexts by layer and wraps a single tensor in a one-element list, so depth > 1 fails there)."""
    from ldm.modules.attention import SpatialTransformer

    class DeepSpatialTransformer(SpatialTransformer):
        def forward(self, x, context=None):
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            return super().forward(x, context)

    return DeepSpatialTransformer


def make_sdxl_unet(config: dict[str, Any], *, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                   seed: Optional[int] = 0) -> nn.Module:
    """An ldm ``UNetModel`` of ``config`` (see `sdxl_unet_config`), in eval mode, parameters frozen.

    ``device="meta"`` (or ``seed=None``, e.g. under a ``FakeTensorMode``): built without touching values, for
    counting.  Otherwise seeded random weights, with the layers ldm zero-initialises redrawn (else the blocks'
    outputs would not depend on their attention).  ``unet.dtype`` is set to ``dtype`` (ldm casts the input to it,
    as with its ``use_fp16``)."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(config)
    depths = list(cfg.pop("transformer_depth"))
    depth_middle = int(cfg.pop("transformer_depth_middle", depths[-1]))
    adm = cfg.pop("adm_in_channels", None)
    mc, mults = cfg["model_channels"], list(cfg["channel_mult"])
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetModel(transformer_depth=1, **cfg)
        for parent in list(unet.modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, SpatialTransformer):
                    continue
                is_middle = any(child is m for m in unet.middle_block.modules())
                ch = child.in_channels
                depth = depth_middle if is_middle else depths[mults.index(ch // mc)]
                attn = child.transformer_blocks[0].attn1
                heads = attn.heads
                replacement = _deep_spatial_transformer()(
                    ch, heads, ch // heads, depth=depth, context_dim=[cfg["context_dim"]] * depth,
                    use_linear=cfg.get("use_linear_in_transformer", False), use_checkpoint=False,
                )
                setattr(parent, child_name, replacement)
        if adm is not None:
            ted = mc * 4
            unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm, ted), nn.SiLU(), nn.Linear(ted, ted)))
            unet.num_classes = "sequential"
    if str(device) != "meta" and seed is not None:
        from tests.models import redraw_zero_layers

        with torch.no_grad():
            redraw_zero_layers(unet, torch.Generator().manual_seed(seed or 0))
    unet = unet.to(dtype=dtype).eval()
    unet.dtype = dtype
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet


def sdxl_cross_attention_names(unet: nn.Module) -> list[str]:
    """Names of the cross-attention layers (``...attn2``) in registration order."""
    return [n for n, _ in unet.named_modules() if n.endswith(".attn2")]
