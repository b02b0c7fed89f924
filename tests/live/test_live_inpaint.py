"""Live: CLoRA in img2img with an inpainting mask (``/sdapi/v1/img2img``).

Forge's denoiser hands the model ``x * nmask + noisy_init * mask`` instead of the sampler's own latent when a mask is
set, so a latent update made on the model's input alone never reaches the sampler.  The decisive check: a mask that
inpaints the whole image is, for the host, the same sampling as plain img2img (same init latent, ``x * 1 + noise * 0``
as the model input), so CLoRA must give the same image with that mask as without a mask — and both must differ from
the same request with step size 0 (no update).  With the update lost (the glue before this test), the masked image
differed from the unmasked one (mean |diff| 2.2/255 on the Forge test host) while still far from the step-size-0 one:
the updated model input changes that step's prediction, so "differs from step size 0" alone does not show that the
sampler got the update.  Then a half mask: the inpainted half changes with the update, the kept half stays the init
image, and the server generates normally afterwards.

Every img2img call here is preceded by a plain txt2img: on this Forge, a plain unmasked img2img gives another image
after a masked img2img than after a txt2img (mean |diff| 0.68/255 at 64x64, also with all extensions disabled), and
the same half-mask request twice in a row gave different images; after a txt2img each request starts from the same host state.
"""
from __future__ import annotations

import pytest
from PIL import Image, ImageChops

from tests.live.webui_api import BASE_PAYLOAD, encode_png, mean_abs_diff, named_args, same_pixels, skip_without_webui

skip_without_webui()

SIDE = BASE_PAYLOAD["width"]
#: Deterministic sampler (no ancestral noise), whole-picture inpainting, hard mask, masked area keeps the init image.
IMG2IMG = dict(sampler_name="Euler", denoising_strength=0.9, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
               inpainting_mask_invert=0, resize_mode=0)


def mask_image(left_fraction: float) -> Image.Image:
    """White (inpaint) on the left ``left_fraction`` of the image, black (keep) elsewhere."""
    mask = Image.new("L", (SIDE, SIDE), 0)
    width = int(round(SIDE * left_fraction))
    if width:
        mask.paste(255, (0, 0, width, SIDE))
    return mask


def crop(image: Image.Image, left: bool) -> Image.Image:
    half = SIDE // 2
    return image.convert("RGB").crop((0, 0, half, SIDE) if left else (half, 0, SIDE, SIDE))


@pytest.fixture(scope="module")
def img2img(webui, reference):
    """POST /sdapi/v1/img2img of `BASE_PAYLOAD` with the plain reference image as init image."""
    init = encode_png(reference.convert("RGB"))

    def run(clora=None, mask: Image.Image | None = None):
        reset = webui.generate()  # the same host state before every request (see the module docstring)
        assert reset.ok, reset.error_text()
        payload = webui.payload(**IMG2IMG, init_images=[init])
        if mask is not None:
            payload["mask"] = encode_png(mask)
        if clora is not None:
            payload["alwayson_scripts"] = {"clora": {"args": list(clora)}}
        r = webui.post("/sdapi/v1/img2img", payload)
        assert r.ok, f"img2img failed ({r.status}): {r.error_text()}"
        return r

    return run


def test_full_mask_inpainting_gets_the_latent_update(img2img, loras):
    full = mask_image(1.0)
    plain, plain_masked = img2img(), img2img(mask=full)
    if not same_pixels(plain.images()[0], plain_masked.images()[0]):
        pytest.fail("precondition: without CLoRA, a whole-image mask gave another image than plain img2img "
                    f"(mean |diff| {mean_abs_diff(plain.images()[0], plain_masked.images()[0]):.3f})")
    args, no_update = named_args(loras), named_args(loras, step_size=0.0)
    unmasked = img2img(args).images()[0]
    masked_r = img2img(args, mask=full)
    masked = masked_r.images()[0]
    masked_no_update = img2img(no_update, mask=full).images()[0]
    d_update = mean_abs_diff(masked, masked_no_update)
    d_same = mean_abs_diff(masked, unmasked)
    print(f"\nwhole-image mask: |CLoRA - CLoRA step 0| = {d_update:.3f}, |masked - unmasked CLoRA| = {d_same:.3f}, "
          f"|unmasked CLoRA - step 0| = {mean_abs_diff(unmasked, masked_no_update):.3f}")
    assert d_update > 0.5, "the latent update changed nothing in the masked run"
    assert same_pixels(masked, unmasked), (
        f"with a whole-image mask CLoRA must give the plain-img2img CLoRA image (mean |diff| {d_same:.3f}; "
        f"vs step size 0: {d_update:.3f}): the latent update did not reach the sampler's latent")
    assert "CLoRA: True" in masked_r.info()["infotexts"][0]


def test_half_mask_changes_only_the_inpainted_half(img2img, loras, reference):
    half = mask_image(0.5)
    plain = img2img(mask=half).images()[0]
    clora = img2img(named_args(loras), mask=half).images()[0]
    no_update = img2img(named_args(loras, step_size=0.0), mask=half).images()[0]
    inside = mean_abs_diff(crop(clora, True), crop(no_update, True))
    print(f"\nhalf mask: inpainted half |CLoRA - CLoRA step 0| = {inside:.3f}")
    assert inside > 0.5, "the latent update changed nothing in the inpainted half"
    for image in (clora, no_update):
        assert ImageChops.difference(crop(image, False), crop(plain, False)).getbbox() is None, \
            "the kept half must stay as in the plain inpainting run"
        assert ImageChops.difference(crop(image, False), crop(reference, False)).getbbox() is None


def test_server_generates_normally_afterwards(webui, img2img, reference):
    r = webui.generate()
    assert r.ok, r.error_text()
    assert same_pixels(r.images()[0], reference), "a CLoRA inpainting run changed the next plain generation"
    assert "CLoRA" not in r.info()["infotexts"][0]
    plain1, plain2 = img2img(mask=mask_image(0.5)), img2img(mask=mask_image(0.5))
    assert same_pixels(plain1.images()[0], plain2.images()[0])
    assert "CLoRA" not in plain2.info()["infotexts"][0]
