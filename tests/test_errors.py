"""User-facing error messages: every kind of bad input reaches the user (WebUI glue, API route, command line) as
exactly one ``CLoRA: `` prefix followed by a capitalised sentence."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from clora.errors import PREFIX, detail, user_message
from clora.hosts.common import CloraError
from clora.lora.types import LoraError
from clora.prompts import HFPromptTokenizer, PromptError, build_variants
from clora.runner import RunnerError, _sample_fn
from clora.settings import Binding, CloraSettings, SettingsError
from clora.ui import args_to_settings
from tests.models import clip_tokenizer, fixtures_dir

ROOT = Path(__file__).resolve().parent.parent
OLD_FORMS = ("CLoRA settings", "CLoRA failed", "CLoRA cannot", "CLoRA could", "CLoRA needs", "CLoRA supports",
             "CLoRA does not", "CLoRA was not", "CLoRA expects", "CLoRA override", "clora: error")


def assert_user_facing(message: str) -> None:
    assert message.startswith(PREFIX), message
    assert message.count("CLoRA:") == 1, message
    rest = message[len(PREFIX):]
    assert rest and (rest[0].isupper() or rest[0] in "'\"-<"), message
    assert not any(form in message for form in OLD_FORMS), message


def _raised(call) -> Exception:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test collects whatever the call raises
        return exc
    raise AssertionError("no exception")


def _bad_inputs() -> dict[str, Exception]:
    """One exception of each kind the core raises at the user, from real bad input."""
    tok = HFPromptTokenizer(clip_tokenizer())
    return {
        "settings: not JSON": _raised(lambda: CloraSettings.from_json("{not json")),
        "settings: not an object": _raised(lambda: CloraSettings.from_json("[1, 2]")),
        "settings: unknown key": _raised(lambda: CloraSettings.from_json({"colour": "red"})),
        "settings: option not a number": _raised(lambda: CloraSettings.from_json({"step_size": "fast"})),
        "settings: option out of range": _raised(lambda: CloraSettings(step_size=-1.0).validate()),
        "settings: enabled without bindings": _raised(lambda: CloraSettings(enabled=True).validate()),
        "settings: binding without subject": _raised(
            lambda: CloraSettings(enabled=True, bindings=(Binding("cat_v1", ()),)).validate()),
        "settings: wrong argument count": _raised(lambda: args_to_settings([True])),
        "settings: unknown override": _raised(
            lambda: args_to_settings([{"enabled": True, "bindings": [{"lora": "a", "subjects": ["cat"]}]}],
                                     {"colour": 1})),
        "prompt: subject missing": _raised(
            lambda: build_variants("a photo of a cat", (Binding("dog_v1", ("dog",)),), tok)),
        "prompt: AND": _raised(lambda: build_variants("a cat AND a dog", (Binding("cat_v1", ("cat",)),), tok)),
        "lora: pickle file": _raised(lambda: __import__("clora.lora.files", fromlist=["x"]).load_lora("x.ckpt")),
        "lora: missing file": _raised(
            lambda: __import__("clora.lora.files", fromlist=["x"]).load_lora("/nonexistent/x.safetensors")),
        "runner: unknown sampler": _raised(lambda: _sample_fn("plms")),
        "host: CloraError": CloraError("Only SD 1.x models are supported for now; the loaded model is SDXL."),
        "host: CloraError of a CloraError": CloraError(CloraError("AND-composed prompts are not supported.")),
        "host: already prefixed": ValueError("CLoRA: something wrong"),
        "host: old settings prefix": ValueError("CLoRA settings: something wrong"),
        "unexpected exception": AttributeError("'NoneType' object has no attribute 'cond_stage_model'"),
        "unexpected, lower-case": RuntimeError("list index out of range"),
        "empty message": KeyboardInterrupt(),
    }


BAD = _bad_inputs()


def test_core_messages_carry_no_prefix():
    for kind, exc in BAD.items():
        if isinstance(exc, (SettingsError, PromptError, LoraError, RunnerError)):
            assert not str(exc).startswith("CLoRA"), (kind, str(exc))


@pytest.mark.parametrize("kind", list(BAD))
def test_each_kind_of_error_reaches_the_webui_user_with_one_prefix(kind):
    from clora.hosts import webui as glue

    class P:
        def sample(self):
            return "sampled"

    p = P()
    glue.install_error(p, BAD[kind])
    with pytest.raises(CloraError) as e:
        p.sample()
    assert_user_facing(str(e.value))
    assert user_message(e.value) == str(e.value)  # idempotent: wrapping again changes nothing
    assert str(CloraError(e.value)) == str(e.value)
    # the core's own words survive
    original = str(BAD[kind]).strip()
    if original and not isinstance(BAD[kind], CloraError):
        tail = original.replace("CLoRA settings: ", "").replace("CLoRA: ", "")
        assert tail[1:] in str(e.value)


def test_failures_while_preparing_keep_one_prefix():
    from clora.hosts import webui as glue
    from tests.test_webui_glue import FakeP, RecordingHost, args_for, CAT_DOG

    class Failing(RecordingHost):
        def before_process_batch(self, p, settings):
            raise CloraError("Could not find the text encoder of this model.")

    expected = "CLoRA: Failed while preparing the prompts: Could not find the text encoder of this model."
    p, host = FakeP(), Failing()  # the UI: stopped before sampling, the message among the comments
    glue.on_process(p, args_for(CAT_DOG), host)
    glue.on_before_process_batch(p, host)
    assert p.prompts == [] and list(p.comments) == [expected]
    p, host = FakeP(is_api=True), Failing()  # the API: raised from sampling
    glue.on_process(p, args_for(CAT_DOG), host)
    glue.on_before_process_batch(p, host)
    glue.on_process_batch(p, host)
    with pytest.raises(CloraError) as e:
        p.sample()
    assert str(e.value) == expected
    assert_user_facing(str(e.value))


def test_unavailable_host_messages():
    from clora.hosts import HostDetection
    from clora.hosts import webui as glue

    for message in ("Forge is not supported yet (no Forge glue is installed).", ""):
        doc = glue.loras_document(None, message)
        assert_user_facing(doc["error"])
    d = HostDetection(None, "none", "Could not start here: boom")
    assert_user_facing(glue.loras_document(d.host, d.message)["error"])


def test_user_message_rules():
    assert user_message("The prompt is 80 tokens.") == "CLoRA: The prompt is 80 tokens."
    assert user_message("CLoRA: CLoRA: the prompt") == "CLoRA: The prompt"
    assert user_message("clora: error: width and height must be multiples of 32") == (
        "CLoRA: Width and height must be multiples of 32")
    # identifiers, file names and quoted values are not capitalised
    assert user_message("step_size must be a number") == "CLoRA: step_size must be a number"
    assert user_message("model.ckpt: not loaded") == "CLoRA: model.ckpt: not loaded"
    assert user_message("'dog' (LoRA 'd') is not in the prompt.") == "CLoRA: 'dog' (LoRA 'd') is not in the prompt."
    # an infotext key that starts with "CLoRA" is not a prefix
    assert user_message("CLoRA step size: 'x' is not a number.") == "CLoRA: CLoRA step size: 'x' is not a number."
    assert detail(ValueError("CLoRA: x happened")) == "X happened"
    assert user_message(KeyError("b9_weight")) == "CLoRA: 'b9_weight'"
    assert user_message(ValueError()) == "CLoRA: ValueError"


def test_no_raise_in_clora_writes_its_own_prefix():
    """The prefix is added at the boundary only: no message raised in clora/ (or set as a host-detection reason)
    starts with "CLoRA" itself."""
    offenders = []
    for path in sorted((ROOT / "clora").rglob("*.py")) + [ROOT / "scripts" / "clora.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            calls = []
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                calls.append(node.exc)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("HostDetection", "CloraError"):
                calls.append(node)
            for call in calls:
                for arg in call.args:
                    first = arg.values[0] if isinstance(arg, ast.JoinedStr) and arg.values else arg
                    if isinstance(first, ast.Constant) and isinstance(first.value, str) and \
                            first.value.lstrip().startswith(("CLoRA ", "CLoRA:")):
                        offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: {first.value[:40]!r}")
    assert not offenders, offenders


# ----- command line -----------------------------------------------------------------------------------------------


def _cli_error(argv, capsys) -> str:
    from clora.__main__ import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert sum(line.startswith(PREFIX) for line in err) == 1
    return err[-1]


def test_cli_reports_each_kind_of_bad_input_with_one_prefix(tmp_path, capsys):
    ckpt = str(fixtures_dir() / "tiny-sd1.safetensors")
    base = ["generate", "--ckpt", ckpt, "--prompt", "a photo of a cat", "--steps", "1", "--width", "64",
            "--height", "64", "--out", str(tmp_path / "o.png")]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    unknown_key = tmp_path / "unknown.json"
    unknown_key.write_text(json.dumps({"colour": "red"}))
    pt = tmp_path / "model.ckpt"
    pt.write_bytes(b"")
    cases = {
        "settings not JSON": (base + ["--settings", str(bad_json)], "CLoRA: Settings are not valid JSON: "),
        "settings unknown key": (base + ["--settings", str(unknown_key)], "CLoRA: Settings: unknown key 'colour'."),
        "settings file missing": (base + ["--settings", str(tmp_path / "nope.json")],
                                  f"CLoRA: The settings file {tmp_path / 'nope.json'} cannot be read: "),
        "checkpoint missing": ([*base[:2], str(tmp_path / "x.safetensors"), *base[3:]],
                               f"CLoRA: Checkpoint {tmp_path / 'x.safetensors'} does not exist."),
        "pickle checkpoint": ([*base[:2], str(pt), *base[3:]], "CLoRA: Checkpoint model.ckpt: only .safetensors"),
        "bad --bind": (base + ["--bind", "cat"], "CLoRA: Argument --bind: --bind 'cat': expected LORA=SUBJECT"),
        "bad --sampler": (base + ["--sampler", "plms"], "CLoRA: Argument --sampler: invalid choice: 'plms'"),
        "missing --prompt": (["generate", "--ckpt", ckpt], "CLoRA: The following arguments are required: --prompt"),
        "LoRA file missing": (base + ["--lora", str(tmp_path / "cat.safetensors"), "--bind", "cat=cat"],
                              f"CLoRA: LoRA file {tmp_path / 'cat.safetensors'} does not exist."),
        "bound LoRA not given": (base + ["--bind", "cat=cat"], "CLoRA: LoRA 'cat' not found (given: none)."),
        "bad size": (base + ["--width", "50"], "CLoRA: Width and height must be positive multiples of 8; got 50x64."),
        "prompt too long": (base[:4] + ["cat " * 80] + base[5:], "CLoRA: The prompt is 82 tokens; this model's text "
                                                                 "encoder takes at most 77 ("),
    }
    for kind, (argv, expected) in cases.items():
        line = _cli_error(argv, capsys)
        assert line.startswith(expected), (kind, line)
        assert_user_facing(line)


def test_bug_messages_are_user_facing_and_say_what_to_send():
    from clora.errors import ISSUES_URL, bug_message

    for error in (RuntimeError("No cross-attention maps were captured at 3x4"), KeyError("x"), ValueError(""),
                  AttributeError("a " * 400)):
        message = bug_message(error, "preparing this batch")
        assert_user_facing(message)
        assert message.startswith(f"CLoRA: Unexpected error while preparing this batch ({type(error).__name__}: ")
        assert ISSUES_URL in message and "console output" in message and len(message) < 700
        assert user_message(message) == message
