"""CLoRA for the A1111/Forge WebUIs: the host-free engine.

The public pieces, importable without a WebUI (torch, numpy and safetensors only)::

    from clora import CloraSettings, Binding, StyleLora, Composer, build_compose_plan, contrastive_loss, concept_loss
    from clora import fusion_masks, AttentionCapture, LoraRows, RowPlan, load_lora, build_variants
    from clora import Conditioning  # context + pooled vector (SDXL) for the Composer
"""
from __future__ import annotations

from .attention import AttentionCapture, map_size
from .compose import ComposePlan, Composer, Conditioning, NonFiniteError, StepRecord, build_compose_plan
from .lora.files import load_lora
from .lora.rows import LoraRows, RowPlan
from .loss import concept_loss, contrastive_loss
from .masks import fusion_masks
from .prompts import build_variants
from .settings import Binding, CloraSettings, StyleLora
from .update import latent_step

__all__ = [
    "AttentionCapture", "map_size", "ComposePlan", "Composer", "Conditioning", "NonFiniteError", "StepRecord", "build_compose_plan", "load_lora",
    "LoraRows", "RowPlan", "concept_loss", "contrastive_loss", "fusion_masks", "build_variants", "Binding",
    "CloraSettings", "StyleLora", "latent_step",
]
