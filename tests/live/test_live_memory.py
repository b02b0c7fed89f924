"""Live: memory over many CLoRA requests.  Nothing may be kept per request (caches keyed per request, previews,
hooks, closures over ``p``): the server's resident memory (and, on a GPU, the allocated CUDA memory) must not grow
with the number of CLoRA generations.

Uses the WebUI's own ``GET /sdapi/v1/memory`` (``ram.used`` is the server process's RSS; ``cuda.allocated.current``
on a GPU).  ``CLORA_LIVE_MEMORY_REQUESTS`` sets how many requests are measured (default 16, after
``CLORA_LIVE_MEMORY_WARMUP`` warm-up requests, default 8; a freshly started Forge moves its RSS by ±150 MiB over its
first generations: give it 50 measured requests, or run the test on a warm server); ``CLORA_LIVE_MEMORY_REPORT`` names a JSON file that receives the series.  The test fails when the
growth of the RSS series exceeds 0.5 MiB per request (the leak this guards against was ~14-25 MiB per request) or
when CUDA memory allocated between requests grows by more than 1 MiB.  The growth is the Theil-Sen slope (the median
of the slopes between all pairs of measurements): Forge's allocator moves the RSS between a few plateaus ~60 MiB
apart during its first requests, which would swing a least-squares slope, while a leak moves every pair.
"""
from __future__ import annotations

import json
import os

from tests.live.webui_api import named_args, skip_without_webui

skip_without_webui()

MIB = 1024 * 1024
WARMUP = int(os.environ.get("CLORA_LIVE_MEMORY_WARMUP", "8"))
SLOPE_LIMIT = 0.5 * MIB  # bytes per request


def _slope(values: list[float]) -> float:
    """Theil-Sen: the median of the slopes between every pair of measurements."""
    slopes = sorted((values[j] - values[i]) / (j - i) for i in range(len(values)) for j in range(i + 1, len(values)))
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2


def _memory(webui) -> tuple[int, int | None]:
    r = webui.get("/sdapi/v1/memory")
    assert r.ok, f"/sdapi/v1/memory answered {r.status}"
    ram = r.body.get("ram", {})
    assert "used" in ram, f"the server cannot report its RSS: {ram}"
    cuda = r.body.get("cuda", {})
    allocated = cuda.get("allocated", {}).get("current") if isinstance(cuda, dict) else None
    return int(ram["used"]), (int(allocated) if allocated is not None else None)


def test_memory_does_not_grow_over_clora_requests(webui, loras):
    count = int(os.environ.get("CLORA_LIVE_MEMORY_REQUESTS", "16"))
    assert count >= 8, "at least 8 measured requests are needed for a slope"
    args = named_args(loras, refine_iters=1, show_previews=True)
    rss, cuda = [], []
    for i in range(WARMUP + count):
        # alternate two seeds and the previews, as a user would, so that any per-request cache shows
        r = webui.generate(args, seed=1000 + i % 2)
        assert r.ok, f"request {i}: {r.status} {r.error_text()}"
        if i >= WARMUP:
            used, allocated = _memory(webui)
            rss.append(used)
            if allocated is not None:
                cuda.append(allocated)
    slope = _slope(rss)
    report = {
        "requests": count, "warmup": WARMUP, "rss_mib": [round(v / MIB, 1) for v in rss],
        "rss_theil_sen_mib_per_request": round(slope / MIB, 3),
        "cuda_allocated_mib": [round(v / MIB, 1) for v in cuda],
    }
    path = os.environ.get("CLORA_LIVE_MEMORY_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))
    assert slope <= SLOPE_LIMIT, (
        f"the server's RSS grows by {slope / MIB:.2f} MiB per CLoRA request over {count} requests: {report['rss_mib']}"
    )
    if cuda:
        assert max(cuda) - cuda[0] <= MIB, f"CUDA memory allocated between requests grows: {report['cuda_allocated_mib']}"
