"""Prompt variants and token positions, checked against the real CLIP tokenizer's own output.

Expected positions are derived here from ``tokenizer(text).input_ids`` (BOS at index 0, so a token's index there is its
position in the first 77-token chunk) or written by hand with the ids shown; the chunk rule is
position = chunk * 77 + 1 + index in chunk.
"""
from __future__ import annotations

import pytest

from clora.prompts import (
    Fragment,
    HFPromptTokenizer,
    PromptError,
    VariantPlan,
    build_variants,
    find_phrase,
    parse_emphasis,
    split_chunks,
    token_position,
)
from clora.settings import Binding
from tests.models import clip_tokenizer

A, CAT, AND, DOG, SKS, COMMA, RED = 320, 2368, 537, 1929, 48136, 267, 736
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def hf():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def tok(hf):
    return HFPromptTokenizer(hf)


def ids(hf, text: str) -> list[int]:
    """The HF tokenizer's ids of ``text`` with BOS/EOS, untruncated."""
    return hf(text, truncation=False).input_ids


def positions_of(seq: list[int], sub: list[int]) -> list[int]:
    """Start indices of ``sub`` in ``seq`` (written independently of clora.prompts)."""
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub]


def chunked_position(flat_index_with_bos: int, size: int = 75) -> int:
    """Position of a token given its index in an untruncated ``input_ids`` (BOS at 0), with plain 75-token chunks."""
    f = flat_index_with_bos - 1
    return (f // size) * 77 + 1 + f % size


def test_tokenizer_is_the_real_clip_vocab(hf):
    # The check from the project's CI notes.
    assert ids(hf, "a photo of a cat and a dog") == [BOS, 320, 1125, 539, 320, 2368, 537, 320, 1929, EOS]
    assert hf("sks", add_special_tokens=False).input_ids == [SKS]


# ----- the authors' example ----------------------------------------------------------------------------


def test_authors_example_by_hand(tok):
    # "A cat and a dog" -> BOS, a 320, cat 2368, and 537, a 320, dog 1929: cat at 2, dog at 5.
    # Variant 1 "A sks cat and a dog": a 1, sks 48136 at 2, cat 3, and 4, a 5, dog 6.
    # Variant 2 "A cat and a sks dog": a 1, cat 2, and 3, a 4, sks 5, dog 6.
    bindings = [Binding("cat", ("cat",), "sks"), Binding("dog", ("dog",), "sks")]
    plan = build_variants("A cat and a dog", bindings, tok)
    assert plan.prompts == ["A cat and a dog", "A sks cat and a dog", "A cat and a sks dog"]
    assert plan.groups == [
        [[2], [2, 3], [2]],  # cat: base, its own variant (trigger + subject), the dog variant
        [[5], [6], [5, 6]],  # dog
    ]
    assert plan.mask_tokens == [[], [2, 3], [5, 6]]
    assert plan.chunks[1] == [[A, SKS, CAT, AND, A, DOG]]


def test_authors_example_against_tokenizer_output(hf, tok):
    bindings = [Binding("cat", ("cat",), "sks"), Binding("dog", ("dog",), "sks")]
    plan = build_variants("A cat and a dog", bindings, tok)
    for v, text in enumerate(plan.prompts):
        seq = ids(hf, text)
        cat, dog = seq.index(CAT), seq.index(DOG)
        expected_cat = [cat - 1, cat] if v == 1 else [cat]
        expected_dog = [dog - 1, dog] if v == 2 else [dog]
        assert plan.groups[0][v] == expected_cat
        assert plan.groups[1][v] == expected_dog
        if v:
            assert [seq[p] for p in plan.mask_tokens[v]] == [SKS, [CAT, DOG][v - 1]]


# ----- emphasis ------------------------------------------------------------------------------------------


def test_parse_emphasis_weights():
    frags = parse_emphasis(r"a (b) [c] (d:1.5) \(e\) ((f)) g:h")
    assert [(f.text, f.is_break) for f in frags] == [
        ("a ", False), ("b", False), (" ", False), ("c", False), (" ", False), ("d", False),
        (" (e) ", False), ("f", False), (" g:h", False),
    ]
    weights = [f.weight for f in frags]
    assert weights == pytest.approx([1.0, 1.1, 1.0, 1 / 1.1, 1.0, 1.5, 1.0, 1.21, 1.0])


def test_parse_emphasis_unbalanced_and_break():
    assert parse_emphasis("a (b") == [Fragment("a ", 1.0), Fragment("b", pytest.approx(1.1))]
    assert parse_emphasis("a) b]") == [Fragment("a) b]", 1.0)]
    assert parse_emphasis("") == [Fragment("", 1.0)]
    frags = parse_emphasis("a cat BREAK (dog)")
    assert [(f.text, f.is_break) for f in frags] == [("a cat", False), ("", True), ("", False), ("dog", False)]


def test_emphasis_is_kept_in_variants_and_positions_follow_the_plain_text(hf, tok):
    prompt = "a (cat:1.2) and a [dog]"
    bindings = [Binding("cat_v1", ("cat",), "sks"), Binding("dog_v1", ("dog",), "ohwx")]
    plan = build_variants(prompt, bindings, tok)
    assert plan.prompts == [prompt, "a (sks cat:1.2) and a [dog]", "a (cat:1.2) and a [ohwx dog]"]
    plain = ["a cat and a dog", "a sks cat and a dog", "a cat and a ohwx dog"]
    for v, text in enumerate(plain):
        seq = ids(hf, text)
        assert plan.chunks[v] == [seq[1:-1]]
        cat, dog = seq.index(CAT), seq.index(DOG)
        assert plan.groups[0][v] == ([cat - 1, cat] if v == 1 else [cat])
        ohwx = hf("ohwx", add_special_tokens=False).input_ids
        assert plan.groups[1][v] == (list(range(dog - len(ohwx), dog + 1)) if v == 2 else [dog])


def test_extra_network_tags_are_ignored(hf, tok):
    plan = build_variants("a cat <lora:cat:0.8> and a dog", [Binding("cat", ("cat",), "sks")], tok)
    assert plan.prompts[1] == "a sks cat <lora:cat:0.8> and a dog"
    seq = ids(hf, "a sks cat  and a dog")
    assert plan.chunks[1] == [seq[1:-1]]
    assert plan.groups == [[[2], [2, 3]]]


# ----- words -----------------------------------------------------------------------------------------------


def test_multi_token_subject_and_trigger(hf, tok):
    word = "xylophonist"
    word_ids = hf(word, add_special_tokens=False).input_ids
    trig_ids = hf("zorgblat", add_special_tokens=False).input_ids
    assert len(word_ids) > 1 and len(trig_ids) > 1  # BPE splits both
    plan = build_variants(f"a {word} and a dog", [Binding("x", (word,), "zorgblat")], tok)
    base = ids(hf, f"a {word} and a dog")
    [start] = positions_of(base, word_ids)
    assert plan.groups[0][0] == list(range(start, start + len(word_ids)))
    own = ids(hf, f"a zorgblat {word} and a dog")
    [t] = positions_of(own, trig_ids)
    [w] = positions_of(own, word_ids)
    assert plan.groups[0][1] == list(range(t, t + len(trig_ids))) + list(range(w, w + len(word_ids)))
    assert plan.mask_tokens[1] == plan.groups[0][1]


def test_whole_words_only(hf, tok):
    # "zorgcat" is z + org + cat</w>: its last token is the id of "cat", but it is not the word "cat".
    prompt = "a zorgcat near a cat"
    seq = ids(hf, prompt)
    cat_indices = [i for i, t in enumerate(seq) if t == CAT]
    assert len(cat_indices) == 2
    assert find_phrase(prompt, "cat", tok) == [[cat_indices[1]]]
    with pytest.raises(PromptError, match="'cat' \\(LoRA 'c'\\) is not in the prompt"):
        build_variants("a catalog of things", [Binding("c", ("cat",))], tok)


def test_syntax_is_not_a_word(hf, tok):
    # "2" only as an emphasis weight, "break" only as the BREAK keyword: neither is a word of the prompt.
    with pytest.raises(PromptError, match="'2' \\(LoRA 'n'\\) is not in the prompt"):
        build_variants("a (cat:2) and a dog", [Binding("n", ("2",))], tok)
    with pytest.raises(PromptError, match="'break' \\(LoRA 'b'\\) is not in the prompt"):
        build_variants("a cat BREAK a dog", [Binding("b", ("break",))], tok)
    # ... while the same words as words are found.
    seq = ids(hf, "a cat, 2 dogs, a break")
    two = hf("2", add_special_tokens=False).input_ids
    brk = hf("break", add_special_tokens=False).input_ids
    assert find_phrase("a (cat:2), 2 dogs, a break", "2", tok) == [positions_of(seq, two)]
    assert find_phrase("a (cat:2), 2 dogs, a break", "break", tok) == [positions_of(seq, brk)]


def test_case_insensitive_and_multi_word_subjects(hf, tok):
    prompt = "A Red  Car next to a CAT"
    plan = build_variants(prompt, [Binding("car", ("red car",), "sks"), Binding("cat", ("cat",))], tok)
    assert plan.prompts[1] == "A sks Red  Car next to a CAT"
    seq = ids(hf, prompt)
    [r] = positions_of(seq, [RED, 1615])
    assert plan.groups[0][0] == [r, r + 1]
    assert plan.groups[1][0] == [seq.index(CAT)]
    assert plan.groups[1][1] == [ids(hf, plan.prompts[1]).index(CAT)]  # an empty trigger adds nothing


def test_repeated_words_give_every_occurrence(hf, tok):
    prompt = "a cat, a dog and another cat"
    plan = build_variants(prompt, [Binding("c", ("cat",), "sks")], tok)
    assert plan.prompts[1] == "a sks cat, a dog and another cat"  # trigger before the first occurrence only
    base = ids(hf, prompt)
    assert plan.groups[0][0] == [i for i, t in enumerate(base) if t == CAT]
    own = ids(hf, plan.prompts[1])
    cats = [i for i, t in enumerate(own) if t == CAT]
    assert plan.groups[0][1] == [own.index(SKS)] + cats


def test_several_subjects_trigger_goes_before_the_earliest(hf, tok):
    plan = build_variants("a kitten and a cat", [Binding("c", ("cat", "kitten"), "sks")], tok)
    assert plan.prompts[1] == "a sks kitten and a cat"
    own = ids(hf, plan.prompts[1])
    kitten = hf("kitten", add_special_tokens=False).input_ids
    [k] = positions_of(own, kitten)
    assert plan.groups[0][1] == sorted([own.index(SKS), *range(k, k + len(kitten)), own.index(CAT)])


# ----- chunks ----------------------------------------------------------------------------------------------


def test_long_prompt_positions_in_the_second_chunk(hf, tok):
    prompt = " ".join(["red"] * 80) + " cat and a dog"
    plan = build_variants(prompt, [Binding("c", ("cat",), "sks"), Binding("d", ("dog",))], tok)
    for v, text in enumerate(plan.prompts):
        seq = ids(hf, text)  # untruncated; no commas, so plain 75-token chunks
        assert plan.chunks[v] == [seq[1:76], seq[76:-1]]
        cat, dog = seq.index(CAT), seq.index(DOG)
        assert plan.groups[1][v] == [chunked_position(dog)]
        expected_cat = [chunked_position(cat)] if v != 1 else [chunked_position(cat - 1), chunked_position(cat)]
        assert plan.groups[0][v] == expected_cat
    # By hand: 80 reds are flat ids 0..79, "cat" is flat 80 -> chunk 1, index 5 -> 77 + 1 + 5.
    assert plan.groups[0][0] == [83]
    assert plan.n_chunks == 2


def test_comma_backtrack_moves_the_tail_to_the_next_chunk(hf):
    prompt = " ".join(["red"] * 70) + ", " + " ".join(["red"] * 10) + " cat"
    seq = ids(hf, prompt)
    assert seq[71] == COMMA and seq.index(CAT) == 82  # flat ids: 70 reds, comma at 70, reds 71..80, cat at 81
    # With backtracking (A1111's default 20): chunk 1 is ids 0..70 (ends at the comma), chunk 2 starts at 71,
    # so "cat" is index 10 of chunk 2 -> 77 + 1 + 10.
    with_backtrack = HFPromptTokenizer(hf)
    assert [len(c) for c in with_backtrack.chunks(prompt)] == [71, 11]
    assert find_phrase(prompt, "cat", with_backtrack) == [[88]]
    # Without: plain 75-token chunks, "cat" is index 6 of chunk 2.
    plain = HFPromptTokenizer(hf, comma_backtrack=0)
    assert [len(c) for c in plain.chunks(prompt)] == [75, 7]
    assert find_phrase(prompt, "cat", plain) == [[chunked_position(seq.index(CAT))]] == [[84]]


def test_break_starts_a_new_chunk(tok):
    plan = build_variants("a cat BREAK a dog", [Binding("c", ("cat",)), Binding("d", ("dog",), "sks")], tok)
    assert plan.chunks[0] == [[A, CAT], [A, DOG]]
    # dog: chunk 1, index 1 -> 77 + 1 + 1 = 79; in the dog variant "a sks dog": sks 79, dog 80.
    assert plan.groups == [[[2], [2], [2]], [[79], [79], [79, 80]]]
    assert plan.mask_tokens[2] == [79, 80]


def test_split_chunks_rules():
    assert split_chunks([[1, 2], None, [3]], comma_id=None) == [[1, 2], [3]]
    assert split_chunks([None, [3]], comma_id=None) == [[], [3]]
    assert split_chunks([[]], comma_id=None) == [[]]
    assert split_chunks([list(range(75))], comma_id=None) == [list(range(75))]
    assert split_chunks([list(range(76))], comma_id=None) == [list(range(75)), [75]]
    # comma (id -1) 5 ids from the end of a full chunk: the 4 ids after it move on.
    seq = list(range(70)) + [-1] + list(range(100, 106))
    assert split_chunks([seq], comma_id=-1) == [seq[:71], seq[71:]]
    # comma too far back (more than `backtrack` ids from the end): no move.
    assert split_chunks([seq], comma_id=-1, backtrack=4) == [seq[:75], seq[75:]]
    assert token_position(0, 0) == 1 and token_position(2, 74) == 2 * 77 + 75


# ----- errors ----------------------------------------------------------------------------------------------


def test_missing_subject_names_the_word_and_the_lora(tok):
    with pytest.raises(PromptError) as e:
        build_variants("a cat on a sofa", [Binding("cat_v1", ("cat",)), Binding("dog_v1", ("dog",))], tok)
    assert str(e.value) == "'dog' (LoRA 'dog_v1') is not in the prompt."


def test_and_prompts_are_refused(tok):
    with pytest.raises(PromptError, match="AND-composed prompts"):
        build_variants("a cat AND a dog", [Binding("c", ("cat",))], tok)
    # lower-case "and" is an ordinary word
    build_variants("a cat and a dog", [Binding("c", ("cat",))], tok)


def test_two_bindings_on_one_token(tok):
    with pytest.raises(PromptError, match="'red car' \\(LoRA 'a'\\) and 'car' \\(LoRA 'b'\\) fall on the same token"):
        build_variants("a red car", [Binding("a", ("red car",)), Binding("b", ("car",))], tok)


def test_describe_lists_variants_and_ids(tok):
    plan = build_variants("A cat and a dog", [Binding("cat_v1", ("cat",), "sks")], tok)
    text = plan.describe()
    assert "variant 1: 'A sks cat and a dog'" in text
    assert f"v1 [2:{SKS}, 3:{CAT}]" in text
    assert "LoRA 'cat_v1'" in text


# ----- any host tokenizer ------------------------------------------------------------------------------


class WordTokenizer:
    """A host whose tokenizer gives one id per whitespace word (lower-cased), 4-id chunks, no emphasis syntax."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def word_ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w.lower(), len(self.vocab) + 10) for w in text.split()]

    def chunks(self, prompt: str) -> list[list[int]]:
        flat = self.word_ids(prompt)
        return [flat[i : i + 4] for i in range(0, len(flat), 4)] or [[]]


def test_build_variants_uses_only_the_protocol():
    plan = build_variants("one two three four five cat", [Binding("c", ("cat",), "sks")], WordTokenizer())
    assert isinstance(plan, VariantPlan)
    # base: cat is word 5 -> chunk 1, index 1 -> 77 + 1 + 1; variant: sks is word 5, cat word 6.
    assert plan.groups == [[[79], [79, 80]]]
