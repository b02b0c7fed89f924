"""The script's positional arguments <-> CloraSettings (clora/ui.py), and the accordion itself when gradio is installed."""
from __future__ import annotations

import json
import random
import sys
from dataclasses import replace

import pytest

from clora.settings import (
    LEGACY_OPTIONS,
    MAX_BINDINGS,
    MAX_STYLES,
    MORPHOLOGIES,
    REFINE_ITERS_MAX,
    WEIGHT_RANGE,
    Binding,
    CloraSettings,
    SettingsError,
    StyleLora,
)
from clora.ui import (
    API_FILLER_MAPS_FROM,
    ARG_NAMES,
    LEGACY_ARG_COUNT,
    PRE_GRAD_MEMORY_ARG_COUNT,
    PRE_MAP_LAYERS_ARG_COUNT,
    apply_overrides,
    args_to_settings,
    is_enabled,
    paste_value,
    settings_to_args,
)

WORDS = ["cat", "dog", "red car", "tree", "old man", "girl", "castle", "boat", "owl", "fox", "moon", "robot"]


def blank_args() -> dict:
    """The UI's default values, written out independently of clora.ui (the documented order and meaning)."""
    a = {"enabled": False}
    for n in range(1, MAX_BINDINGS + 1):
        a.update({f"b{n}_lora": "None", f"b{n}_subjects": "", f"b{n}_triggers": "", f"b{n}_weight": 1.0,
                  f"b{n}_te_weight": ""})
    for n in range(1, MAX_STYLES + 1):
        a.update({f"s{n}_lora": "None", f"s{n}_weight": 0.8, f"s{n}_mode": "whole", f"s{n}_subjects": ""})
    a.update({"step_size": 20.0, "opt_end": 0.5, "refine_at": "0, 0.1, 0.2", "refine_iters": 20, "temperature": 0.5,
              "mask_threshold": 0.4, "mask_morphology": "none", "mask_start": 0.0, "lora_on_uncond": True,
              "show_previews": False, "maps_from": "both", "predict_after_update": False, "negative_te_lora": True,
              "grad_memory": "auto", "map_layers": "all"})
    return a


#: The argument names before version 2 (67 of them), written out as the README documented them.
OLD_ARG_NAMES = (
    ("enabled",)
    + tuple(f"b{n}_{f}" for n in range(1, 9) for f in ("lora", "subjects", "triggers", "weight", "te_weight"))
    + tuple(f"s{n}_{f}" for n in range(1, 5) for f in ("lora", "weight", "mode", "subjects"))
    + ("step_size", "opt_end", "refine_at", "refine_iters", "temperature", "mask_threshold", "mask_morphology",
       "mask_start", "lora_on_uncond", "show_previews")
)


def positional(a: dict) -> list:
    return [a[name] for name in ARG_NAMES]


def random_settings(rng: random.Random) -> CloraSettings:
    n_b = rng.randint(0, MAX_BINDINGS)
    words = rng.sample(WORDS, k=len(WORDS))
    bindings = []
    for i in range(n_b):
        subjects = (words[i],) if rng.random() < 0.7 else (words[i], f"{words[i]}s")
        bindings.append(Binding(
            lora=f"lora_{i}_{rng.randint(0, 99)}", subjects=subjects,
            triggers=rng.choice(["", "sks", "ohwx style"]),
            weight=rng.uniform(*WEIGHT_RANGE),
            te_weight=None if rng.random() < 0.5 else rng.uniform(*WEIGHT_RANGE),
        ))
    bound = [s for b in bindings for s in b.subjects]
    styles = []
    for j in range(rng.randint(0, MAX_STYLES)):
        if bound and rng.random() < 0.5:
            styles.append(StyleLora(lora=f"style{j}", weight=rng.uniform(*WEIGHT_RANGE), mode="subjects",
                                    subjects=tuple(rng.sample(bound, k=rng.randint(1, len(bound))))))
        else:
            styles.append(StyleLora(lora=f"style{j}", weight=rng.uniform(*WEIGHT_RANGE), mode="whole"))
    return CloraSettings(
        enabled=bool(bindings) and rng.random() < 0.8,
        bindings=tuple(bindings),
        styles=tuple(styles),
        step_size=rng.uniform(0, 100),
        opt_end=rng.random(),
        refine_at=tuple(sorted(rng.random() for _ in range(rng.randint(0, 5)))),
        refine_iters=rng.randint(0, REFINE_ITERS_MAX),
        temperature=rng.uniform(0.01, 2),
        mask_threshold=rng.uniform(0.01, 0.99),
        mask_morphology=rng.choice(MORPHOLOGIES),
        mask_start=rng.random(),
        lora_on_uncond=rng.random() < 0.5,
        show_previews=rng.random() < 0.5,
        maps_from=rng.choice(["both", "cond"]),
        predict_after_update=rng.random() < 0.5,
        negative_te_lora=rng.random() < 0.5,
        grad_memory=rng.choice(["auto", "batched", "per_variant", "checkpoint", "per_variant_checkpoint"]),
        map_layers=rng.choice(["all", "down", "mid", "up"]),
    ).validate()


# ----- order and count ------------------------------------------------------------------------------------------


def test_arg_names_order_and_count():
    assert len(ARG_NAMES) == 1 + 5 * MAX_BINDINGS + 4 * MAX_STYLES + 15 == 72
    assert len(set(ARG_NAMES)) == len(ARG_NAMES)
    assert ARG_NAMES[:6] == ("enabled", "b1_lora", "b1_subjects", "b1_triggers", "b1_weight", "b1_te_weight")
    # version 2 appended its three options: the old positions keep their meaning
    assert LEGACY_ARG_COUNT == len(OLD_ARG_NAMES) == 67 and ARG_NAMES[:LEGACY_ARG_COUNT] == OLD_ARG_NAMES
    assert ARG_NAMES[-7:] == ("lora_on_uncond", "show_previews", "maps_from", "predict_after_update",
                              "negative_te_lora", "grad_memory", "map_layers")
    assert PRE_GRAD_MEMORY_ARG_COUNT == 70 == len(ARG_NAMES) - 2  # grad_memory, then map_layers appended
    assert PRE_MAP_LAYERS_ARG_COUNT == 71 == len(ARG_NAMES) - 1
    assert len(settings_to_args(CloraSettings())) == len(ARG_NAMES)


def test_defaults_give_default_settings():
    assert args_to_settings(positional(blank_args())) == CloraSettings()
    assert settings_to_args(CloraSettings()) == positional(blank_args())


def test_wrong_argument_count_is_an_error_naming_both_counts():
    args = positional(blank_args())
    for n in (len(args) - 3, len(args) - 4, len(args) + 1, LEGACY_ARG_COUNT - 1):
        with pytest.raises(SettingsError,
                           match=rf"72 positional arguments \(see ARG_NAMES; the 71, 70 and 67 .*got {n} "):
            args_to_settings((args * 2)[:n])


# ----- positional form against a hand-written reference ---------------------------------------------------------


def test_positional_form_matches_named_form():
    a = blank_args()
    a.update({"enabled": True, "b1_lora": "cat_v1", "b1_subjects": "cat | kitten", "b1_triggers": "sks",
              "b1_weight": 0.9, "b3_lora": "dog_v1", "b3_subjects": "dog", "b3_te_weight": "0.5",
              "s2_lora": "ink", "s2_weight": 0.7, "s2_mode": "these subjects", "s2_subjects": "dog",
              "refine_at": "0.1,0.3", "mask_threshold": 0.25, "mask_morphology": "open", "lora_on_uncond": False,
              "maps_from": "prompt rows only", "negative_te_lora": False})
    expected = CloraSettings.from_json({
        "enabled": True,
        "bindings": [{"lora": "cat_v1", "subjects": ["cat", "kitten"], "triggers": "sks", "weight": 0.9},
                     {"lora": "dog_v1", "subjects": ["dog"], "te_weight": 0.5}],
        "styles": [{"lora": "ink", "weight": 0.7, "mode": "subjects", "subjects": ["dog"]}],
        "refine_at": [0.1, 0.3], "mask_threshold": 0.25, "mask_morphology": "open", "lora_on_uncond": False,
        "maps_from": "cond", "negative_te_lora": False,
    })
    # the blank binding row 2 and style row 1 are skipped
    assert args_to_settings(positional(a)) == expected


def test_values_as_strings_are_read_like_numbers():
    a = blank_args()
    a.update({"enabled": "true", "b1_lora": "x", "b1_subjects": "cat", "b1_weight": "0.75", "refine_iters": "3",
              "step_size": 7, "refine_at": "none"})
    s = args_to_settings(positional(a))
    assert (s.enabled, s.bindings[0].weight, s.refine_iters, s.step_size, s.refine_at) == (True, 0.75, 3, 7.0, ())


# ----- lists from before version 2 ---------------------------------------------------------------------------------


def _old_list() -> list:
    """A 67-value list as the code before version 2 took it (cat and dog bound, a style LoRA, two options set)."""
    a = {name: blank_args()[name] for name in OLD_ARG_NAMES}
    a.update({"enabled": True, "b1_lora": "cat_v1", "b1_subjects": "cat", "b1_triggers": "sks", "b2_lora": "dog_v1",
              "b2_subjects": "dog", "b2_weight": 0.8, "s1_lora": "ink", "refine_iters": 5, "show_previews": True})
    return [a[name] for name in OLD_ARG_NAMES]


_OLD_MEANING = CloraSettings(
    enabled=True, bindings=(Binding("cat_v1", ("cat",), "sks"), Binding("dog_v1", ("dog",), weight=0.8)),
    styles=(StyleLora("ink"),), refine_iters=5, show_previews=True, **LEGACY_OPTIONS,
)


def test_67_values_from_before_version_2_mean_the_old_behaviour():
    old = _old_list()
    assert len(old) == 67
    s = args_to_settings(old)
    assert (s.maps_from, s.predict_after_update, s.negative_te_lora) == ("cond", True, False)
    assert s == _OLD_MEANING
    assert args_to_settings(json.loads(json.dumps(old))) == _OLD_MEANING
    # overrides (X/Y/Z plot) still apply on top
    assert args_to_settings(old, {"maps_from": "both"}).maps_from == "both"


def test_70_values_take_what_they_say():
    """A list from before grad_memory: the options of version 2 as given, grad_memory its default."""
    new = _old_list() + ["both", False, True]
    assert args_to_settings(new) == replace(_OLD_MEANING, maps_from="both", predict_after_update=False,
                                            negative_te_lora=True)
    new = _old_list() + ["cond", True, False]
    assert args_to_settings(new) == _OLD_MEANING


def test_a_list_filled_in_by_the_webui_api_means_the_old_behaviour():
    # The WebUI's API fills the positions a request leaves out with the UI components' values (gradio-free here:
    # the component value of maps_from is API_FILLER_MAPS_FROM, checked in test_build_ui_smoke).
    filler = positional(blank_args())
    filler[ARG_NAMES.index("maps_from")] = API_FILLER_MAPS_FROM
    filled = _old_list() + filler[LEGACY_ARG_COUNT:]
    assert args_to_settings(filled) == _OLD_MEANING
    # a request that sends maps_from knows the new options: what it leaves out takes the defaults
    filled = _old_list() + ["cond"] + filler[LEGACY_ARG_COUNT + 1:]
    assert args_to_settings(filled) == replace(_OLD_MEANING, predict_after_update=False, negative_te_lora=True)
    # the filler is "both" to anything but this check, and JSON (the browser, an API request) makes it plain text
    assert API_FILLER_MAPS_FROM == "both" and type(json.loads(json.dumps(API_FILLER_MAPS_FROM))) is str


# ----- round trip -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_round_trip_on_random_settings(seed):
    s = random_settings(random.Random(seed))
    args = settings_to_args(s)
    assert len(args) == len(ARG_NAMES)
    assert args_to_settings(args) == s
    # the API sends the list through JSON
    assert args_to_settings(json.loads(json.dumps(args))) == s
    # the named form of the same settings, as the first argument
    assert args_to_settings([s.to_json()] + args[1:]) == s


# ----- named JSON form ----------------------------------------------------------------------------------------------


def test_named_form_alone_and_with_ui_defaults_behind_it():
    named = {"enabled": True, "bindings": [{"lora": "cat_v1", "subjects": ["cat"]}], "step_size": 5}
    expected = CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)),), step_size=5.0)
    assert args_to_settings([named]) == expected
    assert args_to_settings([named] + positional(blank_args())[1:]) == expected
    assert args_to_settings([json.loads(json.dumps(named))]) == expected


def test_named_form_unknown_key_is_an_error_naming_it():
    with pytest.raises(SettingsError, match="'mask_treshold'"):
        args_to_settings([{"enabled": True, "bindings": [{"lora": "a", "subjects": ["cat"]}], "mask_treshold": 0.3}])
    with pytest.raises(SettingsError, match="'subject'"):
        args_to_settings([{"enabled": True, "bindings": [{"lora": "a", "subject": ["cat"]}]}])


# ----- user errors ------------------------------------------------------------------------------------------------


def test_half_filled_row_is_an_error_naming_the_binding():
    a = blank_args()
    a.update({"enabled": True, "b1_lora": "cat_v1", "b1_subjects": "cat", "b2_lora": "dog_v1"})
    with pytest.raises(SettingsError, match=r"Binding 2 \(LoRA 'dog_v1'\): no subject word"):
        args_to_settings(positional(a))


def test_bad_te_weight_names_the_field():
    a = blank_args()
    a.update({"enabled": True, "b1_lora": "cat_v1", "b1_subjects": "cat", "b1_te_weight": "strong"})
    with pytest.raises(SettingsError, match=r"Binding 1 \(LoRA 'cat_v1'\): TE weight.*'strong'"):
        args_to_settings(positional(a))


def test_enabled_without_bindings_is_an_error():
    a = blank_args()
    a["enabled"] = True
    with pytest.raises(SettingsError, match="no LoRA is bound"):
        args_to_settings(positional(a))


# ----- overrides (X/Y/Z plot) and the enabled shortcut ------------------------------------------------------------


def test_overrides():
    a = blank_args()
    a.update({"b1_lora": "cat_v1", "b1_subjects": "cat", "b2_lora": "dog_v1", "b2_subjects": "dog"})
    s = args_to_settings(positional(a), {"enabled": "True", "mask_threshold": "0.3", "b2_weight": 0.6,
                                         "refine_iters": 4.0})
    assert s.enabled is True and s.mask_threshold == 0.3 and s.refine_iters == 4
    s2 = args_to_settings(positional(a), {"maps_from": "prompt rows only", "predict_after_update": "True",
                                          "negative_te_lora": 0})
    assert (s2.maps_from, s2.predict_after_update, s2.negative_te_lora) == ("cond", True, False)
    with pytest.raises(SettingsError, match="Setting maps_from 'uncond' is not one of both, cond."):
        args_to_settings(positional(a), {"maps_from": "uncond"})
    assert [b.weight for b in s.bindings] == [1.0, 0.6]
    with pytest.raises(SettingsError, match="no binding 3"):
        args_to_settings(positional(a), {"b3_weight": 0.5})
    with pytest.raises(SettingsError, match="unknown setting name"):
        apply_overrides(CloraSettings(), {"bogus": 1})


def test_is_enabled():
    a = positional(blank_args())
    assert not is_enabled(a)
    assert is_enabled(a, {"enabled": "True"})
    assert not is_enabled([{"bindings": []}])
    assert is_enabled([{"enabled": True}])
    assert is_enabled(["maybe"] + a[1:])  # unreadable: reported by args_to_settings, never skipped silently
    assert not is_enabled([])


# ----- infotext paste -----------------------------------------------------------------------------------------------


def as_pasted(settings: CloraSettings) -> dict:
    """What the WebUI's infotext parser hands to paste functions: every value as text, beside other keys."""
    params = {"Prompt": "a cat", "Steps": "20"}
    params.update({k: str(v) for k, v in settings.to_flat().items()})
    return params


@pytest.mark.parametrize("seed", range(10))
def test_paste_restores_every_argument(seed):
    s = random_settings(random.Random(100 + seed))
    params = as_pasted(s)
    restored = [paste_value(name, params) for name in ARG_NAMES]
    assert args_to_settings(restored) == s
    assert paste_value("bindings_shown", params) == max(1, len(s.bindings))
    assert paste_value("styles_shown", params) == len(s.styles)


# Written by the code before "CLoRA version" (main at 61dff51), as the WebUI's infotext parser hands it over.
_LEGACY_PARAMS = {"Steps": "20", "Sampler": "Euler a", "CLoRA": "True", "CLoRA 1 LoRA": "cat_v1",
                  "CLoRA 1 subject": "cat", "CLoRA 1 weight": "1"}


def test_paste_of_an_infotext_without_version_sets_the_old_behaviour():
    assert [paste_value(n, _LEGACY_PARAMS) for n in ("maps_from", "predict_after_update", "negative_te_lora")] == [
        "cond", True, False]
    restored = [paste_value(name, _LEGACY_PARAMS) for name in ARG_NAMES]
    assert args_to_settings(restored) == CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)),),
                                                       **LEGACY_OPTIONS)


def test_paste_of_a_version_2_infotext_without_the_keys_sets_the_defaults():
    params = {**_LEGACY_PARAMS, "CLoRA version": "2"}
    assert [paste_value(n, params) for n in ("maps_from", "predict_after_update", "negative_te_lora")] == [
        "both", False, True]
    params["CLoRA version"] = "7"  # newer than this code: read as the newest it knows
    assert paste_value("maps_from", params) == "both"


def test_paste_without_clora_disables_and_leaves_the_rest():
    params = {"Prompt": "a cat", "Steps": "20"}
    assert paste_value("enabled", params) is False
    assert all(paste_value(name, params) is None for name in ARG_NAMES[1:])


def test_paste_of_broken_clora_keys_leaves_everything():
    params = {"CLoRA": "True", "CLoRA 1 LoRA": "x", "CLoRA 1 weight": "heavy"}
    assert all(paste_value(name, params) is None for name in ARG_NAMES)


# ----- the accordion (needs gradio 3.41, as in A1111 1.8) -------------------------------------------------------------


class FakeHost:
    def __init__(self):
        self.names = ["cat_v1", "dog_v1"]

    def lora_names(self):
        return list(self.names)

    def trigger_words(self, name):
        if name == "broken":
            raise OSError("cannot read")
        return {"cat_v1": ["sks", "cat"], "dog_v1": ["sks dog", "dog"]}.get(name, [])


def _fn(demo, name):
    fns = [f.fn for f in demo.fns if getattr(f.fn, "__name__", "") == name]
    assert fns, name
    return fns


def test_build_ui_smoke():
    import gradio as gr
    from clora.ui import build_ui

    host = FakeHost()
    with gr.Blocks() as demo:
        comps, fields = build_ui(True, host)
    assert "modules" not in sys.modules  # the fallback accordion was used, no WebUI import happened
    assert len(comps) == len(ARG_NAMES)
    assert [c.elem_id for c in comps] == [f"clora_img2img_{n}" for n in ARG_NAMES]
    # what the browser sends back at first (plain JSON) is the defaults; the values themselves, as the WebUI's API
    # fills in the positions a request leaves out, mean the old behaviour of the options of version 2
    assert args_to_settings(json.loads(json.dumps([c.value for c in comps]))) == CloraSettings()
    assert comps[ARG_NAMES.index("maps_from")].value is API_FILLER_MAPS_FROM
    assert args_to_settings([c.value for c in comps]) == CloraSettings(**LEGACY_OPTIONS)
    assert comps[ARG_NAMES.index("b1_lora")].choices[:3] in (["None", "cat_v1", "dog_v1"],
                                                            [("None", "None"), ("cat_v1", "cat_v1"),
                                                             ("dog_v1", "dog_v1")])
    assert [f[0] for f in fields[: len(comps)]] == comps and len(fields) == len(comps) + 2
    # the WebUI saves UI defaults by label: row fields (repeated labels) stay out, the other labels are unique
    saved = [c for c in comps if not getattr(c, "do_not_save_to_config", False)]
    assert [n for n, c in zip(ARG_NAMES, comps) if c in saved] == [
        "enabled", *(n for n in ARG_NAMES[-15:] if n != "maps_from")]  # (a saved radio value cannot be restored)
    assert len({c.label for c in saved}) == len(saved)
    maps_from = comps[ARG_NAMES.index("maps_from")]
    assert [tuple(c) for c in maps_from.choices] == [("prompt + negative rows", "both"), ("prompt rows only", "cond")]

    # +/- rows: the counter is clamped; removing a row clears its fields
    (add,) = _fn(demo, "add")[:1]
    assert add(1) == 2 and add(8) == 8
    show = _fn(demo, "show")[0]
    visible = [u["visible"] for u in show(3)]
    assert visible == [True, True, True, False, False, False, False, False]
    remove = _fn(demo, "remove")[0]
    out = remove(3)
    assert out[0] == 2
    row3 = out[1 + 2 * 5: 1 + 3 * 5]
    assert [u.get("value") for u in row3] == ["None", "", "", 1.0, ""]
    assert all("value" not in u for u in out[1: 1 + 2 * 5])
    assert remove(1)[0] == 1  # at least one binding row stays

    # trigger auto-fill (one 'select' listener per row): evt, the row's trigger box, its auto-filled text, and the
    # subject boxes of all rows; returns the trigger box update and the new auto-filled text
    prefills = _fn(demo, "prefill")
    assert len(prefills) == MAX_BINDINGS
    prefill = prefills[0]

    class Evt:
        def __init__(self, value):
            self.value = value

    def subjects(*first):
        return list(first) + [""] * (MAX_BINDINGS - len(first))

    box, auto = prefill(Evt("cat_v1"), "", "", *subjects(""))
    assert box.get("value") == "sks" and auto == "sks"
    # the binding's own subject is taken out of a suggested tag ("sks dog" bound to "dog" -> "sks")
    assert prefill(Evt("dog_v1"), "", "", *subjects("dog"))[0].get("value") == "sks"
    assert prefill(Evt("dog_v1"), "", "", *subjects(""))[0].get("value") == "sks dog"
    # never a trigger containing another binding's subject word (README: cat and dog)
    box, auto = prefill(Evt("dog_v1"), "", "", *subjects("cat", "dog"))
    assert box.get("value") == "" and auto == ""
    assert prefills[1](Evt("dog_v1"), "", "", *subjects("cat", "dog"))[0].get("value") == "sks"
    # another LoRA replaces what was filled in automatically, also by nothing (a LoRA without metadata)...
    assert prefill(Evt("dog_v1"), "sks", "sks", *subjects(""))[0].get("value") == "sks dog"
    box, auto = prefill(Evt("plain_v1"), "sks", "sks", *subjects(""))
    assert box.get("value") == "" and auto == ""
    # ... but never what the user typed, and a failing host changes nothing the user typed either
    box, auto = prefill(Evt("dog_v1"), "mine", "sks", *subjects(""))
    assert "value" not in box and "value" not in auto
    assert "value" not in prefill(Evt("broken"), "mine", "", *subjects(""))[0]
    assert prefill(Evt("broken"), "", "", *subjects(""))[0].get("value") == ""
    # gradio hands the select event's data to the parameter annotated with SelectData
    from gradio.helpers import special_args

    b1_lora = comps[ARG_NAMES.index("b1_lora")]
    filled, *_ = special_args(prefill, ["", "", *subjects("cat")], None,
                              gr.SelectData(b1_lora, {"index": 1, "value": "cat_v1"}))
    assert prefill(*filled)[0].get("value") == "sks"

    # a subject box losing focus re-suggests the rows that still hold auto-filled text
    (retrigger,) = _fn(demo, "retrigger")[:1]
    none = ["None"] * (MAX_BINDINGS - 2)
    blank = [""] * (MAX_BINDINGS - 2)
    out = retrigger("dog_v1", "dog_v1", *none, "", "dog", *blank, "sks dog", "mine", *blank, "sks dog", "", *blank)
    boxes, autos = out[:MAX_BINDINGS], out[MAX_BINDINGS:]
    assert boxes[0].get("value") == "" and autos[0] == ""  # withdrawn: "dog" is now binding 2's subject
    assert "value" not in boxes[1] and "value" not in autos[1]  # typed by the user
    out = retrigger("dog_v1", "None", *none, "dog", "", *blank, "sks dog", "", *blank, "sks dog", "", *blank)
    assert out[0].get("value") == "sks" and out[MAX_BINDINGS] == "sks"

    # the style row's Subjects box is shown only for "these subjects"
    s1_subjects = comps[ARG_NAMES.index("s1_subjects")]
    assert s1_subjects.visible is False
    mode_changed = _fn(demo, "style_mode_changed")
    assert len(mode_changed) == MAX_STYLES
    assert mode_changed[0]("subjects")["visible"] is True
    assert mode_changed[0]("these subjects")["visible"] is True
    assert mode_changed[0]("whole")["visible"] is False

    host.names.append("owl_v2")
    refreshed = _fn(demo, "refresh_lists")[0]()
    assert len(refreshed) == MAX_BINDINGS + MAX_STYLES
    assert "owl_v2" in [c if isinstance(c, str) else c[0] for c in refreshed[0]["choices"]]


def test_webui_api_fills_a_short_request_with_values_meaning_the_old_behaviour():
    """The WebUI's API (modules/api/api.py, A1111 1.8+ and Forge): ``init_default_script_args`` calls the script's
    ``ui()`` once more and keeps each component's ``value``; ``init_script_args`` copies that list and overwrites the
    first ``min(len(components), len(request args))`` positions with the request's ``alwayson_scripts`` args."""
    import gradio as gr
    from clora.ui import build_ui

    with gr.Blocks():
        defaults = [elem.value for elem in build_ui(False, FakeHost())[0]]

    def api(request_args):
        script_args = defaults.copy()
        for idx in range(min(len(defaults), len(request_args))):
            script_args[idx] = request_args[idx]
        return args_to_settings(script_args)

    old = json.loads(json.dumps(_old_list()))  # a request's 67 values, through JSON
    assert api(old) == _OLD_MEANING
    assert api(old + ["both"]) == replace(_OLD_MEANING, maps_from="both", predict_after_update=False,
                                          negative_te_lora=True)
    for seed in range(5):
        s = random_settings(random.Random(200 + seed))
        assert api(json.loads(json.dumps(settings_to_args(s)))) == s
        assert api([json.loads(json.dumps(s.to_json()))]) == s  # the named form: missing fields take the defaults
    assert api([{"enabled": True, "bindings": [{"lora": "cat_v1", "subjects": ["cat"]}]}]) == CloraSettings(
        enabled=True, bindings=(Binding("cat_v1", ("cat",)),))


def test_build_ui_without_host_shows_the_message():
    import gradio as gr
    from clora.ui import build_ui

    with gr.Blocks() as demo:
        comps, _ = build_ui(False, None, message="Forge is not supported yet.")
    assert comps[ARG_NAMES.index("b1_lora")].choices in (["None"], [("None", "None")])
    html = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "clora_txt2img_message"]
    assert html and "CLoRA: Forge is not supported yet." in html[0].value


@pytest.mark.parametrize("name, value, override, bad, flat_key, older", [
    # (older: how many trailing list positions were added from this option on)
    ("grad_memory", "per_variant", "checkpoint", "lazy", "CLoRA grad memory", 2),
    ("map_layers", "down", "mid", "middle", "CLoRA attention layers", 1),
])
def test_appended_option_positional_override_paste_and_older_lists(name, value, override, bad, flat_key, older):
    """The options appended after version 2's list: set by position, overridden (X/Y/Z), pasted from the infotext,
    and taking their default in the shorter lists of before they existed."""
    default = getattr(CloraSettings(), name)
    args = positional(blank_args())
    args[ARG_NAMES.index(name)] = value
    assert getattr(args_to_settings(args), name) == value
    for cut in range(1, older + 1):
        assert getattr(args_to_settings(args[:-cut]), name) == (default if cut >= older else value)
    assert getattr(args_to_settings(args, {name: f" {override} "}), name) == override
    with pytest.raises(SettingsError, match=f"Setting {name} '{bad}' is not one of"):
        args_to_settings(args, {name: bad})
    s = replace(args_to_settings(args), enabled=True, bindings=(Binding("cat_v1", ("cat",)),))
    params = {k: str(v) for k, v in s.to_flat().items()}
    assert params[flat_key] == value
    assert paste_value(name, params) == value
    assert args_to_settings(settings_to_args(s)) == s
    assert flat_key not in CloraSettings(enabled=True).to_flat()  # the default is not written
