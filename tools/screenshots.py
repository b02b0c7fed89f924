"""Take the documentation screenshots of the CLoRA extension from a running A1111 WebUI (headless Chromium).

Usage::

    python tools/screenshots.py http://127.0.0.1:7860 [--out docs] [--chromium /usr/bin/chromium]
                                [--option emphasis="No norm"] [--loras kohya,locon]

Writes into ``--out``:

* ``a1111-accordion.png`` — the txt2img tab with the CLoRA accordion open and two bindings filled
  (cat -> first LoRA with trigger word "sks", dog -> second LoRA);
* ``a1111-previews.png`` — the same tab after generating with "Show attention and masks" on (and the mask threshold
  λ at ``--mask-threshold``): the gallery holds the image, the mask overlay and the attention-map grid (selected);
* ``a1111-xyz.png`` — an X/Y/Z plot grid with CLoRA axes ([CLoRA] Step size x [CLoRA] Enabled), made through the
  API (the grid image itself).

It sets up nothing: the WebUI must be running with ``--api``, the extension installed and the two LoRAs present.
``--option KEY=VALUE`` (repeatable; VALUE is JSON, or plain text) sets a WebUI option for the duration of the run and
restores the previous value afterwards; a random tiny test checkpoint needs ``--option emphasis="No norm"`` (its
default emphasis produces NaNs).

Needs the ``playwright`` Python package (``pip install playwright``; no browser download: it drives the Chromium at
``--chromium``), and Pillow only to shrink an image that would exceed ``--max-bytes``.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

PROMPT = "a photo of a cat and a dog, outdoors"
SEED = 1234
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
XYZ_TITLE = "x/y/z plot"
#: Generous limits (seconds): the WebUI may run on a shared CPU.
PAGE_TIMEOUT_MS = 180_000
GENERATE_TIMEOUT_MS = 600_000


# ----- the WebUI's API ---------------------------------------------------------------------------------------------


def api(url: str, path: str, body: Any = None, timeout: float = 600.0) -> Any:
    """GET (``body`` None) or POST JSON to the WebUI; raises RuntimeError with the server's message on an error."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{path} answered {e.code}: {e.read().decode('utf-8', 'replace')[:500]}") from None
    return json.loads(raw) if raw else None


def parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--option wants KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


@contextlib.contextmanager
def webui_options(url: str, options: dict[str, Any]) -> Iterator[None]:
    """Set WebUI options for the duration of the block, then put the previous values back."""
    if not options:
        yield
        return
    current = api(url, "/sdapi/v1/options")
    previous = {k: current.get(k) for k in options}
    api(url, "/sdapi/v1/options", options)
    try:
        yield
    finally:
        api(url, "/sdapi/v1/options", previous)


def two_loras(url: str, wanted: Optional[Sequence[str]]) -> tuple[str, str]:
    names = api(url, "/clora/loras").get("loras") or []
    if wanted:
        missing = [n for n in wanted if n not in names]
        if missing:
            raise SystemExit(f"LoRA {', '.join(missing)} not on the server (it has: {', '.join(names) or 'none'})")
        return wanted[0], wanted[1]
    if len(names) < 2:
        raise SystemExit(f"the server lists fewer than two LoRAs: {names}")
    return names[0], names[1]


def save_png(data: bytes, path: Path, max_bytes: int) -> None:
    """Write PNG bytes; when over ``max_bytes``, re-encode (optimised, then quantised to 256 colours) with Pillow."""
    if len(data) > max_bytes:
        from PIL import Image

        image = Image.open(io.BytesIO(data))
        for attempt in ("optimize", "quantize"):
            if attempt == "quantize":
                image = image.convert("RGB").quantize(colors=256)
            buf = io.BytesIO()
            image.save(buf, format="PNG", optimize=True)
            data = buf.getvalue()
            if len(data) <= max_bytes:
                break
    path.write_bytes(data)
    print(f"wrote {path} ({len(data) // 1024} KiB)")


# ----- the X/Y/Z grid (API) ----------------------------------------------------------------------------------------


def xyz_axis_labels(url: str) -> list[str]:
    """The X/Y/Z plot's axis labels in the order its ``x_type`` index counts them (txt2img)."""
    for script in api(url, "/sdapi/v1/script-info"):
        if script.get("name") == XYZ_TITLE and not script.get("is_img2img"):
            return list(script["args"][0]["choices"])
    raise SystemExit("the server has no X/Y/Z plot script")


def xyz_grid(url: str, loras: tuple[str, str], overrides: dict[str, Any], max_bytes: int, out: Path) -> None:
    labels = xyz_axis_labels(url)
    x_type, y_type = labels.index("[CLoRA] Step size"), labels.index("[CLoRA] Enabled")
    script_args = [
        x_type, "0, 100, 300", [],
        y_type, "", ["True", "False"],
        0, "", [],
        True, False, False, False, False, False, False, 4, False,  # legend, no lone images, no sub grids, margin 4
    ]
    payload = {
        "prompt": PROMPT, "seed": SEED, "width": 192, "height": 192, "steps": 12, "sampler_name": "Euler a",
        "override_settings": overrides, "script_name": XYZ_TITLE, "script_args": script_args,
        "alwayson_scripts": {"clora": {"args": [{
            "enabled": True,
            "bindings": [{"lora": loras[0], "subjects": ["cat"], "triggers": "sks"},
                         {"lora": loras[1], "subjects": ["dog"]}],
            "refine_iters": 4,
        }]}},
    }
    result = api(url, "/sdapi/v1/txt2img", payload)
    save_png(base64.b64decode(result["images"][0]), out, max_bytes)


# ----- the UI (headless Chromium) ---------------------------------------------------------------------------------


def set_number(page, elem_id: str, value: Any) -> None:
    """A gradio slider's number box: type the value and leave the box (gradio reads it on change)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def set_text(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text]").first.fill(value)


def pick(page, elem_id: str, value: str) -> None:
    """Choose ``value`` in a gradio 3 dropdown as a user would (opens the list, clicks the item)."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    item = page.locator(f"#{elem_id} ul.options li[data-value='{value}'], #{elem_id} ul.options li[aria-label='{value}']")
    try:
        item.first.click(timeout=10_000)
    except Exception:  # gradio 4 (Forge): the filtered list's first entry is taken with Enter
        box.press("Enter")


def set_triggers(page, elem_id: str, value: str) -> None:
    """Trigger words: picking a LoRA may pre-fill them from its metadata (a server round trip); let that arrive
    first (up to 15 s; a LoRA without suggestions fills nothing), then type ours over it."""
    box = page.locator(f"#{elem_id} textarea")
    with contextlib.suppress(Exception):
        box.evaluate("(e, ms) => new Promise(ok => { const t0 = Date.now(); const tick = () => "
                     "(e.value || Date.now() - t0 > ms) ? ok() : setTimeout(tick, 100); tick(); })", 15_000)
    box.fill(value)


def fill_txt2img(page, loras: tuple[str, str]) -> None:
    page.locator("#txt2img_prompt textarea").fill(PROMPT)
    with contextlib.suppress(Exception):  # the token counter updates after a debounce; cosmetic only
        page.wait_for_function(
            "() => { const c = gradioApp().querySelector('#txt2img_token_counter');"
            " return c && !c.textContent.trim().startsWith('0/'); }",
            timeout=15_000,
        )
    set_number(page, "txt2img_steps", 12)
    set_number(page, "txt2img_width", 256)
    set_number(page, "txt2img_height", 256)
    page.locator("#txt2img_seed input").fill(str(SEED))
    pick(page, "txt2img_sampling", "Euler a")

    accordion = page.locator("#clora_txt2img_enabled")
    accordion.locator(".label-wrap").first.click()  # opening the accordion enables CLoRA
    page.wait_for_selector("#clora_txt2img_b1_row", state="visible")
    pick(page, "clora_txt2img_b1_lora", loras[0])
    set_text(page, "clora_txt2img_b1_subjects", "cat")
    set_triggers(page, "clora_txt2img_b1_triggers", "sks")
    page.locator("#clora_txt2img_add_binding").click()
    page.wait_for_selector("#clora_txt2img_b2_row", state="visible")
    pick(page, "clora_txt2img_b2_lora", loras[1])
    set_text(page, "clora_txt2img_b2_subjects", "dog")
    set_triggers(page, "clora_txt2img_b2_triggers", "")
    if not page.locator("#clora_txt2img_enabled-visible-checkbox").is_checked():
        raise RuntimeError("the CLoRA accordion is open but its checkbox is not checked")


def shoot_tab(page, path: Path, max_bytes: int) -> None:
    """The txt2img tab (prompt, settings and gallery)."""
    save_png(page.locator("#tab_txt2img").screenshot(), path, max_bytes)


def generate_with_previews(page, mask_threshold: float) -> None:
    """Generate with the previews on.  ``mask_threshold`` is set in the Advanced section first: a random test
    checkpoint's nearly uniform attention is above the default λ = 0.4 everywhere, so its masks would be blank."""
    page.locator("#clora_txt2img_advanced .label-wrap").first.click()
    set_number(page, "clora_txt2img_mask_threshold", mask_threshold)
    page.locator("#clora_txt2img_show_previews input[type=checkbox]").check()
    page.locator("#txt2img_generate").click()
    # Done: the Generate button is back and the gallery has the image plus at least two previews.
    page.wait_for_function(
        """() => {
            const app = gradioApp();
            const busy = app.querySelector('#txt2img_interrupt');
            const running = busy && busy.offsetParent !== null;
            const thumbs = app.querySelectorAll('#txt2img_gallery .thumbnail-item');
            return !running && thumbs.length >= 3;
        }""",
        timeout=GENERATE_TIMEOUT_MS,
    )
    info = page.locator("#html_info_txt2img").last.inner_text()
    if "CLoRA" not in info:
        raise RuntimeError(f"the generation info has no CLoRA entry: {info[:300]!r}")
    page.locator("#txt2img_gallery .thumbnails .thumbnail-item").last.click()  # show the attention-map grid large


def ui_screenshots(
    url: str, chromium: str, loras: tuple[str, str], out_dir: Path, max_bytes: int, mask_threshold: float,
    prefix: str = "a1111", generate: bool = True,
) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="clora-shots-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS),
            viewport={"width": 1400, "height": 1000}, device_scale_factor=1,
        )
        try:
            page = ctx.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(url + "/", wait_until="domcontentloaded")
            page.wait_for_selector("#clora_txt2img_enabled", state="visible")
            fill_txt2img(page, loras)
            shoot_tab(page, out_dir / f"{prefix}-accordion.png", max_bytes)
            if generate:
                generate_with_previews(page, mask_threshold)
                shoot_tab(page, out_dir / f"{prefix}-previews.png", max_bytes)
        finally:
            ctx.close()


# ----- trigger auto-fill, the mask overlay's colour key, an input error (UI) ----------------------------------------


def wait_value(page, elem_id: str, timeout_ms: int = 15_000) -> str:
    """The value of a textbox once the server has filled it in (or "" after ``timeout_ms``)."""
    box = page.locator(f"#{elem_id} textarea")
    with contextlib.suppress(Exception):
        box.evaluate("(e, ms) => new Promise(ok => { const t0 = Date.now(); const tick = () => "
                     "(e.value || Date.now() - t0 > ms) ? ok() : setTimeout(tick, 100); tick(); })", timeout_ms)
    return box.input_value()


def type_subject(page, elem_id: str, value: str) -> None:
    """Type subject words and leave the box (as a user does: the auto-filled triggers are re-checked on leaving)."""
    box = page.locator(f"#{elem_id} textarea")
    box.fill(value)
    box.press("Tab")
    page.wait_for_timeout(1500)  # the server's answer to the blur event (no DOM signal to wait for)


def fill_auto_triggers(page, loras: tuple[str, str]) -> tuple[str, str]:
    """Bind loras[0] -> cat and loras[1] -> dog as a user would (pick the LoRA, then type the subject) and keep the
    trigger words CLoRA fills in.  Returns them."""
    page.locator("#txt2img_prompt textarea").fill(PROMPT)
    set_number(page, "txt2img_steps", 12)
    set_number(page, "txt2img_width", 256)
    set_number(page, "txt2img_height", 256)
    page.locator("#txt2img_seed input").fill(str(SEED))
    pick(page, "txt2img_sampling", "Euler a")
    page.locator("#clora_txt2img_enabled .label-wrap").first.click()
    page.wait_for_selector("#clora_txt2img_b1_row", state="visible")
    pick(page, "clora_txt2img_b1_lora", loras[0])
    wait_value(page, "clora_txt2img_b1_triggers")
    type_subject(page, "clora_txt2img_b1_subjects", "cat")
    page.locator("#clora_txt2img_add_binding").click()
    page.wait_for_selector("#clora_txt2img_b2_row", state="visible")
    pick(page, "clora_txt2img_b2_lora", loras[1])
    wait_value(page, "clora_txt2img_b2_triggers")
    type_subject(page, "clora_txt2img_b2_subjects", "dog")
    return (page.locator("#clora_txt2img_b1_triggers textarea").input_value(),
            page.locator("#clora_txt2img_b2_triggers textarea").input_value())


def ui_issue12_screenshots(url: str, chromium: str, loras: tuple[str, str], out_dir: Path, max_bytes: int,
                           mask_threshold: float, prefix: str = "a1111") -> None:
    """``<prefix>-triggers.png`` (the accordion with both trigger boxes auto-filled), ``<prefix>-mask-key.png``
    (the mask overlay with its colour key, after generating), ``<prefix>-previews.png`` (the attention grid with its
    key) and ``<prefix>-input-error.png`` (a subject word missing from the prompt, as the UI shows it)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="clora-shots-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS),
            viewport={"width": 1400, "height": 1000}, device_scale_factor=1,
        )
        try:
            page = ctx.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(url + "/", wait_until="domcontentloaded")
            page.wait_for_selector("#clora_txt2img_enabled", state="visible")
            triggers = fill_auto_triggers(page, loras)
            print(f"auto-filled trigger words: {triggers}")
            save_png(page.locator("#clora_txt2img_enabled").screenshot(), out_dir / f"{prefix}-triggers.png",
                     max_bytes)
            generate_with_previews(page, mask_threshold)
            shoot_tab(page, out_dir / f"{prefix}-previews.png", max_bytes)
            page.locator("#txt2img_gallery .thumbnails .thumbnail-item").nth(1).click()  # the mask overlay
            page.wait_for_timeout(500)
            save_png(page.locator("#txt2img_gallery").screenshot(), out_dir / f"{prefix}-mask-key.png", max_bytes)

            # an input error: binding 2's subject is not in the prompt
            type_subject(page, "clora_txt2img_b2_subjects", "horse")
            page.locator("#txt2img_generate").click()
            page.wait_for_function(
                "() => { const l = gradioApp().querySelector('#html_log_txt2img');"
                " return l && l.textContent.includes('CLoRA:'); }", timeout=GENERATE_TIMEOUT_MS)
            page.wait_for_function(  # the progress display is gone again
                "() => { const b = gradioApp().querySelector('#txt2img_interrupt');"
                " return !b || b.offsetParent === null; }", timeout=GENERATE_TIMEOUT_MS)
            page.wait_for_timeout(1000)
            print("UI message:", page.locator("#html_log_txt2img").last.inner_text().strip())
            save_png(page.locator("#tab_txt2img").screenshot(), out_dir / f"{prefix}-input-error.png", max_bytes)
        finally:
            ctx.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the running WebUI, e.g. http://127.0.0.1:7860")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable to drive")
    ap.add_argument("--loras", help="two LoRA names, comma separated (default: the first two the server lists)")
    ap.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                    help="WebUI option set for this run only (e.g. emphasis=\"No norm\")")
    ap.add_argument("--max-bytes", type=int, default=1_000_000, help="shrink images above this size")
    ap.add_argument("--mask-threshold", type=float, default=0.85,
                    help="CLoRA's mask threshold λ for the previews screenshot (default 0.85)")
    ap.add_argument("--only", choices=("ui", "xyz", "issue12"),
                    help="take only the UI screenshots, only the grid, or only the trigger/mask-key/input-error ones")
    ap.add_argument("--prefix", default="a1111", help="file name prefix (a1111, forge)")
    ap.add_argument("--no-generate", action="store_true", help="only the accordion, no generation with previews")
    args = ap.parse_args(argv)

    url = args.url.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    loras = two_loras(url, [n.strip() for n in args.loras.split(",")] if args.loras else None)
    options = dict(args.option)
    with webui_options(url, options):
        if args.only in (None, "ui"):
            ui_screenshots(url, args.chromium, loras, args.out, args.max_bytes, args.mask_threshold,
                           prefix=args.prefix, generate=not args.no_generate)
        if args.only == "issue12":
            ui_issue12_screenshots(url, args.chromium, loras, args.out, args.max_bytes, args.mask_threshold,
                                   prefix=args.prefix)
        if args.only in (None, "xyz"):
            xyz_grid(url, loras, options, args.max_bytes, args.out / f"{args.prefix}-xyz.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
