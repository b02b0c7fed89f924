"""Live: prompts of several 75-token chunks (BREAK, long prompts, a trigger that pushes a subject into the next
chunk, a negative prompt with BREAK) with a subject in each chunk, and the guarantee that a CLoRA generation never
returns a black (NaN) image: it is either a real image or a ``CLoRA: ...`` error that says what is not finite."""
from __future__ import annotations

import pytest
from PIL import ImageStat

from tests.live.webui_api import mean_abs_diff, named_args, skip_without_webui

skip_without_webui()

FILLER = " ".join(["red"] * 70)
#: name -> request changes; "cat" sits in the first 75-token chunk and "dog" in the second in every case
CASES = {
    "break": {"prompt": "a photo of a cat BREAK a photo of a dog"},
    "long": {"prompt": f"a photo of a cat {' '.join(['red'] * 80)} and a dog"},
    # "sks" before "cat" pushes the cat variant's prompt over 75 tokens: its chunks differ from the base prompt's
    "trigger-overflow": {"prompt": f"a photo of a cat {FILLER} and a dog"},
    "break-negative": {"prompt": "a photo of a cat BREAK a photo of a dog", "negative_prompt": "ugly BREAK blurry"},
}


def _is_black_or_flat(image) -> bool:
    stat = ImageStat.Stat(image.convert("RGB"))
    return max(stat.extrema[c][1] for c in range(3)) == 0 or max(stat.stddev) < 1.0


@pytest.mark.parametrize("case", list(CASES))
def test_subject_in_each_chunk(webui, loras, case):
    """Under the session's settings (random checkpoints: emphasis 'No norm'), a CLoRA generation of a multi-chunk
    prompt gives a real image, different from the plain one, with the bindings in the infotext."""
    changes = CASES[case]
    plain = webui.generate(None, **changes)
    assert plain.ok, plain.error_text()
    r = webui.generate(named_args(loras, refine_iters=1), **changes)
    assert r.ok, f"{case}: CLoRA generation failed ({r.status}): {r.error_text()}"
    image = r.images()[0]
    assert not _is_black_or_flat(image), f"{case}: CLoRA returned a black/flat image"
    assert mean_abs_diff(image, plain.images()[0]) > 0.5, f"{case}: CLoRA left the image (almost) unchanged"
    text = r.info()["infotexts"][0]
    assert "CLoRA 1 subject: cat" in text and "CLoRA 2 subject: dog" in text


@pytest.mark.parametrize("case", ["break-negative", "trigger-overflow"])
def test_never_a_black_image_under_original_emphasis(webui, loras, case):
    """The 'Original' emphasis divides each chunk by its mean; on a random text encoder a LoRA'd variant can hit a
    mean of exactly 0 (NaN). Whatever happens, the answer is a real image or a clear CLoRA error, never black."""
    r = webui.generate(named_args(loras, refine_iters=1), override_settings={"emphasis": "Original"}, **CASES[case])
    if r.ok:
        assert not _is_black_or_flat(r.images()[0]), f"{case}: a black/flat image was returned"
    else:
        text = r.error_text()
        assert r.status == 422 and text.count("CLoRA: ") == 1 and ("not finite" in text or "non-finite" in text), (
            f"{case}: expected an image or a CLoRA non-finite error, got {r.status}: {text}"
        )
    after = webui.generate(None)  # the server generates normally afterwards
    assert after.ok and not _is_black_or_flat(after.images()[0])
