"""The offline tokenizer, the generated fixtures, the CI script's test command and install.py."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import models
from tools import make_fixtures
from tools.clip_vocab import VOCAB_SIZE, bytes_to_unicode

# Ids of openai/clip-vit-large-patch14's own tokenizer for this prompt (BOS ... EOS), from the CLoRA CI notes.
OPENAI_IDS = [49406, 320, 1125, 539, 320, 2368, 537, 320, 1929, 49407]
PROMPTS = [
    "a photo of a cat and a dog",
    "A cat, wearing sunglasses!! on the beach at sunset (masterpiece:1.2)",
    "portrait of <lora:foo> woman in a red-dress, 8k, highly detailed",
    "mountains and lakes; don't stop 1234567 === ok",
]


def _simple_tokenizer():
    """clip-anytorch's own BPE tokenizer (CLIP's reference implementation), an independent reference."""
    from clip.simple_tokenizer import SimpleTokenizer

    return SimpleTokenizer()


# ----- tokenizer ------------------------------------------------------------------------------------------------------
def test_tokenizer_gives_openai_ids():
    tok = models.clip_tokenizer()
    assert tok("a photo of a cat and a dog").input_ids == OPENAI_IDS
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77


def test_tokenizer_pads_and_truncates_like_sd1():
    tok = models.clip_tokenizer()
    ids = tok(["a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {49407}
    long_ids = tok(" ".join(["cat"] * 100), truncation=True, max_length=77).input_ids
    assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407


def test_vocab_equals_reference_tokenizer_vocab():
    vocab = json.loads((models.fixtures_dir() / "clip-tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    reference = _simple_tokenizer()
    assert len(vocab) == VOCAB_SIZE
    assert vocab == reference.encoder


def test_byte_table_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_reference_tokenizer(prompt):
    tok = models.clip_tokenizer()
    expected = [49406] + _simple_tokenizer().encode(prompt) + [49407]
    assert tok(prompt).input_ids == expected


# ----- tiny CLIP folder -----------------------------------------------------------------------------------------------
def test_tiny_clip_folder_works_as_frozen_clip_embedder():
    models._ensure_torchvision()
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    embedder = FrozenCLIPEmbedder(version=str(models.fixtures_dir() / "tiny-clip"), device="cpu")
    reference = models.make_tiny_clip(0)
    prompts = ["a photo of a cat", "a dog"]
    with torch.no_grad():
        z = embedder(prompts)
        tokens = models.clip_tokenizer()(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        expected = reference(input_ids=tokens).last_hidden_state
    assert z.shape == (2, 77, 64)
    torch.testing.assert_close(z, expected, rtol=0, atol=0)
    assert not torch.allclose(z[0], z[1])


# ----- tiny SD1 checkpoint --------------------------------------------------------------------------------------------
def _load_tiny_sd1():
    d = models.fixtures_dir()
    return make_fixtures.load_tiny_sd1(d / "tiny-sd1.yaml", d / "tiny-sd1.safetensors")


def test_tiny_sd1_checkpoint_layout():
    state = load_file(str(models.fixtures_dir() / "tiny-sd1.safetensors"))
    prefixes = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."}
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in state), prefix
    assert "model.diffusion_model.out.2.weight" in state
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    assert state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 64)
    assert "alphas_cumprod" in state and state["alphas_cumprod"].shape == (1000,)
    # No layer left at ldm's zero initialisation (outputs would not depend on the prompt / the latent).
    for name, tensor in state.items():
        if name.endswith(".weight") and tensor.dim() >= 2:
            assert torch.count_nonzero(tensor) > 0, name


def test_tiny_sd1_loads_strictly_and_matches_the_model_builders():
    model = _load_tiny_sd1()
    unet_ref = models.make_tiny_unet(0).state_dict()
    unet = model.model.diffusion_model.state_dict()
    assert unet.keys() == unet_ref.keys()
    for name in unet_ref:
        assert torch.equal(unet[name], unet_ref[name]), name
    clip_ref = models.make_tiny_clip(0).state_dict()
    clip = model.cond_stage_model.transformer.state_dict()
    for name in clip_ref:
        assert torch.equal(clip[name], clip_ref[name]), name
    # DDPM schedule of SD1: scaled-linear betas from 0.00085 to 0.012 over 1000 steps.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(model.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)


def test_tiny_sd1_samples_with_k_diffusion_and_decodes():
    import k_diffusion as K

    model = _load_tiny_sd1()
    denoiser = K.external.CompVisDenoiser(model)
    sigmas = denoiser.get_sigmas(4)
    images = []
    with torch.no_grad():
        for prompt in ("a photo of a cat", "a red car on a road"):
            cond = model.get_learned_conditioning([prompt])
            assert cond.shape == (1, 77, 64)
            noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
            extra = {"cond": cond}
            latent = K.sampling.sample_euler(denoiser, noise * sigmas[0], sigmas, extra_args=extra, disable=True)
            assert latent.shape == (1, 4, 32, 32) and torch.isfinite(latent).all()
            image = model.decode_first_stage(latent)
            assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()
            assert image.std() > 0
            images.append(image)
    # Same noise, different prompt: the cross-attention path must carry the prompt to the image.
    assert not torch.allclose(images[0], images[1])


# ----- determinism ----------------------------------------------------------------------------------------------------
def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _generated_files(folder: Path) -> list[Path]:
    """Relative paths of the generated files (not the lock, marker and stamp files)."""
    return sorted(
        p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and not p.name.startswith((".", "STAMP"))
    )


def test_generation_is_deterministic_and_stamped(tmp_path, monkeypatch):
    reference = models.fixtures_dir()
    fresh = tmp_path / "fixtures"
    monkeypatch.setenv(models.FIXTURES_ENV, str(fresh))
    assert models.fixtures_dir.__wrapped__() == fresh.resolve()  # uncached: generates into the new folder
    assert (fresh / "STAMP").read_text().strip() == models.fixtures_stamp()
    ckpt_mtime = (fresh / "tiny-sd1.safetensors").stat().st_mtime_ns
    models.fixtures_dir.__wrapped__()  # up to date: nothing regenerated
    assert (fresh / "tiny-sd1.safetensors").stat().st_mtime_ns == ckpt_mtime
    new_files = _generated_files(fresh)
    assert _generated_files(reference) == new_files
    assert Path("tiny-sd1.safetensors") in new_files and Path("tiny-clip/model.safetensors") in new_files
    for rel in new_files:
        if rel.suffix == ".safetensors":
            a, b = _tensors(reference / rel), _tensors(fresh / rel)
            assert a.keys() == b.keys(), rel
            for name in a:
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{rel}: {name}"
        elif rel.name == "tiny-sd1.yaml":  # holds the absolute path of its tiny-clip folder
            a_text = (reference / rel).read_text().replace(str(reference), "<DIR>")
            b_text = (fresh / rel).read_text().replace(str(fresh.resolve()), "<DIR>")
            assert a_text == b_text
        else:
            assert (reference / rel).read_bytes() == (fresh / rel).read_bytes(), rel


def test_tiny_unet_cross_attention_is_word_specific():
    """The fixture UNet's cross-attention is peaked (not ~1/77 everywhere) and differs between two words."""
    unet = models.make_tiny_unet(0)
    clip = models.make_tiny_clip(0)
    tokens = models.clip_tokenizer()(["a photo of a cat and a dog"], padding="max_length", max_length=77,
                                     return_tensors="pt").input_ids
    maps: list[torch.Tensor] = []

    def capture(layer, args, kwargs, _out):
        x, context = args[0], kwargs.get("context", args[1] if len(args) > 1 else None)
        q, k = layer.to_q(x), layer.to_k(context)
        b, n, inner = q.shape
        d = inner // layer.heads
        q = q.view(b, n, layer.heads, d).transpose(1, 2)
        k = k.view(b, k.shape[1], layer.heads, d).transpose(1, 2)
        maps.append(torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1).mean(1)[0])  # pixels x tokens

    layers = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    handles = [m.register_forward_hook(capture, with_kwargs=True) for m in layers]
    with torch.no_grad():
        context = clip(input_ids=tokens).last_hidden_state
        noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        unet(noise, torch.tensor([500]), context=context)
    for h in handles:
        h.remove()
    assert len(maps) == 16  # as in SD1.5: 6 down, 1 middle, 9 up
    uniform = 1 / 77
    peak = torch.stack([m.max(dim=-1).values.mean() for m in maps]).mean()
    assert peak > 5 * uniform, f"mean per-pixel peak probability {peak:.4f} is close to uniform ({uniform:.4f})"
    cat, dog = 5, 8  # BOS a photo of a cat and a dog
    assert tokens[0, cat] == 2368 and tokens[0, dog] == 1929
    corr = torch.stack([torch.corrcoef(torch.stack([m[:, cat], m[:, dog]]))[0, 1] for m in maps]).mean()
    assert corr < 0.8, f"the maps of 'cat' and 'dog' are nearly the same (mean correlation {corr:.3f})"


def test_other_seed_gives_other_weights():
    a, b = models.make_tiny_unet(0).state_dict(), models.make_tiny_unet(1).state_dict()
    assert not torch.equal(a["out.2.weight"], b["out.2.weight"])
    assert not torch.equal(a["input_blocks.1.1.proj_out.weight"], b["input_blocks.1.1.proj_out.weight"])


def test_lora_fixtures_present():
    loras = models.fixtures_dir() / "loras"
    files = [p for p in loras.rglob("*") if p.is_file()]
    assert files, f"no LoRA files in {loras}"


def test_fixtures_dir_refuses_to_delete_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="not generated by"):
        models._clear_fixtures(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    # Once marked as generated, an outdated folder is emptied except for its lock file.
    (tmp_path / ".clora-fixtures").write_text("")
    (tmp_path / ".lock").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("x")
    models._clear_fixtures(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


# ----- CI script and install.py ---------------------------------------------------------------------------------------
def test_ci_runs_the_readme_test_command():
    root = models.ROOT
    out = subprocess.run(
        ["bash", str(root / ".ci" / "run"), "--print-test-command"], capture_output=True, text=True, check=True
    ).stdout.strip()
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    assert out in block.splitlines()
    assert out.startswith("python -m pytest tests")


def _load_install_module():
    spec = importlib.util.spec_from_file_location("clora_install_script", models.ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_script_installs_nothing_and_reports_missing(monkeypatch, capsys):
    install = _load_install_module()
    assert install.missing_modules(["safetensors", "clora_no_such_module_xyz"]) == ["clora_no_such_module_xyz"]
    monkeypatch.setattr(install, "REQUIRED_MODULES", ("torch", "clora_no_such_module_xyz"))
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(args=types.SimpleNamespace(skip_install=False)))
    assert install.main() == 0
    assert "clora_no_such_module_xyz" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "launch", types.SimpleNamespace(args=types.SimpleNamespace(skip_install=True)))
    assert install.main() == 0
    assert capsys.readouterr().out == ""
