"""Build the tokenizer files of ``openai/clip-vit-large-patch14`` offline.

The SD1 text encoder's tokenizer (vocab.json with 49408 entries + merges.txt) is fully determined by the CLIP BPE merges
list, which ships inside PyPI packages as ``bpe_simple_vocab_16e6.txt.gz`` (clip-anytorch's ``clip`` package,
open-clip-torch's ``open_clip`` package).  The vocabulary is, in order:

1. the 256 byte-to-unicode characters,
2. the same 256 characters followed by ``</w>``,
3. each of the first ``49152 - 256 - 2 = 48894`` merges, joined,
4. ``<|startoftext|>`` and ``<|endoftext|>``.

Usage: ``python tools/clip_vocab.py OUT_DIR`` writes vocab.json, merges.txt, tokenizer_config.json and
special_tokens_map.json, a folder that ``transformers.CLIPTokenizer.from_pretrained(OUT_DIR)`` reads offline.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "N_MERGES",
    "VOCAB_SIZE",
    "BOS",
    "EOS",
    "find_bpe_file",
    "bytes_to_unicode",
    "read_merges",
    "build_vocab",
    "tokenizer_config",
    "special_tokens_map",
    "write_tokenizer_files",
]

VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # 48894, as in CLIP's SimpleTokenizer and transformers' CLIPTokenizer
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_PACKAGES_WITH_BPE = ("clip", "open_clip")
_MERGES_HEADER = "#version: 0.2"


def find_bpe_file(packages: Sequence[str] = _PACKAGES_WITH_BPE) -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the first installed package that ships it.

    The package is located with ``importlib.util.find_spec`` only: it is not imported (``clip`` imports torchvision).
    """
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"Could not find {BPE_FILE_NAME} in any of the packages {', '.join(packages)}; "
        "install clip-anytorch or open-clip-torch."
    )


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE, in the tokenizers' own order.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes map to ``chr(256 + i)`` in increasing order.
    The dict's insertion order (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_merges(path: Optional[Path] = None, n_merges: int = N_MERGES) -> list[tuple[str, str]]:
    """The first ``n_merges`` merges of the gzipped CLIP BPE file (its first line is a header)."""
    path = find_bpe_file() if path is None else Path(path)
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    body = lines[1 : 1 + n_merges]
    if len(body) != n_merges:
        raise ValueError(f"{path} holds {len(body)} merges, expected at least {n_merges}.")
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path} line {number} is not a merge of two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in CLIP's order (bytes, bytes + ``</w>``, merges, BOS, EOS)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"The CLIP vocabulary has duplicate tokens ({len(tokens) - len(vocab)} repeats).")
    return vocab


def _added_token(content: str, typed: bool) -> dict[str, object]:
    """An AddedToken as transformers serialises it (``typed`` adds the ``__type`` tag tokenizer_config.json uses)."""
    token: dict[str, object] = {"__type": "AddedToken"} if typed else {}
    token.update({
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    })
    return token


def special_tokens_map() -> dict[str, object]:
    """special_tokens_map.json of openai/clip-vit-large-patch14 (pads with ``<|endoftext|>``)."""
    return {
        "bos_token": _added_token(BOS, typed=False),
        "eos_token": _added_token(EOS, typed=False),
        "pad_token": EOS,
        "unk_token": _added_token(EOS, typed=False),
    }


def tokenizer_config(model_max_length: int = 77) -> dict[str, object]:
    """tokenizer_config.json for transformers' ``CLIPTokenizer``."""
    return {
        "add_prefix_space": False,
        "bos_token": _added_token(BOS, typed=True),
        "do_lower_case": True,
        "eos_token": _added_token(EOS, typed=True),
        "errors": "replace",
        "model_max_length": model_max_length,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token(EOS, typed=True),
    }


def write_tokenizer_files(out_dir: Path | str, bpe_path: Optional[Path] = None) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json into ``out_dir``; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"The CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}.")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "\n".join([_MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n"
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens_map(), indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the tokenizer files into")
    parser.add_argument(
        "--bpe", type=Path, default=None, help=f"path of {BPE_FILE_NAME} (default: the one in clip or open_clip)"
    )
    args = parser.parse_args(argv)
    out = write_tokenizer_files(args.out_dir, args.bpe)
    print(f"wrote the CLIP tokenizer files to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
