"""LoRA files: reading (`files`), dense updates (`dense`), module-tree resolution (`keymap`)."""
from .types import LoraError, LoraFile, LoraModule
from .files import check_family, detect_family, load_lora
from .keymap import HOST_ROOTS, ResolvedLora, full_path, resolve, text_stem_table, unet_stem_table

__all__ = [
    "LoraError", "LoraFile", "LoraModule", "load_lora", "check_family", "detect_family", "HOST_ROOTS", "full_path",
    "resolve", "ResolvedLora", "text_stem_table", "unet_stem_table",
]
