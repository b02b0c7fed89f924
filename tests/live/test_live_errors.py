"""Live: each bad CLoRA input gives an HTTP 422 error response whose message (under ``detail``) names the problem, and
the server then still generates normally (the same image as before, pixel for pixel)."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from tests.live.webui_api import WebUI, named_args, same_pixels, skip_without_webui

skip_without_webui()


def _bad_word(loras) -> tuple[list[Any], dict[str, Any], list[str]]:
    args = named_args(loras)
    args[0]["bindings"][0]["subjects"] = ["horse"]
    return args, {}, ["horse", "not in the prompt"]


def _missing_lora(loras):
    args = named_args(loras)
    args[0]["bindings"][1]["lora"] = "no_such_lora_4711"
    return args, {}, ["no_such_lora_4711", "not found"]


def _unknown_key(loras):
    args = named_args(loras)
    args[0]["colour"] = "red"
    return args, {}, ["colour", "unknown key"]


def _unknown_binding_key(loras):
    args = named_args(loras)
    args[0]["bindings"][0]["strength"] = 0.5
    return args, {}, ["strength", "unknown key", "Binding 1"]


def _nine_bindings(loras):
    words = ["cat", "dog", "bird", "fish", "tree", "house", "car", "boat", "moon"]
    args = named_args(loras)
    args[0]["bindings"] = [{"lora": loras[k % 2], "subjects": [w]} for k, w in enumerate(words)]
    prompt = "a photo of a " + ", a ".join(words)
    return args, {"prompt": prompt}, ["At most 8", "9"]


def _and_prompt(loras):
    return named_args(loras), {"prompt": "a photo of a cat AND a photo of a dog"}, ["AND"]


CASES: dict[str, Callable[[Any], tuple[list[Any], dict[str, Any], list[str]]]] = {
    "subject word not in the prompt": _bad_word,
    "LoRA not found": _missing_lora,
    "unknown JSON key": _unknown_key,
    "unknown binding key": _unknown_binding_key,
    "more than 8 bindings": _nine_bindings,
    "AND prompt": _and_prompt,
}


def _assert_error_then_normal(webui: WebUI, reference, args, changes, expected: list[str]) -> None:
    r = webui.generate(args, **changes)
    assert not r.ok, f"expected an error response, got {r.status} with {len(r.body.get('images', []))} image(s)"
    # a refused input: 422 with the message under "detail" on both hosts (A1111 repeats it under "errors")
    assert r.status == 422, f"expected HTTP 422 for a refused input, got {r.status}: {r.error_text()}"
    detail = r.body.get("detail", "") if isinstance(r.body, dict) else ""
    assert detail.startswith("CLoRA: ") and detail.count("CLoRA:") == 1, f"not one 'CLoRA: ' message: {r.body!r}"
    message = r.error_text()
    for part in expected:
        assert part.lower() in message.lower(), f"the error message does not name {part!r}: {message!r}"
    after = webui.generate()
    assert after.ok, f"the server no longer generates after the error ({after.status}): {after.error_text()}"
    assert same_pixels(after.images()[0], reference), "a plain generation changed after the failed CLoRA request"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_reported_and_the_server_recovers(webui, loras, reference, case):
    args, changes, expected = CASES[case](loras)
    _assert_error_then_normal(webui, reference, args, changes, expected)


def _sdxl_lora(webui: WebUI) -> str:
    for name, meta in webui.lora_metadata().items():
        base = str(meta.get("ss_base_model_version", "")) + " " + str(meta.get("modelspec.architecture", ""))
        if "xl" in base.lower():
            return name
    pytest.skip("the server has no SDXL LoRA (by its metadata) to bind to an SD 1.x model")


def test_sdxl_lora_on_sd1_model_is_reported(webui, loras, reference):
    models = webui.get("/sdapi/v1/options").body or {}
    if "xl" in str(models.get("sd_model_checkpoint", "")).lower():
        pytest.skip("the loaded checkpoint looks like SDXL")
    name = _sdxl_lora(webui)
    args = named_args(loras)
    args[0]["bindings"][0]["lora"] = name
    _assert_error_then_normal(webui, reference, args, {}, [name, "SDXL"])


def _checkpoint(webui: WebUI) -> str:
    return str((webui.get("/sdapi/v1/options").body or {}).get("sd_model_checkpoint", ""))


def _sd1_lora(webui: WebUI) -> str:
    webui.post("/sdapi/v1/refresh-loras")
    for name, meta in webui.lora_metadata().items():
        base = str(meta.get("ss_base_model_version", "")) + " " + str(meta.get("modelspec.architecture", ""))
        if "v1" in base.lower() and "xl" not in base.lower():
            return name
    pytest.skip("the server has no SD 1.x LoRA (by its metadata) to bind to an SDXL model")


def test_sd1_lora_on_sdxl_model_is_reported(webui, loras, reference):
    if "xl" not in _checkpoint(webui).lower():
        pytest.skip("the loaded checkpoint does not look like SDXL")
    name = _sd1_lora(webui)
    args = named_args(loras)
    args[0]["bindings"][0]["lora"] = name
    _assert_error_then_normal(webui, reference, args, {}, [name, "SD 1.x", "the loaded model is SDXL"])


def test_refiner_is_reported(webui, loras, reference):
    """A refiner swaps the model during sampling: refused (the loaded checkpoint itself serves as the refiner)."""
    checkpoint = _checkpoint(webui)
    if not checkpoint:
        pytest.skip("the server does not name its checkpoint")
    _assert_error_then_normal(webui, reference, named_args(loras),
                              {"refiner_checkpoint": checkpoint, "refiner_switch_at": 0.5}, ["refiner"])
