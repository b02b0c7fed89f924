"""Fixtures of the live WebUI tests (see `tests.live.webui_api` for the environment variables).

Every test module calls `skip_without_webui` at import, so without ``CLORA_WEBUI_URL`` the whole folder skips.
"""
from __future__ import annotations

import os

import pytest

from tests.live.webui_api import ENV_LORAS, ENV_URL, WebUI, overrides_from_env


@pytest.fixture(scope="session")
def webui() -> WebUI:
    client = WebUI(os.environ[ENV_URL].strip().rstrip("/"), overrides_from_env())
    try:
        r = client.get("/sdapi/v1/sd-models")
    except OSError as exc:
        pytest.fail(f"{ENV_URL}={client.url} does not answer: {exc}")
    if not r.ok:
        pytest.fail(f"{client.url}/sdapi/v1/sd-models answered {r.status}; is the WebUI started with --api?")
    if not client.get("/clora/schema").ok:
        pytest.fail(f"{client.url} has no /clora/schema route: is the sd-webui-clora extension installed and enabled?")
    return client


@pytest.fixture(scope="session")
def loras(webui: WebUI) -> tuple[str, str]:
    """Two LoRA names: ``CLORA_LIVE_LORAS`` or the first two the server lists."""
    text = os.environ.get(ENV_LORAS, "").strip()
    names = [n.strip() for n in text.split(",") if n.strip()] if text else webui.lora_names()[:2]
    if len(names) < 2:
        pytest.skip(f"the server lists fewer than two LoRAs ({names}); put two in its LoRA folder or set {ENV_LORAS}")
    return names[0], names[1]


@pytest.fixture(scope="session", autouse=True)
def reference(webui: WebUI):
    """The image of `BASE_PAYLOAD` without CLoRA, made before any CLoRA run of this session
    (autouse: set up before the first live test runs)."""
    r = webui.generate()
    assert r.ok, f"a plain generation failed ({r.status}): {r.error_text()}"
    return r.images()[0]
