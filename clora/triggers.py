"""Trigger-word suggestions for the accordion: where they come from, in the order users trust them, and which one to
fill in for a binding.

Sources, most trusted first (`trigger_sources`):

1. ``activation text`` of the WebUI's own per-LoRA user metadata — the ``<lora>.json`` sidecar that the LoRA card's
   *Edit metadata* dialog writes (A1111 and Forge);
2. trained words another tool stored beside the LoRA: ``trainedWords`` / ``trained words`` / ``trigger words`` in
   that ``.json`` sidecar, or ``trainedWords`` in a Civitai ``<lora>.civitai.info`` file;
3. ``modelspec.trigger_phrase`` in the file's safetensors metadata (set on purpose by the trainer);
4. the kohya training tags ``ss_tag_frequency``: only the tags found in the most captions (a trigger word is in every
   caption; "outdoors" in six of them is not one).

`pick_trigger` takes the first source that still has something once the binding's own subject words are taken out
("sks dog" bound to *dog* gives "sks") and every candidate that contains *another* binding's subject word is dropped
(a cat LoRA tagged "sks dog" would put a second *dog* into the prompt).  Reading a source never loads the LoRA's
tensors: the safetensors header is read on its own.  Pure Python, no host imports.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

__all__ = [
    "TriggerSource",
    "read_safetensors_metadata",
    "sources_from_metadata",
    "trigger_sources",
    "pick_trigger",
    "SOURCE_LABELS",
]

#: Source name -> what the README calls it.
SOURCE_LABELS = {
    "activation": "activation text (WebUI user metadata)",
    "trained": "trained words (.json sidecar / .civitai.info)",
    "modelspec": "modelspec.trigger_phrase",
    "tags": "most frequent training tags (ss_tag_frequency)",
}

_MAX_HEADER = 100 * 1024 * 1024  # a safetensors header larger than this is not read


@dataclass(frozen=True)
class TriggerSource:
    """One source of suggestions: its name (a key of `SOURCE_LABELS`) and its candidates in order.  ``whole``: the
    candidates form one text (the user's activation text) and are filled in together, not just the first."""

    name: str
    words: tuple[str, ...]
    whole: bool = False


def read_safetensors_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file, from its header only ({} when unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return {}
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > _MAX_HEADER:
                return {}
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        return {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _split(value: Any) -> list[str]:
    """Comma-separated text or a list of texts -> stripped, non-empty items (whitespace collapsed)."""
    if isinstance(value, str):
        items: Iterable[Any] = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [part for v in value if isinstance(v, str) for part in v.split(",")]
    else:
        return []
    return [" ".join(str(v).split()) for v in items if str(v).strip()]


def _top_tags(raw: Optional[str]) -> list[str]:
    """The ``ss_tag_frequency`` tags whose count (summed over the datasets) is the highest, in first-seen order."""
    if not raw:
        return []
    try:
        freq = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(freq, dict):
        return []
    counts: dict[str, int] = {}
    for tags in freq.values():
        if not isinstance(tags, dict):
            continue
        for tag, n in tags.items():
            tag = " ".join(str(tag).split())
            if tag and isinstance(n, (int, float)) and not isinstance(n, bool):
                counts[tag] = counts.get(tag, 0) + int(n)
    if not counts:
        return []
    top = max(counts.values())
    return [tag for tag, n in counts.items() if n == top and n > 0]


_TRAINED_KEYS = ("trainedWords", "trained words", "trained_words", "trigger words", "triggerWords", "trigger_words")


def sources_from_metadata(
    metadata: Mapping[str, Any], sidecar: Optional[Mapping[str, Any]] = None, civitai: Optional[Mapping[str, Any]] = None
) -> list[TriggerSource]:
    """The non-empty sources, most trusted first, from already-read metadata (see the module docstring)."""
    sidecar = sidecar or {}
    civitai = civitai or {}
    out: list[TriggerSource] = []
    activation = _split(sidecar.get("activation text"))
    if activation:
        out.append(TriggerSource("activation", tuple(activation), whole=True))
    trained: list[str] = []
    for key in _TRAINED_KEYS:
        trained += _split(sidecar.get(key))
    trained += _split(civitai.get("trainedWords"))
    if trained:
        out.append(TriggerSource("trained", tuple(dict.fromkeys(trained))))
    phrase = _split(metadata.get("modelspec.trigger_phrase"))
    if phrase:
        out.append(TriggerSource("modelspec", tuple(phrase)))
    tags = _top_tags(metadata.get("ss_tag_frequency"))
    if tags:
        out.append(TriggerSource("tags", tuple(tags)))
    return out


def trigger_sources(path: Union[str, Path]) -> list[TriggerSource]:
    """The sources of the LoRA file at ``path`` (its header, ``<stem>.json`` and ``<stem>.civitai.info``)."""
    p = Path(path)
    metadata = read_safetensors_metadata(p) if p.suffix.lower() == ".safetensors" else {}
    sidecar = _read_json(p.with_suffix(".json"))
    civitai = _read_json(p.with_name(p.stem + ".civitai.info"))
    return sources_from_metadata(metadata, sidecar, civitai)


def _word_pattern(word: str) -> re.Pattern:
    # whole words, any case, any whitespace between the words of a phrase
    parts = [re.escape(w) for w in word.split()]
    return re.compile(r"(?i)(?<!\w)" + r"\s+".join(parts) + r"(?!\w)")


def _clean(words: Sequence[str]) -> list[str]:
    return [" ".join(str(w).split()) for w in words if str(w).strip()]


def pick_trigger(
    sources: Sequence[TriggerSource], own_subjects: Sequence[str] = (), other_subjects: Sequence[str] = ()
) -> str:
    """The trigger text to fill in for a binding whose subject words are ``own_subjects`` while the other bindings
    hold ``other_subjects`` ("" when no source has a usable candidate).

    Each candidate loses the binding's own subject words; a candidate that contains another binding's subject word
    is dropped.  The first source with something left gives the suggestion: all of it for the activation text
    (joined with ", "), its first candidate otherwise."""
    own = [_word_pattern(s) for s in _clean(own_subjects)]
    others = [_word_pattern(s) for s in _clean(other_subjects) if s.strip().lower() not in
              {o.strip().lower() for o in _clean(own_subjects)}]
    for source in sources:
        kept: list[str] = []
        for word in source.words:
            if any(o.search(word) for o in others):
                continue
            cleaned = str(word)
            for pattern in own:
                cleaned = pattern.sub(" ", cleaned)
            cleaned = " ".join(cleaned.split()).strip(" ,")
            if cleaned and cleaned.lower() not in {k.lower() for k in kept}:
                kept.append(cleaned)
        if kept:
            return ", ".join(kept) if source.whole else kept[0]
    return ""
