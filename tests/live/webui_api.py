"""A small client for a running A1111/Forge WebUI's API, for the live tests (standard library and PIL only).

Configuration, all from the environment:

* ``CLORA_WEBUI_URL`` — the WebUI's address, e.g. ``http://127.0.0.1:7860`` (started with ``--api``).  Without it the
  live tests skip (`skip_without_webui`).
* ``CLORA_LIVE_LORAS`` — two LoRA names the server has, comma separated (``cat_lora,dog_lora``); default: the first
  two that ``GET /clora/loras`` (or ``/sdapi/v1/loras``) lists.
* ``CLORA_LIVE_OVERRIDES`` — a JSON object merged into every request's ``override_settings``
  (e.g. ``{"emphasis": "No norm"}`` for a random tiny checkpoint whose default emphasis gives NaNs).
* ``CLORA_LIVE_SIZE`` / ``CLORA_LIVE_STEPS`` — image side and steps of the generations (default 128 and 6; a
  full-size SD1.5 checkpoint on a CPU wants 64 and 4).
"""
from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import pytest
from PIL import Image, ImageChops

ENV_URL = "CLORA_WEBUI_URL"
ENV_LORAS = "CLORA_LIVE_LORAS"
ENV_OVERRIDES = "CLORA_LIVE_OVERRIDES"
ENV_SIZE = "CLORA_LIVE_SIZE"
ENV_STEPS = "CLORA_LIVE_STEPS"

#: The prompt of every live generation; the two bindings use its words "cat" and "dog".
PROMPT = "a photo of a cat and a dog"
#: Small and quick: the live tests check behaviour, not quality.
BASE_PAYLOAD: dict[str, Any] = {
    "prompt": PROMPT,
    "negative_prompt": "",
    "width": int(os.environ.get(ENV_SIZE, "128")),
    "height": int(os.environ.get(ENV_SIZE, "128")),
    "steps": int(os.environ.get(ENV_STEPS, "6")),
    "cfg_scale": 7.0,
    "sampler_name": "Euler a",
    "seed": 1234,
    "batch_size": 1,
    "n_iter": 1,
}
#: Request timeout (seconds) of one API call: generous, the CPU may be shared.
TIMEOUT = 600.0


def skip_without_webui() -> str:
    """The WebUI URL from the environment; skips the calling test module when it is not set."""
    url = os.environ.get(ENV_URL, "").strip()
    if not url:
        pytest.skip(
            f"live WebUI tests need a running A1111/Forge WebUI with --api and this extension installed: "
            f"set {ENV_URL} (e.g. http://127.0.0.1:7860)",
            allow_module_level=True,
        )
    return url.rstrip("/")


def overrides_from_env() -> dict[str, Any]:
    text = os.environ.get(ENV_OVERRIDES, "").strip()
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{ENV_OVERRIDES} must be a JSON object, got {text!r}")
    return value


@dataclass
class Response:
    """One API answer: HTTP status and the decoded JSON body (``None`` when the body is not JSON)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return self.status == 200

    def error_text(self) -> str:
        """Every text of an error body joined (A1111 puts the message in ``errors``, FastAPI in ``detail``)."""
        if isinstance(self.body, Mapping):
            return " ".join(str(v) for v in self.body.values() if v)
        return str(self.body)

    def images(self) -> list[Image.Image]:
        return [decode_image(b) for b in self.body.get("images", [])]

    def info(self) -> dict[str, Any]:
        return json.loads(self.body["info"])


@dataclass
class WebUI:
    """The API of one running WebUI, with this test run's extra ``override_settings``."""

    url: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def request(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT) -> Response:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Response(r.status, _json_or_text(r.read()))
        except urllib.error.HTTPError as e:
            return Response(e.code, _json_or_text(e.read()))

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, timeout: float = TIMEOUT) -> Response:
        return self.request("POST", path, body if body is not None else {}, timeout)

    def payload(self, **changes: Any) -> dict[str, Any]:
        """`BASE_PAYLOAD` with ``changes`` and this run's override settings."""
        out = {**BASE_PAYLOAD, **changes}
        out["override_settings"] = {**self.overrides, **(changes.get("override_settings") or {})}
        return out

    def txt2img(self, payload: Mapping[str, Any], timeout: float = TIMEOUT) -> Response:
        return self.post("/sdapi/v1/txt2img", dict(payload), timeout)

    def generate(self, clora: Optional[Any] = None, **changes: Any) -> Response:
        """txt2img with `BASE_PAYLOAD` + ``changes``; ``clora``: the CLoRA script's ``args`` list (or ``None``)."""
        payload = self.payload(**changes)
        if clora is not None:
            scripts = dict(payload.get("alwayson_scripts") or {})
            scripts["clora"] = {"args": list(clora)}
            payload["alwayson_scripts"] = scripts
        return self.txt2img(payload)

    def lora_names(self) -> list[str]:
        r = self.get("/clora/loras")
        if r.ok and isinstance(r.body, Mapping) and r.body.get("loras"):
            return [str(n) for n in r.body["loras"]]
        r = self.get("/sdapi/v1/loras")
        if r.ok and isinstance(r.body, list):
            return [str(item["name"]) for item in r.body]
        return []

    def lora_metadata(self) -> dict[str, dict[str, Any]]:
        """LoRA name -> its file metadata, from ``GET /sdapi/v1/loras``."""
        r = self.get("/sdapi/v1/loras")
        if not r.ok or not isinstance(r.body, list):
            return {}
        return {str(item["name"]): dict(item.get("metadata") or {}) for item in r.body}


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return raw.decode("utf-8", "replace")


# ----- images ----------------------------------------------------------------------------------------------------


def decode_image(b64: str) -> Image.Image:
    if "," in b64[:64]:  # a data URL
        b64 = b64.split(",", 1)[1]
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    """Identical size and RGB values."""
    a, b = a.convert("RGB"), b.convert("RGB")
    return a.size == b.size and ImageChops.difference(a, b).getbbox() is None


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean |a - b| over every RGB value (0..255); the images must have the same size."""
    a, b = a.convert("RGB"), b.convert("RGB")
    assert a.size == b.size, f"sizes differ: {a.size} vs {b.size}"
    hist = ImageChops.difference(a, b).histogram()  # 3 x 256 bins
    total = sum((i % 256) * n for i, n in enumerate(hist))
    return total / (a.size[0] * a.size[1] * 3)


# ----- CLoRA arguments ---------------------------------------------------------------------------------------------


def named_args(loras: Sequence[str], **options: Any) -> list[dict[str, Any]]:
    """The named JSON form of the CLoRA arguments: ``loras[0]`` bound to "cat" (trigger "sks"), ``loras[1]`` to
    "dog"; small refinement so that runs stay quick."""
    settings: dict[str, Any] = {
        "enabled": True,
        "bindings": [
            {"lora": loras[0], "subjects": ["cat"], "triggers": "sks"},
            {"lora": loras[1], "subjects": ["dog"]},
        ],
        "refine_iters": 2,
    }
    settings.update(options)
    return [settings]
