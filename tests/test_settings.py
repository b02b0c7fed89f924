"""Settings: defaults, schedule helpers, validation messages, flat (infotext) and named-field (API) round trips."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from clora.settings import (
    FLAT_VERSION,
    LEGACY_OPTIONS,
    MAX_BINDINGS,
    MORPHOLOGIES,
    Binding,
    CloraSettings,
    SettingsError,
    StyleLora,
    json_schema,
)


def _two_bindings(**kw) -> CloraSettings:
    base = CloraSettings(
        enabled=True,
        bindings=(Binding("cat_v1", ("cat",), "sks", 0.9), Binding("dog_v1", ("dog",), "sks")),
    )
    return replace(base, **kw)


# ----- defaults and schedule ---------------------------------------------------------------------------------


def test_defaults_are_the_authors_100_step_run():
    s = CloraSettings()
    # Notebook: step_size 20, max_iter_to_alter 50 of 100 steps, iterative_steps [0, 10, 20] x 20,
    # mask_threshold_alpha 0.4, temperature 0.5, apply_mask_after 0, LoRAs also on the uncond rows (UNet and the
    # negative prompt's text encoder), maps from the mean of the uncond and cond rows, the prediction of the pass
    # before the update.
    assert s.step_size == 20.0
    assert list(s.optimise_steps(100)) == list(range(50))
    assert s.refine_steps(100) == (0, 10, 20)
    assert s.refine_iters == 20
    assert s.mask_threshold == 0.4
    assert s.temperature == 0.5
    assert s.mask_start_step(100) == 0
    assert s.lora_on_uncond is True
    assert s.negative_te_lora is True
    assert s.maps_from == "both"
    assert s.predict_after_update is False
    assert s.enabled is False


def test_legacy_options_are_the_old_behaviour():
    assert LEGACY_OPTIONS == {"maps_from": "cond", "predict_after_update": True, "negative_te_lora": False}
    assert FLAT_VERSION == 2


def test_schedule_scales_with_the_step_count():
    s = CloraSettings()
    assert list(s.optimise_steps(20)) == list(range(10))
    assert s.refine_steps(20) == (0, 2, 4)
    assert list(s.optimise_steps(7)) == [0, 1, 2]  # floor(3.5)


def test_fractions_survive_float_error():
    # 0.29 * 100 == 28.999999999999996 in binary floating point: still 29 steps.
    s = CloraSettings(opt_end=0.29, refine_at=(0.07,), mask_start=0.57)
    assert len(s.optimise_steps(100)) == 29
    assert s.refine_steps(100) == (7,)
    assert s.mask_start_step(100) == 57


def test_refinement_outside_the_update_window_is_dropped():
    s = CloraSettings(opt_end=0.35, refine_at=(0.0, 0.2, 0.2, 0.3, 0.9))  # updates at steps 0, 1, 2 of 10
    assert s.refine_steps(10) == (0, 2)
    assert CloraSettings(opt_end=0.0).refine_steps(100) == ()


# ----- validation ----------------------------------------------------------------------------------------


def test_valid_settings_validate_to_themselves():
    s = _two_bindings()
    assert s.validate() is s
    assert s.problems() == []


def test_binding_without_subject_is_named():
    s = CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)), Binding("dog_v1", ())))
    with pytest.raises(SettingsError) as e:
        s.validate()
    assert str(e.value) == "Binding 2 (LoRA 'dog_v1'): no subject word given."


@pytest.mark.parametrize(
    "settings, fragment",
    [
        (CloraSettings(enabled=True, bindings=(Binding("", ("cat",)),)), "Binding 1: no LoRA name given"),
        (_two_bindings(step_size=-1.0), "step_size"),
        (_two_bindings(step_size=float("nan")), "step_size"),
        (_two_bindings(temperature=0.0), "temperature"),
        (_two_bindings(mask_threshold=1.0), "mask_threshold"),
        (_two_bindings(mask_threshold=0.0), "mask_threshold"),
        (_two_bindings(opt_end=1.5), "opt_end"),
        (_two_bindings(mask_start=-0.1), "mask_start"),
        (_two_bindings(refine_at=(0.0, 1.2)), "refine_at"),
        (_two_bindings(refine_iters=101), "refine_iters"),
        (_two_bindings(refine_iters=2.5), "refine_iters"),
        (_two_bindings(mask_morphology="blur"), "mask_morphology 'blur'"),
        (_two_bindings(enabled="yes"), "enabled"),
        (_two_bindings(maps_from="uncond"), "Setting maps_from 'uncond' is not one of both, cond."),
        (_two_bindings(maps_from=None), "Setting maps_from None is not one of both, cond."),
        (_two_bindings(predict_after_update="yes"), "Setting predict_after_update must be true or false, got 'yes'."),
        (_two_bindings(negative_te_lora=1), "Setting negative_te_lora must be true or false, got 1."),
        (CloraSettings(enabled=True), "no LoRA is bound"),
        (
            CloraSettings(enabled=True, bindings=(Binding("a", ("cat",), weight=4.5),)),
            "Binding 1 (LoRA 'a'): weight must be in [-4, 4], got 4.5",
        ),
        (
            CloraSettings(enabled=True, bindings=(Binding("a", ("cat",), te_weight=-5),)),
            "Binding 1 (LoRA 'a'): text-encoder weight",
        ),
        (
            CloraSettings(enabled=True, bindings=(Binding("a", ("Cat",)), Binding("b", ("cat",)))),
            "Subject 'cat' is bound twice: Binding 1 (LoRA 'a') and Binding 2 (LoRA 'b')",
        ),
        (
            CloraSettings(enabled=True, bindings=(Binding("a", ("cat", "CAT")),)),
            "subject 'CAT' is given twice",
        ),
        (CloraSettings(enabled=True, bindings=(Binding("a", ("(cat)",)),)), "must not contain ( )"),
        (CloraSettings(enabled=True, bindings=(Binding("a", ("cat",), "sks[x]"),)), "trigger words 'sks[x]'"),
        (
            CloraSettings(enabled=True, bindings=tuple(Binding(f"l{i}", (f"w{i}",)) for i in range(MAX_BINDINGS + 1))),
            f"At most {MAX_BINDINGS} LoRA bindings are supported; {MAX_BINDINGS + 1} were given",
        ),
        (_two_bindings(styles=(StyleLora("ink", mode="region"),)), "Style LoRA 1 ('ink'): mode 'region'"),
        (_two_bindings(styles=(StyleLora("ink", mode="subjects"),)), "needs at least one subject"),
        (_two_bindings(styles=(StyleLora("ink", subjects=("cat",)),)), "only used in mode 'subjects'"),
        (
            _two_bindings(styles=(StyleLora("ink", mode="subjects", subjects=("horse",)),)),
            "Style LoRA 1 ('ink'): 'horse' is not the subject of any binding",
        ),
    ],
)
def test_validation_messages_name_the_problem(settings, fragment):
    with pytest.raises(SettingsError) as e:
        settings.validate()
    assert fragment in str(e.value)
    assert isinstance(e.value, ValueError)


def test_all_problems_are_reported_together():
    s = _two_bindings(temperature=-1.0, mask_morphology="x")
    problems = s.problems()
    assert len(problems) == 2
    assert any(p.startswith("Setting temperature") for p in problems)
    assert any(p.startswith("Setting mask_morphology") for p in problems)


def test_construction_normalises():
    b = Binding(" cat_v1 ", ["red   car", " cat "], "  sks  person ", 1)
    assert b == Binding("cat_v1", ("red car", "cat"), "sks person", 1.0)
    assert isinstance(b.weight, float)
    assert Binding("x", "cat|kitten").subjects == ("cat", "kitten")
    s = CloraSettings(bindings=[b], refine_at=[0, 0.5])
    assert s.bindings == (b,) and s.refine_at == (0.0, 0.5)
    assert hash(s) == hash(CloraSettings(bindings=(b,), refine_at=(0.0, 0.5)))  # frozen: usable as a key


def test_style_subject_matching_is_case_insensitive():
    _two_bindings(styles=(StyleLora("ink", mode="subjects", subjects=("DOG",)),)).validate()


# ----- flat form -----------------------------------------------------------------------------------------


def test_to_flat_keys_and_defaults_left_out():
    s = _two_bindings(styles=(StyleLora("ink", 0.5),), step_size=15.0, refine_at=(0.0, 0.1))
    flat = s.to_flat()
    assert list(flat)[:2] == ["CLoRA", "CLoRA version"]
    assert flat == {
        "CLoRA": True,
        "CLoRA version": 2,
        "CLoRA 1 LoRA": "cat_v1",
        "CLoRA 1 subject": "cat",
        "CLoRA 1 trigger": "sks",
        "CLoRA 1 weight": 0.9,
        "CLoRA 2 LoRA": "dog_v1",
        "CLoRA 2 subject": "dog",
        "CLoRA 2 trigger": "sks",
        "CLoRA 2 weight": 1.0,
        "CLoRA style 1 LoRA": "ink",
        "CLoRA style 1 weight": 0.5,
        "CLoRA style 1 mode": "whole",
        "CLoRA step size": 15.0,
        "CLoRA refine at": "0,0.1",
    }
    assert CloraSettings().to_flat() == {"CLoRA": False}
    # The version is written whenever anything beyond the bare "CLoRA: False" is.
    assert CloraSettings(maps_from="cond").to_flat() == {"CLoRA": False, "CLoRA version": 2, "CLoRA maps from": "cond"}
    assert CloraSettings(show_previews=True).to_flat() == {"CLoRA": False, "CLoRA version": 2, "CLoRA previews": True}
    assert _two_bindings().to_flat()["CLoRA version"] == 2


def test_new_options_are_written_only_when_not_default():
    flat = _two_bindings(maps_from="cond", predict_after_update=True, negative_te_lora=False).to_flat()
    assert (flat["CLoRA maps from"], flat["CLoRA predict after update"], flat["CLoRA negative TE LoRA"]) == (
        "cond", True, False)
    assert not {"CLoRA maps from", "CLoRA predict after update", "CLoRA negative TE LoRA"} & set(
        _two_bindings().to_flat())


def test_flat_numbers_are_written_as_a1111_writes_them():
    s = _two_bindings(styles=(StyleLora("ink", 1.0),), step_size=15.0, temperature=0.25,
                      bindings=(Binding("cat_v1", ("cat",), weight=1.0, te_weight=-2.0), Binding("dog_v1", ("dog",), weight=0.8)))
    flat = s.to_flat()
    written = {k: str(v) for k, v in flat.items()}
    assert written["CLoRA 1 weight"] == "1" and written["CLoRA 1 TE weight"] == "-2"
    assert written["CLoRA 2 weight"] == "0.8"
    assert written["CLoRA style 1 weight"] == "1"
    assert written["CLoRA step size"] == "15" and written["CLoRA temperature"] == "0.25"
    text = _infotext_write(flat)
    assert "CLoRA 1 weight: 1, " in text and "CLoRA 2 weight: 0.8, " in text and "1.0" not in text
    assert CloraSettings.from_flat(flat) == s
    assert CloraSettings.from_flat(_infotext_read(text)) == s
    # the values keep their type in the settings: floats, bit for bit
    back = CloraSettings.from_flat(_infotext_read(text))
    assert all(type(b.weight) is float for b in back.bindings) and type(back.step_size) is float
    assert back.bindings[1].weight == 0.8 and back.temperature == 0.25


def test_flat_reads_numbers_written_as_1_point_0():
    old = ("CLoRA: True, CLoRA 1 LoRA: cat_v1, CLoRA 1 subject: cat, CLoRA 1 weight: 1.0, CLoRA 1 TE weight: -2.0, "
           "CLoRA style 1 LoRA: ink, CLoRA style 1 weight: 1.0, CLoRA style 1 mode: whole, CLoRA step size: 15.0")
    s = CloraSettings.from_flat(_infotext_read(old))
    # (an infotext without "CLoRA version": the options added in version 2 take their old values)
    assert s == CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",), weight=1.0, te_weight=-2.0),),
                              styles=(StyleLora("ink", 1.0),), step_size=15.0, **LEGACY_OPTIONS)
    assert CloraSettings.from_flat(_infotext_read(_infotext_write(s.to_flat()))) == s


def test_several_subjects_are_joined_with_a_bar():
    s = CloraSettings(enabled=True, bindings=(Binding("car", ("red car", "automobile")),))
    assert s.to_flat()["CLoRA 1 subject"] == "red car|automobile"
    assert CloraSettings.from_flat(s.to_flat()) == s


def test_empty_refine_list_round_trips():
    s = _two_bindings(refine_at=())
    assert s.to_flat()["CLoRA refine at"] == "none"
    assert CloraSettings.from_flat(s.to_flat()) == s
    assert CloraSettings.from_flat({**s.to_flat(), "CLoRA refine at": ""}) == s


def test_from_flat_reads_strings_and_quoted_values():
    flat = {
        "Steps": "20",  # other infotext keys are ignored
        "Sampler": "Euler a",
        "CLoRA": "True",
        "CLoRA version": " 2",
        "CLoRA 1 LoRA": "cat_v1",
        "CLoRA 1 subject": "cat",
        "CLoRA 1 weight": " 0.75",
        "CLoRA 1 TE weight": "-0.5",
        "CLoRA refine at": '"0, 0.25, 0.5"',
        "CLoRA refine iters": "7",
        "CLoRA LoRA on uncond": "false",
        "CLoRA mask morphology": "open",
        "CLoRA maps from": " cond",
        "CLoRA predict after update": "True",
    }
    s = CloraSettings.from_flat(flat)
    assert s == CloraSettings(
        enabled=True,
        bindings=(Binding("cat_v1", ("cat",), weight=0.75, te_weight=-0.5),),
        refine_at=(0.0, 0.25, 0.5),
        refine_iters=7,
        lora_on_uncond=False,
        mask_morphology="open",
        maps_from="cond",
        predict_after_update=True,
    )


@pytest.mark.parametrize(
    "flat, fragment",
    [
        ({"CLoRA": True, "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat", "CLoRA colour": "red"}, "CLoRA colour"),
        ({"CLoRA": True, "CLoRA 2 LoRA": "a", "CLoRA 2 subject": "cat"}, "CLoRA 1 is missing"),
        ({"CLoRA": True, "CLoRA 1 subject": "cat"}, "'CLoRA 1 LoRA' is missing"),
        ({"CLoRA": "maybe"}, "CLoRA: 'maybe' is not true or false"),
        ({"CLoRA": True, "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat", "CLoRA 1 weight": "heavy"},
         "CLoRA 1 weight: 'heavy' is not a number"),
        ({"CLoRA": True, "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat", "CLoRA refine iters": "2.5"},
         "not a whole number"),
        ({"CLoRA": True, "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat", "CLoRA temperature": "0"}, "temperature"),
        ({"CLoRA": True, "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat", "CLoRA maps from": "uncond"},
         "Setting maps_from 'uncond' is not one of both, cond."),
        ({"CLoRA": True, "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat", "CLoRA negative TE LoRA": "maybe"},
         "CLoRA negative TE LoRA: 'maybe' is not true or false."),
        ({"CLoRA": True, "CLoRA version": "two", "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat"},
         "CLoRA version: 'two' is not a number."),
        ({"CLoRA": True, "CLoRA version": "2.5", "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat"},
         "CLoRA version: '2.5' is not a whole number."),
        ({"CLoRA": True, "CLoRA version": "0", "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat"},
         "CLoRA version: '0' is not a version number (1, 2, ...)."),
    ],
)
def test_from_flat_errors(flat, fragment):
    with pytest.raises(SettingsError) as e:
        CloraSettings.from_flat(flat)
    assert fragment in str(e.value)


def test_from_flat_lenient_mode_ignores_unknown_keys():
    flat = {**_two_bindings().to_flat(), "CLoRA future option": "1"}
    assert CloraSettings.from_flat(flat, strict=False) == _two_bindings()


# Written by the code before "CLoRA version" existed (main at 61dff51, through A1111's infotext format): the options
# of version 2 are absent, and the image was made with their old behaviour.
_LEGACY_INFOTEXT = (
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, CLoRA: True, CLoRA 1 LoRA: cat_v1, CLoRA 1 subject: cat, "
    "CLoRA 1 trigger: sks, CLoRA 1 weight: 0.9, CLoRA 2 LoRA: dog_v1, CLoRA 2 subject: dog|puppy, CLoRA 2 weight: 1, "
    "CLoRA 2 TE weight: 0.5, CLoRA style 1 LoRA: ink, CLoRA style 1 weight: 0.7, CLoRA style 1 mode: whole, "
    "CLoRA refine iters: 5"
)
_LEGACY_SETTINGS = CloraSettings(
    enabled=True,
    bindings=(Binding("cat_v1", ("cat",), "sks", 0.9), Binding("dog_v1", ("dog", "puppy"), te_weight=0.5)),
    styles=(StyleLora("ink", 0.7),),
    refine_iters=5,
)


@pytest.mark.parametrize("strict", [True, False])
def test_infotext_without_version_reads_with_the_old_behaviour(strict):
    s = CloraSettings.from_flat(_infotext_read(_LEGACY_INFOTEXT), strict=strict)
    assert (s.maps_from, s.predict_after_update, s.negative_te_lora) == ("cond", True, False)
    assert s == replace(_LEGACY_SETTINGS, **LEGACY_OPTIONS)
    # written again, it keeps that meaning: the old values are not the defaults, so they are written out
    again = _infotext_read(_infotext_write(s.to_flat()))
    assert again["CLoRA version"] == "2" and again["CLoRA maps from"] == "cond"
    assert CloraSettings.from_flat(again) == s


def test_infotext_without_version_keeps_explicit_keys():
    line = _LEGACY_INFOTEXT + ", CLoRA maps from: both, CLoRA negative TE LoRA: True"
    s = CloraSettings.from_flat(_infotext_read(line))
    assert (s.maps_from, s.predict_after_update, s.negative_te_lora) == ("both", True, True)


def test_version_2_infotext_without_the_keys_takes_the_defaults():
    line = _LEGACY_INFOTEXT.replace("CLoRA: True, ", "CLoRA: True, CLoRA version: 2, ")
    s = CloraSettings.from_flat(_infotext_read(line))
    assert s == _LEGACY_SETTINGS
    assert (s.maps_from, s.predict_after_update, s.negative_te_lora) == ("both", False, True)
    assert _infotext_write(_LEGACY_SETTINGS.to_flat()) == line[line.index("CLoRA: True"):]


@pytest.mark.parametrize("strict", [True, False])
def test_version_key_values(strict):
    flat = _LEGACY_SETTINGS.to_flat()
    read = lambda version: CloraSettings.from_flat({**flat, "CLoRA version": version}, strict=strict)  # noqa: E731
    assert read("1") == replace(_LEGACY_SETTINGS, **LEGACY_OPTIONS)  # written out: the same as absent
    assert read(2) == read("2") == read('"2"') == read("2.0") == _LEGACY_SETTINGS
    assert read("3") == read("17") == _LEGACY_SETTINGS  # a newer infotext reads as the newest version known
    for bad in ("two", "2.5", "0", "-1", ""):
        if strict:
            with pytest.raises(SettingsError, match="^CLoRA version: "):
                read(bad)
        else:
            assert read(bad) == _LEGACY_SETTINGS  # pasting stays possible; read as the current version


def test_without_clora_keys_or_with_the_bare_disabled_flag_the_defaults_hold():
    assert CloraSettings.from_flat({}) == CloraSettings()
    assert CloraSettings.from_flat({"Steps": "20"}) == CloraSettings()
    assert CloraSettings.from_flat({"CLoRA": "False"}) == CloraSettings()
    # disabled, but with options: written by the old code (which wrote the infotext only when enabled, so by hand)
    old = CloraSettings.from_flat({"CLoRA": "False", "CLoRA step size": "5"})
    assert old == CloraSettings(step_size=5.0, **LEGACY_OPTIONS)
    assert CloraSettings.from_flat({"CLoRA": "True", "CLoRA 1 LoRA": "a", "CLoRA 1 subject": "cat"}).maps_from == "cond"


# An infotext writer/parser written here from the format A1111 documents by example ("key: value, key: value",
# values holding a comma, colon or newline JSON-quoted), to check values survive the text round trip.
def _infotext_write(flat: dict) -> str:
    items = []
    for k, v in flat.items():
        text = str(v)
        if any(c in text for c in ",:\n"):
            text = json.dumps(text, ensure_ascii=False)
        items.append(f"{k}: {text}")
    return ", ".join(items)


def _infotext_read(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(line):
        colon = line.index(":", i)
        key = line[i:colon].strip()
        j = colon + 1
        while j < len(line) and line[j] == " ":
            j += 1
        if j < len(line) and line[j] == '"':
            k = j + 1
            while line[k] != '"':
                k += 2 if line[k] == "\\" else 1
            value = json.loads(line[j : k + 1])
            end = k + 1
        else:
            end = line.find(",", j)
            end = len(line) if end < 0 else end
            value = line[j:end]
        out[key] = value
        i = end + 1 if end < len(line) else end
        while i < len(line) and line[i] == " ":
            i += 1
    return out


_WORDS = ["cat", "dog", "red car", "old man", "t-rex", "Ελληνικά", "sea-gull", "x1", "bird", "cat, black", "owl: snowy",
          "tree", "blue sky", "kitten", "horse", "robot"]


def _random_settings(rng: random.Random) -> CloraSettings:
    def maybe(value, default, p=0.5):
        return value if rng.random() < p else default

    n = rng.randint(0, MAX_BINDINGS)
    pool = rng.sample(_WORDS, len(_WORDS))
    bindings = []
    for i in range(n):
        k = rng.choice([1, 1, 2])
        subjects = tuple(pool.pop() for _ in range(k) if pool)
        lora = rng.choice(["cat_v1", "dog-lora.v2", "my lora", "x", "lora:with:colons", "ß"]) + str(i)
        triggers = rng.choice(["", "sks", "ohwx person", "a, b", "tr:1"])
        weight = rng.choice([1.0, 0.5, rng.uniform(-4, 4), -4.0, 4.0])
        te = rng.choice([None, rng.uniform(-4, 4), 0.0])
        bindings.append(Binding(lora, subjects, triggers, weight, te))
    bound = [s for b in bindings for s in b.subjects]
    styles = []
    for _ in range(rng.randint(0, 2)):
        mode = rng.choice(["whole", "subjects"]) if bound else "whole"
        subjects = tuple(rng.sample(bound, rng.randint(1, min(2, len(bound))))) if mode == "subjects" else ()
        styles.append(StyleLora(rng.choice(["ink", "watercolor, soft", "s:1"]), rng.uniform(-4, 4), mode, subjects))
    return CloraSettings(
        enabled=bool(bindings) and rng.random() < 0.8,
        bindings=tuple(bindings),
        styles=tuple(styles),
        step_size=maybe(rng.uniform(0, 100), 20.0),
        opt_end=maybe(rng.random(), 0.5),
        refine_at=maybe(tuple(rng.random() for _ in range(rng.randint(0, 4))), (0.0, 0.1, 0.2)),
        refine_iters=maybe(rng.randint(0, 100), 20),
        temperature=maybe(rng.uniform(1e-3, 10), 0.5),
        mask_threshold=maybe(rng.uniform(0.01, 0.99), 0.4),
        mask_morphology=maybe(rng.choice(MORPHOLOGIES), "none"),
        mask_start=maybe(rng.random(), 0.0),
        lora_on_uncond=maybe(False, True),
        show_previews=maybe(True, False),
        maps_from=maybe("cond", "both"),
        predict_after_update=maybe(True, False),
        negative_te_lora=maybe(False, True),
    )


def test_randomised_round_trips():
    rng = random.Random(1234)
    seen = set()
    for _ in range(300):
        s = _random_settings(rng).validate()
        seen.add((s.enabled, s.maps_from, s.predict_after_update, s.negative_te_lora))
        flat = s.to_flat()
        assert CloraSettings.from_flat(flat) == s
        # Through infotext text: every value becomes a string, some JSON-quoted.
        text = _infotext_write(flat)
        parsed = _infotext_read(text)
        assert set(parsed) == set(flat)
        assert CloraSettings.from_flat(parsed) == s
        # Named-field form, through JSON text.
        assert CloraSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
        assert CloraSettings.from_json(json.dumps(s.to_json())) == s
    assert len(seen) == 16  # every combination of the new options, enabled or not, went round


def test_infotext_helpers_agree_on_a_hand_written_line():
    line = 'Steps: 20, CLoRA: True, CLoRA 1 subject: "cat, black", CLoRA refine at: "0,0.1"'
    assert _infotext_read(line) == {"Steps": "20", "CLoRA": "True", "CLoRA 1 subject": "cat, black",
                                    "CLoRA refine at": "0,0.1"}


# ----- named-field form ----------------------------------------------------------------------------------


def test_to_json_shape():
    s = _two_bindings(styles=(StyleLora("ink", mode="subjects", subjects=("cat",)),))
    d = s.to_json()
    assert d["bindings"][0] == {"lora": "cat_v1", "subjects": ["cat"], "triggers": "sks", "weight": 0.9,
                                "te_weight": None}
    assert d["styles"] == [{"lora": "ink", "weight": 0.8, "mode": "subjects", "subjects": ["cat"]}]
    assert d["refine_at"] == [0.0, 0.1, 0.2]
    assert set(d) == {f for f in CloraSettings.__dataclass_fields__}


def test_from_json_minimal_document_takes_defaults():
    s = CloraSettings.from_json({"enabled": True, "bindings": [{"lora": "cat", "subjects": ["cat"], "triggers": "sks"}],
                                 "step_size": 10})
    assert s == replace(CloraSettings(), enabled=True, bindings=(Binding("cat", ("cat",), "sks"),), step_size=10.0)


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ({"enabled": True, "bindngs": []}, "unknown key 'bindngs'"),
        ({"enabled": True, "bindings": [{"lora": "a", "subjects": ["cat"], "weigth": 1}]},
         "Binding 1: unknown key 'weigth'"),
        ({"styles": [{"lora": "ink", "strength": 1}]}, "Style LoRA 1: unknown key 'strength'"),
        ({"bindings": [{"subjects": ["cat"]}]}, "Binding 1: the key 'lora' is missing"),
        ({"bindings": {"lora": "a"}}, "bindings must be a list"),
        ({"step_size": "fast"}, "step_size: 'fast' is not a number"),
        ({"enabled": "perhaps"}, "enabled"),
        ({"enabled": True, "bindings": [{"lora": "dog_v1", "subjects": []}]},
         "Binding 1 (LoRA 'dog_v1'): no subject word given"),
        ([1, 2], "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_from_json_errors(doc, fragment):
    with pytest.raises(SettingsError) as e:
        CloraSettings.from_json(doc)
    assert fragment in str(e.value)


def test_json_schema_accepts_what_to_json_writes_and_rejects_bad_documents():
    import jsonschema
    schema = json_schema()
    assert CloraSettings.json_schema() == schema
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    assert set(schema["properties"]) == set(CloraSettings().to_json())
    rng = random.Random(7)
    for _ in range(50):
        doc = _random_settings(rng).to_json()
        assert list(validator.iter_errors(doc)) == []
    good = _two_bindings().to_json()
    bad_docs = [
        {**good, "temperature": 0},
        {**good, "mask_threshold": 1},
        {**good, "mask_morphology": "blur"},
        {**good, "refine_iters": 101},
        {**good, "maps_from": "uncond"},
        {**good, "predict_after_update": "sometimes"},
        {**good, "negative_te_lora": None},
        {**good, "surprise": 1},
        {**good, "bindings": [{**good["bindings"][0], "weight": 9}]},
        {**good, "bindings": [{**good["bindings"][0], "extra": 1}]},
        {**good, "bindings": [{"lora": "a", "subjects": []}]},
        {**good, "bindings": [{"lora": f"l{i}", "subjects": [f"w{i}"]} for i in range(MAX_BINDINGS + 1)]},
    ]
    for doc in bad_docs:
        assert list(validator.iter_errors(doc)), doc
        with pytest.raises(SettingsError):
            CloraSettings.from_json(doc)
