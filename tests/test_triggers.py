"""Trigger-word suggestions (clora/triggers.py): sources in trust order, header-only metadata, which candidate fills a
binding's trigger box."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from clora.triggers import (
    TriggerSource,
    pick_trigger,
    read_safetensors_metadata,
    sources_from_metadata,
    trigger_sources,
)

# The tags the project's fixture LoRAs carry (tools/lora_writer.py DEFAULT_TAGS): "sks dog" is the top tag.
DOG_TAGS = {"10_sks_dog": {"sks dog": 20, "dog": 15, "outdoors": 6, "grass": 6}, "5_reg": {"dog": 5, "sitting": 3}}


def write_lora(path: Path, metadata: dict[str, str]) -> Path:
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(path), metadata=metadata)
    return path


def test_header_metadata_is_read_without_the_tensors(tmp_path):
    path = write_lora(tmp_path / "cat.safetensors", {"ss_output_name": "cat", "modelspec.trigger_phrase": "mycat"})
    assert read_safetensors_metadata(path) == {"ss_output_name": "cat", "modelspec.trigger_phrase": "mycat"}
    # only the header is read: a file cut right after its header still gives the metadata
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + n])
    assert read_safetensors_metadata(cut)["modelspec.trigger_phrase"] == "mycat"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    assert read_safetensors_metadata(bad) == {}
    assert read_safetensors_metadata(tmp_path / "missing.safetensors") == {}


def test_sources_in_the_order_users_trust_them(tmp_path):
    path = write_lora(tmp_path / "cat_lora.safetensors", {
        "ss_tag_frequency": json.dumps({"1_cat": {"tabby": 9, "cat": 9, "window": 3}}),
        "modelspec.trigger_phrase": "mycat",
        "ss_output_name": "cat_lora",
    })
    (tmp_path / "cat_lora.json").write_text(json.dumps({"activation text": "sks cat, blue eyes",
                                                        "trainedWords": ["kitty"]}))
    (tmp_path / "cat_lora.civitai.info").write_text(json.dumps({"trainedWords": ["kitty", "tabbycat"]}))
    sources = trigger_sources(path)
    assert [s.name for s in sources] == ["activation", "trained", "modelspec", "tags"]
    assert sources[0].words == ("sks cat", "blue eyes") and sources[0].whole
    assert sources[1].words == ("kitty", "tabbycat")
    assert sources[2].words == ("mycat",)
    # only the tags found in the most captions; the output name is not a trigger word
    assert sources[3].words == ("tabby", "cat")
    assert all("cat_lora" not in s.words for s in sources)
    # the binding's own subject word is taken out (the variant reads "sks cat", not "sks cat cat")
    assert pick_trigger(sources, ["cat"]) == "sks, blue eyes"
    assert pick_trigger(sources, ["kitten"]) == "sks cat, blue eyes"

    (tmp_path / "cat_lora.json").unlink()
    assert pick_trigger(trigger_sources(path), ["cat"]) == "kitty"
    (tmp_path / "cat_lora.civitai.info").unlink()
    assert pick_trigger(trigger_sources(path), ["cat"]) == "mycat"


def test_readme_cat_and_dog_example_never_gets_the_dog_tag():
    """A cat LoRA whose top training tag is "sks dog" (the fixtures' tags), bound to "cat" beside a "dog" binding."""
    sources = sources_from_metadata({"ss_tag_frequency": json.dumps(DOG_TAGS)})
    assert sources == [TriggerSource("tags", ("sks dog", "dog"))]
    assert pick_trigger(sources, ["cat"], ["dog"]) == ""
    # the same LoRA bound to "dog" itself: its own subject word is taken out
    assert pick_trigger(sources, ["dog"], ["cat"]) == "sks"
    # nothing else bound yet: the top tag
    assert pick_trigger(sources, ["cat"], []) == "sks dog"


def test_other_subject_words_match_whole_words_any_case_and_phrases():
    sources = [TriggerSource("trained", ("Dogface style", "hotdog", "old  man hat", "plain"))]
    assert pick_trigger(sources, [], ["dog"]) == "Dogface style"  # "dog" is not a word of "Dogface" or "hotdog"
    assert pick_trigger(sources, [], ["dogface"]) == "hotdog"
    assert pick_trigger(sources, [], ["DOGFACE", "hotdog"]) == "old man hat"
    assert pick_trigger(sources, [], ["dogface", "hotdog", "old man"]) == "plain"
    # a subject bound twice (own and other) does not block its own binding
    assert pick_trigger([TriggerSource("tags", ("sks cat",))], ["cat"], ["cat"]) == "sks"


def test_activation_text_keeps_its_parts_but_drops_colliding_ones():
    act = TriggerSource("activation", ("sks", "with a dog", "red collar"), whole=True)
    assert pick_trigger([act], ["cat"], ["dog"]) == "sks, red collar"
    # a source left empty by the rules gives way to the next one
    only_dog = TriggerSource("activation", ("dog",), whole=True)
    assert pick_trigger([only_dog, TriggerSource("modelspec", ("ohwx",))], ["cat"], ["dog"]) == "ohwx"
    assert pick_trigger([], ["cat"]) == ""


def test_tag_counts_are_summed_and_ties_kept_in_first_seen_order():
    meta = {"ss_tag_frequency": json.dumps({"a": {"x": 3, "y": 5}, "b": {"x": 2, "z": 1}, "c": "junk"})}
    assert sources_from_metadata(meta) == [TriggerSource("tags", ("x", "y"))]
    assert sources_from_metadata({"ss_tag_frequency": "{not json"}) == []
    assert sources_from_metadata({"ss_tag_frequency": json.dumps({"a": {"x": True}})}) == []
