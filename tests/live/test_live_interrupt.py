"""Live: interrupting a CLoRA generation mid-way leaves the server working, with no trace of CLoRA in what follows."""
from __future__ import annotations

import os
import threading
import time

from tests.live.webui_api import Response, named_args, same_pixels, skip_without_webui

skip_without_webui()

LONG_STEPS = 200
#: Bounded polling for the long run to reach its second sampling step: at most CLORA_LIVE_INTERRUPT_WAIT seconds
#: (default 120; a full-size SDXL on a CPU needs minutes for its first, optimised steps).
POLL_INTERVAL = 0.05
POLL_LIMIT = int(float(os.environ.get("CLORA_LIVE_INTERRUPT_WAIT", "120")) / POLL_INTERVAL)


def test_interrupt_mid_generation(webui, loras, reference):
    before = webui.generate(named_args(loras))
    assert before.ok, before.error_text()

    result: dict[str, Response] = {}

    def long_run() -> None:
        result["r"] = webui.generate(named_args(loras), steps=LONG_STEPS)

    worker = threading.Thread(target=long_run, daemon=True)
    worker.start()
    reached = 0
    try:
        for _ in range(POLL_LIMIT):
            state = webui.get("/sdapi/v1/progress?skip_current_image=true").body.get("state", {})
            reached = int(state.get("sampling_step") or 0)
            if reached >= 2 or not worker.is_alive():
                break
            time.sleep(POLL_INTERVAL)
        assert worker.is_alive(), f"the {LONG_STEPS}-step run ended before it could be interrupted: {result}"
        assert reached >= 2, ("the long run never reached its second sampling step (a slow server: raise "
                              "CLORA_LIVE_INTERRUPT_WAIT)")
    finally:  # never leave the server on a long run
        assert webui.post("/sdapi/v1/interrupt").ok
    worker.join(timeout=300)
    assert not worker.is_alive(), "the interrupted generation did not return"
    interrupted = result["r"]
    if interrupted.ok:  # A1111 returns what it had when interrupted
        assert interrupted.info()["infotexts"], "the interrupted run returned no infotext"

    after = webui.generate(named_args(loras))
    assert after.ok, f"CLoRA does not work after the interrupt ({after.status}): {after.error_text()}"
    assert same_pixels(after.images()[0], before.images()[0]), "the same CLoRA request changed after the interrupt"
    plain = webui.generate()
    assert plain.ok, plain.error_text()
    assert same_pixels(plain.images()[0], reference), "a plain generation changed after the interrupted CLoRA run"
