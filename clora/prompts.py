"""Prompt variants and the token positions of each concept, through the host's own tokenizer.

CLoRA runs one prompt variant per bound LoRA: variant 0 is the user's prompt unchanged, variant k is the prompt with
binding k's trigger words inserted right before the first occurrence of its subject.  The contrastive loss needs,
for every concept and every variant, the positions of the concept's tokens in the conditioning tensor; the masks need,
for every variant, the positions of its own trigger and subject tokens.

Positions are counted in the conditioning tensor the host builds: the prompt is cut into chunks of at most 75 token
ids and each chunk is encoded as BOS + 75 ids (padded) + EOS, so index ``j`` of chunk ``c`` is at
``c * 77 + 1 + j``.  The host decides the chunks (its emphasis parser, BREAK, comma backtracking, embeddings) through
a `PromptTokenizer`; `HFPromptTokenizer` is the adapter used by tests and the standalone runner.

How a subject is found: its whole-word occurrences in the prompt text (case-insensitive, outside ``<lora:...>``
tags and ``:1.2)`` weights) give candidate places; the number of tokens the host produces for the text before a
candidate gives its token index; the candidate counts when the host's token ids there equal the subject's own ids.
So words split into several BPE tokens, repeated words, emphasis such as ``(cat:1.2)``, BREAK and prompts longer
than one chunk all work, and "cat" never matches "catalog" or the tail of "zorgcat" (z + org + cat).  The host's
``chunks`` must therefore give, for a prefix of a prompt cut at a word boundary, a prefix of the prompt's own ids
(true of A1111's and Forge's tokenisation: they tokenise word by word).

Not supported: AND-composed prompts (refused with `PromptError`), and prompt editing / alternation syntax
(``[a:b:0.5]``, ``[a|b]``), which the hosts resolve into plain prompts per step: pass the resolved prompt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol, Sequence

from .settings import Binding

__all__ = [
    "PromptError",
    "PromptTokenizer",
    "HFPromptTokenizer",
    "Fragment",
    "VariantPlan",
    "CHUNK_TOKENS",
    "CHUNK_STRIDE",
    "parse_emphasis",
    "strip_extra_networks",
    "split_chunks",
    "token_position",
    "chunk_positions",
    "find_phrase",
    "insert_trigger",
    "build_variants",
]

CHUNK_TOKENS = 75
CHUNK_STRIDE = CHUNK_TOKENS + 2  # BOS + 75 + EOS
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"

_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_AND = re.compile(r"\bAND\b")
_EXPLICIT_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_ESCAPABLE = "()[]\\"
_ROUND_UP = 1.1
_SQUARE_DOWN = 1 / 1.1


class PromptError(ValueError):
    """The prompt and the bindings do not fit together; the message is meant for the user as it is."""


class PromptTokenizer(Protocol):
    """The host's tokenisation, as CLoRA needs it.

    ``chunks(prompt)``: the prompt's token ids in chunks of at most 75, as the host encodes them: BOS/EOS and padding
    excluded, emphasis syntax already removed, BREAK starting a new chunk, one id per conditioning position.
    ``word_ids(text)``: the ids of a plain word or phrase on its own.
    """

    def chunks(self, prompt: str) -> list[list[int]]:
        ...

    def word_ids(self, text: str) -> list[int]:
        ...


# ----- emphasis syntax and chunking (the HF adapter's parts) ----------------------------------------------


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one emphasis weight, or a BREAK (``is_break``, empty text)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


def strip_extra_networks(prompt: str) -> str:
    """Remove ``<lora:name:1>``-style extra-network tags (the hosts remove them before tokenising)."""
    return _EXTRA_NETWORK.sub("", prompt)


def _text_fragments(text: str) -> list[list[Any]]:
    """Plain text split on BREAK into mutable ``[text, weight, is_break]`` entries."""
    parts = _BREAK.split(text)
    out: list[list[Any]] = []
    for i, part in enumerate(parts):
        if i:
            out.append(["", 1.0, True])
        out.append([part, 1.0, False])
    return out


def parse_emphasis(prompt: str) -> list[Fragment]:
    """Split A1111 emphasis syntax into weighted fragments.

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.3)`` multiplies by 1.3; ``\\(``, ``\\)``, ``\\[``,
    ``\\]`` and ``\\\\`` are literal characters and a lone backslash is dropped; brackets left open apply to the end of
    the prompt; closing brackets without an opener and ``:`` outside ``(x:w)`` are literal text.  Neighbouring
    fragments of equal weight are merged (so the text is tokenised in the same pieces the host tokenises).
    """
    res: list[list[Any]] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            res.extend(_text_fragments("".join(buf)))
            buf.clear()

    def scale_from(start: int, factor: float) -> None:
        for entry in res[start:]:
            if not entry[2]:
                entry[1] *= factor

    i, n = 0, len(prompt)
    while i < n:
        ch = prompt[i]
        if ch == "\\":
            flush()
            if i + 1 < n and prompt[i + 1] in _ESCAPABLE:
                res.append([prompt[i + 1], 1.0, False])
                i += 2
            else:
                i += 1  # a lone backslash vanishes
            continue
        if ch in "([":
            flush()
            (round_open if ch == "(" else square_open).append(len(res))
            i += 1
            continue
        if ch == ":" and round_open:
            m = _EXPLICIT_WEIGHT.match(prompt, i)
            if m:
                try:
                    factor = float(m.group(1))
                except ValueError:
                    factor = None
                if factor is not None:
                    flush()
                    scale_from(round_open.pop(), factor)
                    i = m.end()
                    continue
        if ch == ")" and round_open:
            flush()
            scale_from(round_open.pop(), _ROUND_UP)
            i += 1
            continue
        if ch == "]" and square_open:
            flush()
            scale_from(square_open.pop(), _SQUARE_DOWN)
            i += 1
            continue
        buf.append(ch)
        i += 1
    flush()
    for start in round_open:
        scale_from(start, _ROUND_UP)
    for start in square_open:
        scale_from(start, _SQUARE_DOWN)
    merged: list[list[Any]] = []
    for entry in res:
        if merged and not entry[2] and not merged[-1][2] and merged[-1][1] == entry[1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    if not merged:
        merged = [["", 1.0, False]]
    return [Fragment(text, weight, brk) for text, weight, brk in merged]


def split_chunks(
    pieces: Sequence[Optional[Sequence[int]]],
    comma_id: Optional[int],
    *,
    size: int = CHUNK_TOKENS,
    backtrack: int = COMMA_BACKTRACK,
) -> list[list[int]]:
    """Cut token pieces into chunks of at most ``size`` ids; ``None`` in ``pieces`` is a BREAK (ends the chunk).

    When a chunk is full and another id follows, the ids after the chunk's last comma move to the next chunk if
    that comma is at most ``backtrack`` ids from the end (A1111's comma padding backtrack; 0 turns it off).  A BREAK
    always ends the current chunk, even an empty one; the last chunk is kept when it holds ids or is the only one.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1
    for piece in pieces:
        if piece is None:
            chunks.append(current)
            current, last_comma = [], -1
            continue
        for tok in piece:
            if comma_id is not None and tok == comma_id:
                last_comma = len(current)
            elif backtrack and len(current) == size and last_comma != -1 and size - last_comma <= backtrack:
                moved = current[last_comma + 1 :]
                chunks.append(current[: last_comma + 1])
                current, last_comma = moved, -1
            if len(current) == size:
                chunks.append(current)
                current, last_comma = [], -1
            current.append(tok)
    if current or not chunks:
        chunks.append(current)
    return chunks


class HFPromptTokenizer:
    """`PromptTokenizer` over a transformers ``CLIPTokenizer``, reproducing A1111's SD1 prompt handling.

    Extra-network tags are removed, emphasis syntax is parsed (`parse_emphasis`), each fragment is tokenised on its
    own, BREAK ends a chunk and chunks of 75 ids are cut with A1111's comma backtracking (`split_chunks`).
    Not reproduced: textual-inversion embeddings (their names are tokenised as words) and prompt editing /
    alternation (``[a:b:0.5]``, ``[a|b]``), which the hosts resolve into plain prompts before tokenising.
    """

    def __init__(self, tokenizer: Any, *, chunk_size: int = CHUNK_TOKENS, comma_backtrack: int = COMMA_BACKTRACK):
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.comma_backtrack = comma_backtrack
        comma = tokenizer.get_vocab().get(",</w>")
        self.comma_id: Optional[int] = None if comma is None else int(comma)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        out = self.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        return [list(map(int, ids)) for ids in out]

    def chunks(self, prompt: str) -> list[list[int]]:
        fragments = parse_emphasis(strip_extra_networks(prompt))
        texts = [f.text for f in fragments if not f.is_break]
        ids = iter(self._ids(texts))
        pieces = [None if f.is_break else next(ids) for f in fragments]
        return split_chunks(pieces, self.comma_id, size=self.chunk_size, backtrack=self.comma_backtrack)

    def word_ids(self, text: str) -> list[int]:
        return self._ids([text])[0]


# ----- positions ------------------------------------------------------------------------------------------


def token_position(chunk: int, index: int) -> int:
    """Position in the conditioning tensor of id ``index`` of chunk ``chunk``: ``chunk * 77 + 1 + index``."""
    return chunk * CHUNK_STRIDE + 1 + index


def chunk_positions(chunks: Sequence[Sequence[int]]) -> list[int]:
    """Conditioning position of every id of the flattened chunks, in order."""
    return [token_position(c, j) for c, chunk in enumerate(chunks) for j in range(len(chunk))]


def _n_tokens(tokenizer: PromptTokenizer, text: str) -> int:
    return sum(len(c) for c in tokenizer.chunks(text))


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern of a phrase; any run of whitespace between its words."""
    words = [re.escape(w) for w in phrase.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def _syntax_spans(prompt: str) -> list[tuple[int, int]]:
    """Character spans that are syntax, not words: extra-network tags and explicit weights such as ``:1.2)``."""
    return [m.span() for pattern in (_EXTRA_NETWORK, _EXPLICIT_WEIGHT) for m in pattern.finditer(prompt)]


@dataclass(frozen=True)
class _Occurrence:
    char_start: int
    flat_index: int
    n_tokens: int


def _occurrences(prompt: str, phrase: str, tokenizer: PromptTokenizer, flat: Sequence[int]) -> list[_Occurrence]:
    """Whole-word occurrences of ``phrase`` in ``prompt`` whose host token ids are the phrase's own ids."""
    ids = list(tokenizer.word_ids(phrase))
    if not ids or not phrase.split():
        return []
    syntax = _syntax_spans(prompt)
    found: list[_Occurrence] = []
    for m in _phrase_pattern(phrase).finditer(prompt):
        if any(a <= m.start() < b for a, b in syntax):
            continue
        at = _n_tokens(tokenizer, prompt[: m.start()])
        if list(flat[at : at + len(ids)]) == ids:
            found.append(_Occurrence(m.start(), at, len(ids)))
    return found


def find_phrase(prompt: str, phrase: str, tokenizer: PromptTokenizer) -> list[list[int]]:
    """Conditioning positions of every whole-word occurrence of ``phrase`` (one list per occurrence)."""
    chunks = tokenizer.chunks(prompt)
    flat = [t for c in chunks for t in c]
    pos = chunk_positions(chunks)
    return [pos[o.flat_index : o.flat_index + o.n_tokens] for o in _occurrences(prompt, phrase, tokenizer, flat)]


def insert_trigger(prompt: str, at: int, triggers: str) -> str:
    """``prompt`` with ``triggers`` and a space inserted at character ``at`` (inside any emphasis there)."""
    if not triggers:
        return prompt
    return prompt[:at] + triggers + " " + prompt[at:]


# ----- the plan -------------------------------------------------------------------------------------------


@dataclass
class VariantPlan:
    """Prompt variants and token positions for one prompt and its bindings.

    prompts: variant 0 = the prompt unchanged, variant k = binding k's variant (its triggers inserted).
    groups: ``groups[k][v]`` = positions of concept k (binding k) in variant v: all occurrences of its subjects,
        plus its trigger tokens in its own variant ``k + 1``.
    mask_tokens: ``mask_tokens[v]`` = positions whose maps make variant v's mask: ``[]`` for the base, binding
        ``v - 1``'s trigger and subject tokens in its own variant otherwise.
    chunks: the host's chunks of every variant (ids without BOS/EOS).
    labels: how each concept is named in messages, e.g. ``"'cat' (LoRA 'cat_v1')"``.
    """

    prompts: list[str]
    groups: list[list[list[int]]]
    mask_tokens: list[list[int]]
    chunks: list[list[list[int]]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def n_variants(self) -> int:
        return len(self.prompts)

    @property
    def n_chunks(self) -> int:
        """The most chunks any variant needs (hosts pad every variant to this many)."""
        return max((len(c) for c in self.chunks), default=1)

    def describe(self) -> str:
        """Readable summary for debugging: variants, and per concept its positions with the ids found there."""

        def ids_at(v: int, positions: Iterable[int]) -> str:
            if v >= len(self.chunks):
                return ", ".join(str(p) for p in positions)
            items = []
            for p in positions:
                c, j = divmod(p, CHUNK_STRIDE)
                chunk = self.chunks[v][c] if c < len(self.chunks[v]) else []
                tok = chunk[j - 1] if 1 <= j <= len(chunk) else "?"
                items.append(f"{p}:{tok}")
            return "[" + ", ".join(items) + "]"

        lines = []
        for v, p in enumerate(self.prompts):
            lines.append(f"variant {v}{' (base)' if v == 0 else ''}: {p!r}")
        for k, per_variant in enumerate(self.groups):
            label = self.labels[k] if k < len(self.labels) else f"concept {k + 1}"
            cells = "; ".join(f"v{v} {ids_at(v, pos)}" for v, pos in enumerate(per_variant))
            lines.append(f"concept {k + 1} {label}: {cells}")
        lines.append("mask tokens: " + "; ".join(f"v{v} {ids_at(v, pos)}" for v, pos in enumerate(self.mask_tokens)))
        return "\n".join(lines)


class _Memo:
    """Per-call cache over a `PromptTokenizer` (the same prefixes and words are tokenised for every variant)."""

    def __init__(self, tokenizer: PromptTokenizer):
        self._tokenizer = tokenizer
        self._chunks: dict[str, list[list[int]]] = {}
        self._words: dict[str, list[int]] = {}

    def chunks(self, prompt: str) -> list[list[int]]:
        if prompt not in self._chunks:
            self._chunks[prompt] = [list(c) for c in self._tokenizer.chunks(prompt)]
        return self._chunks[prompt]

    def word_ids(self, text: str) -> list[int]:
        if text not in self._words:
            self._words[text] = list(self._tokenizer.word_ids(text))
        return self._words[text]


def _label(binding: Binding) -> str:
    return f"'{'|'.join(binding.subjects)}' (LoRA '{binding.lora}')"


def build_variants(prompt: str, bindings: Sequence[Binding], tokenizer: PromptTokenizer) -> VariantPlan:
    """Variants, concept groups and mask tokens for ``prompt`` and ``bindings`` (only their ``lora``, ``subjects``
    and ``triggers`` are read).

    Triggers go right before the earliest occurrence (in the text) of any of the binding's subjects.  Raises
    `PromptError` for AND-composed prompts, a subject missing from the prompt, and two bindings on one token.
    """
    if _AND.search(strip_extra_networks(prompt)):
        raise PromptError(
            "AND-composed prompts (composable diffusion) are not supported with CLoRA; remove AND from the prompt."
        )
    tokenizer = _Memo(tokenizer)
    base_chunks = tokenizer.chunks(prompt)
    base_flat = [t for c in base_chunks for t in c]

    # Where each binding's trigger goes: its subjects' earliest occurrence in the base prompt.
    insert_at: list[int] = []
    for b in bindings:
        if not b.subjects:
            raise PromptError(f"LoRA '{b.lora}' is bound to no subject word.")
        starts = []
        for subject in b.subjects:
            occ = _occurrences(prompt, subject, tokenizer, base_flat)
            if not occ:
                raise PromptError(f"'{subject}' (LoRA '{b.lora}') is not in the prompt.")
            starts.append(occ[0].char_start)
        insert_at.append(min(starts))

    prompts = [prompt] + [insert_trigger(prompt, at, b.triggers) for b, at in zip(bindings, insert_at)]
    groups: list[list[list[int]]] = [[] for _ in bindings]
    mask_tokens: list[list[int]] = [[]]
    all_chunks: list[list[list[int]]] = []
    for v, text in enumerate(prompts):
        chunks = base_chunks if v == 0 else tokenizer.chunks(text)
        all_chunks.append(chunks)
        flat = [t for c in chunks for t in c]
        pos = chunk_positions(chunks)
        owner: dict[int, tuple[int, str]] = {}
        for k, b in enumerate(bindings):
            positions: set[int] = set()
            for subject in b.subjects:
                occ = _occurrences(text, subject, tokenizer, flat)
                if not occ:
                    raise PromptError(
                        f"'{subject}' (LoRA '{b.lora}') was not found in the variant {text!r}; "
                        "check the trigger words of the other LoRAs."
                    )
                for o in occ:
                    for f in range(o.flat_index, o.flat_index + o.n_tokens):
                        _claim(owner, pos[f], k, subject, bindings)
                        positions.add(pos[f])
            if v == k + 1 and b.triggers:
                # The trigger's tokens: from the insertion point to the subject occurrence right after it.
                at = insert_at[k]
                subject_at = at + len(b.triggers) + 1
                following = [o for s in b.subjects for o in _occurrences(text, s, tokenizer, flat)
                             if o.char_start == subject_at]
                start = _n_tokens(tokenizer, text[:at])
                if not following or following[0].flat_index <= start:
                    raise PromptError(
                        f"The trigger words '{b.triggers}' of LoRA '{b.lora}' could not be placed before its subject "
                        f"in {text!r}."
                    )
                for f in range(start, following[0].flat_index):
                    _claim(owner, pos[f], k, f"trigger '{b.triggers}'", bindings)
                    positions.add(pos[f])
            groups[k].append(sorted(positions))
        if v > 0:
            mask_tokens.append(list(groups[v - 1][v]))
    return VariantPlan(
        prompts=prompts,
        groups=groups,
        mask_tokens=mask_tokens,
        chunks=all_chunks,
        labels=[_label(b) for b in bindings],
    )


def _claim(owner: dict[int, tuple[int, str]], position: int, k: int, what: str, bindings: Sequence[Binding]) -> None:
    """Record that ``position`` belongs to binding ``k``; two bindings on one token is an error."""
    previous = owner.setdefault(position, (k, what))
    if previous[0] != k:
        j, other = previous
        first = other if other.startswith("trigger") else f"'{other}'"
        second = what if what.startswith("trigger") else f"'{what}'"
        raise PromptError(
            f"{first} (LoRA '{bindings[j].lora}') and {second} (LoRA '{bindings[k].lora}') fall on the same token; "
            "give each LoRA its own words."
        )
