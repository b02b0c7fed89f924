"""WebUI glue without a WebUI: only the few host attributes the glue touches are faked (a ``p`` object, the Lora
extension's ``networks`` module, ``modules.sd_samplers_cfg_denoiser.CFGDenoiser``, ``modules.prompt_parser``'s
schedule function, ``modules.shared.cmd_opts``, a tokenizer with ``tokenize_line``/``tokenize``)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clora.hosts import HostDetection, detect
from clora.hosts import webui as glue
from clora.hosts.a1111 import A1111Host, A1111Run, find_lora_file, list_loras
from clora.hosts.common import CloraError, strip_lora_tags
from clora.lora.types import LoraError
from clora.settings import Binding, CloraSettings
from clora.ui import ARG_NAMES, settings_to_args

ROOT = Path(__file__).resolve().parent.parent


# ----- fakes -----------------------------------------------------------------------------------------------------


def fake_module(monkeypatch, name: str, package: bool = False, **attrs) -> types.ModuleType:
    """Put a module into sys.modules (and onto its parent) for this test only."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    parent, _, child = name.rpartition(".")
    if parent:
        monkeypatch.setattr(sys.modules[parent], child, mod, raising=False)
    return mod


def fake_modules_package(monkeypatch) -> types.ModuleType:
    return fake_module(monkeypatch, "modules", package=True)


class FakeP:
    """The processing object: only what the glue reads and writes (``is_api``: set by the WebUI's API)."""

    def __init__(self, prompt="a cat and a dog", steps=4, is_api=False):
        self.prompt = prompt
        self.prompts = [prompt]
        self.steps = steps
        self.extra_generation_params = {}
        self.comments = {}
        if is_api:
            self.is_api = True

    def comment(self, text):
        self.comments[text] = 1

    def sample(self, *args, **kwargs):
        return "sampled"


class WordClip:
    """A word-level stand-in for A1111's FrozenCLIPEmbedderWithCustomWords (tokenize_line / tokenize)."""

    id_start, id_end = 1, 2

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _ids(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.lower().replace(",", " , ").split()]

    def tokenize(self, texts):
        return [self._ids(t) for t in texts]

    def tokenize_line(self, line):
        ids = self._ids(line)
        tokens = [self.id_start] + ids + [self.id_end] * (76 - len(ids))
        return [SimpleNamespace(tokens=tokens, multipliers=[1.0] * 77)], len(ids)


def fake_sd_model():
    return SimpleNamespace(is_sdxl=False, is_sd2=False, is_sd1=True, cond_stage_model=WordClip(),
                           model=SimpleNamespace(conditioning_key="crossattn"))


def install_prepare_fakes(monkeypatch):
    """The host modules A1111Run.prepare touches before it looks at the prompt."""
    fake_modules_package(monkeypatch)
    fake_module(monkeypatch, "modules.shared", cmd_opts=SimpleNamespace(lowvram=False, medvram=False))
    fake_module(monkeypatch, "modules.prompt_parser",
                get_learned_conditioning_prompt_schedules=lambda prompts, steps: [[[steps, p]] for p in prompts])


def args_for(settings: CloraSettings) -> list:
    return settings_to_args(settings)


CAT_DOG = CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)), Binding("dog_v1", ("dog",))))


# ----- strip_lora_tags -------------------------------------------------------------------------------------------


def test_strip_lora_tags_removes_only_bound_loras():
    prompt = "a <lora:Cat_V1:0.8> cat and a dog <lyco:dog_v1:1:0.5> <lora:style_ink> <lora:cat_v10:1>"
    new, removed = strip_lora_tags(prompt, ["cat_v1", "DOG_V1"])
    assert new == "a  cat and a dog  <lora:style_ink> <lora:cat_v10:1>"
    assert removed == ["<lora:Cat_V1:0.8>", "<lyco:dog_v1:1:0.5>"]
    assert strip_lora_tags("no tags here", ["cat_v1"]) == ("no tags here", [])


def test_before_process_batch_strips_bound_tags_and_notes_it():
    p = FakeP("a <lora:cat_v1:1> cat and a <lora:other:0.5> dog")
    A1111Host().before_process_batch(p, CAT_DOG)
    assert p.prompts == ["a  cat and a <lora:other:0.5> dog"]
    assert p.extra_generation_params["CLoRA note"].endswith("<lora:cat_v1:1>")


# ----- LoRA listing through the Lora extension's networks module --------------------------------------------------


def test_lora_listing_and_lookup(monkeypatch, tmp_path):
    on_disk = {"b_lora": SimpleNamespace(filename=str(tmp_path / "b_lora.safetensors")),
               "A_lora": SimpleNamespace(filename=str(tmp_path / "A_lora.safetensors"))}
    refreshed = []
    net = fake_module(monkeypatch, "networks", available_networks=dict(on_disk),
                      available_network_aliases={"alias_b": on_disk["b_lora"]},
                      list_available_networks=lambda: refreshed.append(True))
    assert list_loras() == ["A_lora", "b_lora"]
    assert find_lora_file("alias_b") == Path(on_disk["b_lora"].filename)
    assert find_lora_file("A_lora") == Path(on_disk["A_lora"].filename)
    with pytest.raises(LoraError, match="'missing'"):
        find_lora_file("missing")
    assert refreshed == [True]  # one refresh of the folder before giving up
    assert A1111Host().trigger_words("missing") == []
    assert A1111Host().lora_names() == ["A_lora", "b_lora"]
    assert net.available_networks == on_disk


def test_lora_listing_without_the_lora_extension(monkeypatch):
    monkeypatch.delitem(sys.modules, "networks", raising=False)
    assert list_loras() == []
    with pytest.raises(LoraError, match="Lora extension is not loaded"):
        find_lora_file("x")


# ----- A1111Run.sample patches CFGDenoiser.forward and always restores it -------------------------------------------


@pytest.fixture
def cfg_denoiser(monkeypatch):
    class CFGDenoiser:
        def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
            return "host"

    fake_modules_package(monkeypatch)
    fake_module(monkeypatch, "modules.sd_samplers_cfg_denoiser", CFGDenoiser=CFGDenoiser)
    return CFGDenoiser


def make_run(monkeypatch, calls):
    run = A1111Run(p=FakeP(), settings=CAT_DOG)
    monkeypatch.setattr(run, "encode_variants", lambda steps: calls.append(("encode", steps)), raising=False)
    monkeypatch.setattr(run, "forward", lambda denoiser, original, *a: calls.append(("forward", original)) or "clora",
                        raising=False)
    return run


def test_sample_patches_forward_during_sampling_and_restores_it(monkeypatch, cfg_denoiser):
    original = cfg_denoiser.__dict__["forward"]
    calls = []
    run = make_run(monkeypatch, calls)

    def host_sample(*args, **kwargs):
        assert cfg_denoiser.__dict__["forward"] is not original
        assert cfg_denoiser().forward(0, 0, 0, 0, 7.0, 0, None) == "clora"
        return ("done", args, kwargs)

    assert run.sample(host_sample, 1, k=2) == ("done", (1,), {"k": 2})
    assert cfg_denoiser.__dict__["forward"] is original
    assert calls == [("encode", 4), ("forward", original)]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_sample_restores_forward_on_error_and_interrupt(monkeypatch, cfg_denoiser, exc_type):
    original = cfg_denoiser.__dict__["forward"]
    run = make_run(monkeypatch, [])

    def host_sample():
        assert cfg_denoiser.__dict__["forward"] is not original
        raise exc_type("stop")

    with pytest.raises(exc_type):
        run.sample(host_sample)
    assert cfg_denoiser.__dict__["forward"] is original
    assert cfg_denoiser().forward(0, 0, 0, 0, 7.0, 0, None) == "host"


def test_sample_with_a_prepared_error_raises_before_touching_the_host(monkeypatch, cfg_denoiser):
    original = cfg_denoiser.__dict__["forward"]
    run = A1111Run(p=FakeP(), settings=CAT_DOG, error=ValueError("something wrong"))
    with pytest.raises(CloraError, match=r"^CLoRA: Something wrong$"):
        run.sample(lambda: pytest.fail("the host's sampling must not run"))
    assert cfg_denoiser.__dict__["forward"] is original


# ----- the error path: a subject word missing from the prompt ------------------------------------------------------


def one_console_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_word_in_the_ui_stops_before_sampling_with_one_console_line(monkeypatch, capsys):
    install_prepare_fakes(monkeypatch)
    host = A1111Host()
    p = FakeP("a cat on a sofa")
    p.sd_model = fake_sd_model()
    settings = CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)), Binding("horse_v1", ("horse",))))

    glue.on_process(p, args_for(settings), host)
    assert p.extra_generation_params["CLoRA 2 subject"] == "horse"
    glue.on_before_process_batch(p, host)
    # the WebUI's batch loop stops on an empty prompt list (before extra networks, process_batch and sampling)
    assert p.prompts == []
    line = one_console_line(capsys)
    assert line.startswith("CLoRA: 'horse' (LoRA 'horse_v1') is not in the prompt")
    assert list(p.comments) == [line]  # shown under the gallery
    # the check ran on a copy: nothing of the host's preparation is left on p
    assert "sample" not in p.__dict__ and host.run_of(p) is None and p.sample() == "sampled"


def test_missing_word_through_the_api_is_a_422_error(monkeypatch, capsys):
    from fastapi import HTTPException

    install_prepare_fakes(monkeypatch)
    host = A1111Host()
    p = FakeP("a cat on a sofa", is_api=True)
    p.sd_model = fake_sd_model()
    settings = CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)), Binding("horse_v1", ("horse",))))

    glue.on_process(p, args_for(settings), host)
    glue.on_before_process_batch(p, host)
    assert p.prompts == ["a cat on a sofa"]  # the API reports through p.sample
    glue.on_process_batch(p, host)
    assert glue.state_of(p).error is None  # the host keeps the problem in its run and raises it at sampling
    with pytest.raises(CloraError, match="'horse'.*not in the prompt") as e:
        p.sample(conditioning=None)
    # FastAPI's HTTPException: both hosts answer it with its status and no traceback
    assert isinstance(e.value, HTTPException) and e.value.status_code == 422
    assert e.value.detail == str(e.value) and str(e.value).startswith("CLoRA: 'horse'")
    assert type(e.value).__name__ == "CloraError" and e.value.__cause__ is None
    assert one_console_line(capsys) == str(e.value)
    glue.on_postprocess_batch(p, host)
    assert p.sample() == "sampled"  # the per-p replacements are gone; the class method is back in effect


def test_dropped_modules_reach_the_console_and_the_infotext(monkeypatch, tmp_path, caplog):
    """A bound LoRA with a module the model lacks and a tensor of an unsupported type still runs (it is above the
    90 % rule), but not quietly: one warning on the console and a count in the infotext."""
    import logging

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tests.models import make_tiny_clip, make_tiny_unet
    from tools import lora_writer as lw

    install_prepare_fakes(monkeypatch)
    unet, text = make_tiny_unet(), make_tiny_clip()
    paths = {n: lw.write_kohya(tmp_path / f"{n}.safetensors", unet, text, seed=i)
             for i, n in enumerate(("cat_v1", "dog_v1"))}
    with safe_open(str(paths["cat_v1"]), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    n_modules = sum(k.endswith(".lora_down.weight") for k in tensors) + 1
    tensors.update({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32),  # no such layer
                    "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.ones(32, 2),
                    "lora_unet_conv_in.on_input": torch.ones(4)})  # IA3: not supported
    save_file(tensors, str(paths["cat_v1"]), metadata=meta)

    class Run(A1111Run):
        def model_family(self):
            return "sd1"

        def check_gradients(self):
            pass

        def unet_module(self):
            return unet

        def text_module(self):
            return text

        def lora_file(self, name):
            return paths[name]

    p = FakeP("a cat and a dog")
    p.sd_model = fake_sd_model()
    run = Run(p=p, settings=CAT_DOG)
    with caplog.at_level(logging.WARNING, logger="clora"):
        run.prepare()
    assert run.error is None
    assert p.extra_generation_params["CLoRA dropped modules"] == (
        f"LoRA 'cat_v1': 1 of {n_modules} modules do not fit this model and are not applied; "
        "1 tensors of unsupported or incomplete modules are ignored.")
    [record] = caplog.records
    assert record.getMessage().startswith(
        f"CLoRA: LoRA 'cat_v1': 1 of {n_modules} modules do not fit this model and are not applied (e.g. "
        "lora_unet_down_blocks_7_attentions_0_proj_in: no such module in this model); 1 tensors of unsupported or "
        "incomplete modules are ignored (e.g. lora_unet_conv_in.on_input).")


def test_settings_error(capsys):
    a = args_for(CloraSettings())
    a[ARG_NAMES.index("enabled")] = True
    a[ARG_NAMES.index("b1_lora")] = "cat_v1"  # no subject word
    host = A1111Host()
    for api in (False, True):
        p = FakeP(is_api=api)
        state = glue.on_process(p, a, host)
        assert state.settings is None and "no subject word" in str(state.error)
        assert p.extra_generation_params == {}
        glue.on_before_process_batch(p, host)
        if not api:
            assert p.prompts == [] and one_console_line(capsys).startswith("CLoRA: Binding 1 (LoRA 'cat_v1')")
            continue
        glue.on_process_batch(p, host)
        with pytest.raises(CloraError, match=r"^CLoRA: Binding 1 \(LoRA 'cat_v1'\): no subject word") as e:
            p.sample()
        assert e.value.status_code == 422


def test_switched_on_with_nothing_chosen_generates_without_clora(capsys):
    """Opening the accordion ticks CLoRA on (the WebUI's InputAccordion); with no LoRA chosen that means off."""
    a = args_for(CloraSettings())
    a[ARG_NAMES.index("enabled")] = True
    for form in (a, [{"enabled": True}], [{"enabled": True, "bindings": []}]):
        p = FakeP()
        assert glue.on_process(p, form, A1111Host()) is None
        assert p.extra_generation_params == {"CLoRA note": glue.NOTHING_CHOSEN_NOTE}
        assert one_console_line(capsys) == "CLoRA: It is switched on, but no LoRA is chosen: generating without CLoRA."
        glue.on_before_process_batch(p, A1111Host())
        glue.on_process_batch(p, A1111Host())
        assert p.prompts == [p.prompt] and p.sample() == "sampled"
    # pasting that infotext restores CLoRA off
    from clora.ui import paste_value

    assert paste_value("enabled", {"CLoRA note": glue.NOTHING_CHOSEN_NOTE}) is False
    # a row that is only half filled is a mistake to report, not "nothing chosen"
    a[ARG_NAMES.index("b1_subjects")] = "cat"
    p = FakeP()
    state = glue.on_process(p, a, A1111Host())
    assert state is not None and "LoRA" in str(state.error)
    # a style LoRA alone is chosen too (and refused: no binding)
    p = FakeP()
    assert glue.on_process(p, [{"enabled": True, "styles": [{"lora": "ink"}]}], A1111Host()).error is not None


def test_hires_prompt_of_its_own_is_noted_in_the_infotext():
    for hr_prompt, noted in (("a cat and a dog", False), ("", False), ("a painting of a cat and a dog", True)):
        p = FakeP()
        p.enable_hr, p.hr_prompt = True, hr_prompt
        glue.on_process(p, args_for(CAT_DOG), A1111Host())
        assert (p.extra_generation_params.get("CLoRA hires") == glue.HIRES_NOTE) is noted
        assert p.extra_generation_params["CLoRA 1 LoRA"] == "cat_v1"
    p = FakeP()
    p.enable_hr, p.hr_prompt = False, "something else"
    glue.on_process(p, args_for(CAT_DOG), A1111Host())
    assert "CLoRA hires" not in p.extra_generation_params


class _SampleFails:
    """A host whose sampling raises ``error`` (as a bug or a host exception would, from inside the sampler)."""

    def __init__(self, error):
        self.error = error

    def before_process_batch(self, p, settings):
        pass

    def process_batch(self, p, settings):
        def sample(*args, **kwargs):
            raise self.error

        p.sample = sample

    def postprocess_batch(self, p):
        p.__dict__.pop("sample", None)

    def run_of(self, p):
        return None


def _sample_error(error, api):
    p = FakeP(is_api=api)
    host = _SampleFails(error)
    glue.on_process(p, args_for(CAT_DOG), host)
    glue.on_before_process_batch(p, host)
    glue.on_process_batch(p, host)
    with pytest.raises(BaseException) as e:
        p.sample()
    return e.value


@pytest.mark.parametrize("api", [False, True])
def test_an_internal_error_while_sampling_becomes_a_bug_report(api):
    original = RuntimeError("No cross-attention maps were captured at 3x4; did a UNet pass run inside the capture?")
    raised = _sample_error(original, api)
    shown = f"{type(raised).__name__}: {raised}"  # how the WebUI's UI shows an exception
    message = shown if not api else str(raised)
    assert message.startswith("CLoRA: Unexpected error while generating (RuntimeError: No cross-attention maps")
    assert message.count("CLoRA:") == 1 and "/issues" in message and "console output" in message
    assert raised.__cause__ is original  # its traceback stays in the console
    assert getattr(raised, "status_code", 500) == 500  # a bug is not the request's fault


def test_a_users_mistake_found_while_sampling_reads_with_one_prefix_in_the_ui():
    raised = _sample_error(CloraError("AND-composed prompts are not supported."), api=False)
    assert f"{type(raised).__name__}: {raised}" == "CLoRA: AND-composed prompts are not supported."
    assert isinstance(raised, CloraError) and raised.message == "CLoRA: AND-composed prompts are not supported."
    raised = _sample_error(CloraError("AND-composed prompts are not supported."), api=True)
    assert str(raised) == "CLoRA: AND-composed prompts are not supported." and raised.status_code == 422


def test_the_webuis_own_exceptions_pass_through_unchanged():
    interrupted = type("InterruptedException", (BaseException,), {"__module__": "modules.sd_samplers_common"})()
    nans = type("NansException", (Exception,), {"__module__": "modules.devices"})("A tensor with all NaNs")
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory")
    for error in (interrupted, nans, oom):
        assert _sample_error(error, api=False) is error


def test_disabled_does_nothing():
    p = FakeP()
    assert glue.on_process(p, args_for(CAT_DOG.__class__()), A1111Host()) is None
    glue.on_before_process_batch(p, A1111Host())
    glue.on_process_batch(p, A1111Host())
    assert p.extra_generation_params == {} and p.sample() == "sampled" and p.prompts == [p.prompt]


class RecordingHost:
    def __init__(self, fail_in=None):
        self.calls = []
        self.fail_in = fail_in

    def _call(self, name, *args):
        self.calls.append(name)
        if name == self.fail_in:
            raise AttributeError("'NoneType' object has no attribute 'cond_stage_model'")

    def before_process_batch(self, p, settings):
        self._call("before_process_batch")

    def process_batch(self, p, settings):
        self._call("process_batch")

    def postprocess_batch(self, p):
        self._call("postprocess_batch")

    def run_of(self, p):
        return None

    def lora_names(self):
        return ["cat_v1"]


@pytest.mark.parametrize("fail_in", ["before_process_batch", "process_batch"])
def test_unexpected_host_failure_reaches_the_user_as_a_bug_report(fail_in):
    p, host = FakeP(), RecordingHost(fail_in)
    glue.on_process(p, args_for(CAT_DOG), host)
    glue.on_before_process_batch(p, host)
    assert p.prompts == [p.prompt]  # a bug is not stopped quietly: it is raised, with its traceback
    glue.on_process_batch(p, host)
    with pytest.raises(CloraError, match="cond_stage_model") as e:
        p.sample()
    shown = f"{type(e.value).__name__}: {e.value}"
    doing = "preparing the prompts" if fail_in == "before_process_batch" else "preparing this batch"
    assert shown.startswith(f"CLoRA: Unexpected error while {doing} (AttributeError: ")
    assert "/issues" in shown and isinstance(e.value.__cause__, AttributeError)


def test_unavailable_host_reaches_the_user(capsys):
    p = FakeP()
    glue.on_process(p, args_for(CAT_DOG), None, "Forge is not supported yet.")
    assert p.extra_generation_params["CLoRA"] is True
    glue.on_before_process_batch(p, None)
    assert p.prompts == [] and one_console_line(capsys) == "CLoRA: Forge is not supported yet."
    p = FakeP(is_api=True)
    glue.on_process(p, args_for(CAT_DOG), None, "Forge is not supported yet.")
    glue.on_before_process_batch(p, None)
    glue.on_process_batch(p, None)
    with pytest.raises(CloraError, match=r"^CLoRA: Forge is not supported yet\.$"):
        p.sample()


# ----- X/Y/Z plot --------------------------------------------------------------------------------------------------


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.choices = label, type, apply, choices


def test_xyz_axes_registered_once_and_override_per_cell():
    xyz = SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Seed", int, None)])
    other = SimpleNamespace(script_class=type("Other", (), {"__module__": "other.py"}), module=None)
    entry = SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=xyz)
    assert glue.register_xyz_axes([other]) is False
    assert glue.register_xyz_axes([other, entry]) is True
    assert glue.register_xyz_axes([other, entry]) is True
    labels = [o.label for o in xyz.axis_options]
    assert len(labels) == len(set(labels)) == 1 + len(glue.AXES)
    by_label = {o.label: o for o in xyz.axis_options}
    assert by_label["[CLoRA] Enabled"].choices() == ["True", "False"]

    # the plot applies each axis to a shallow copy of p: cells must not share the overrides dict
    import copy

    p = FakeP()
    disabled = args_for(CloraSettings(bindings=CAT_DOG.bindings))
    cells = []
    for threshold in (0.2, 0.6):
        pc = copy.copy(p)
        by_label["[CLoRA] Enabled"].apply(pc, "True", None)
        by_label["[CLoRA] Mask threshold \u03bb"].apply(pc, threshold, None)
        by_label["[CLoRA] Binding 2 weight"].apply(pc, 0.5, None)
        # the cells share p's extra_generation_params dict (shallow copies), as in the X/Y/Z plot script
        glue.on_process(pc, disabled, RecordingHost())
        cells.append(pc)
    assert not hasattr(p, glue.OVERRIDES_ATTR)
    assert [c.extra_generation_params["CLoRA mask threshold"] for c in cells] == [0.2, 0.6]
    assert all(c.extra_generation_params["CLoRA 2 weight"] == 0.5 for c in cells)
    with pytest.raises(KeyError):
        glue.set_override(p, "nonsense", 1)

    # the options of the authors' computation (and their old behaviour) as axes
    pc = copy.copy(p)
    by_label["[CLoRA] Enabled"].apply(pc, "True", None)
    assert by_label["[CLoRA] Attention maps from"].choices() == ["both", "cond"]
    by_label["[CLoRA] Attention maps from"].apply(pc, "cond", None)
    by_label["[CLoRA] Predict again after the update"].apply(pc, "True", None)
    by_label["[CLoRA] LoRA text encoders on the negative prompt"].apply(pc, "False", None)
    assert by_label["[CLoRA] Gradient memory"].choices() == [
        "auto", "batched", "per_variant", "checkpoint", "per_variant_checkpoint"]
    by_label["[CLoRA] Gradient memory"].apply(pc, "per_variant", None)
    glue.on_process(pc, disabled, RecordingHost())
    flat = pc.extra_generation_params
    assert (flat["CLoRA maps from"], flat["CLoRA predict after update"], flat["CLoRA negative TE LoRA"]) == (
        "cond", True, False)
    assert flat["CLoRA grad memory"] == "per_variant"


# ----- API routes --------------------------------------------------------------------------------------------------


class FakeApp:
    def __init__(self):
        self.routes = []

    def add_api_route(self, path, endpoint, methods):
        self.routes.append(SimpleNamespace(path=path, endpoint=endpoint, methods=methods))


def test_routes_added_once_and_answer():
    app = FakeApp()
    glue.add_routes(app, lambda: HostDetection(RecordingHost(), "a1111"))
    glue.add_routes(app, lambda: HostDetection(RecordingHost(), "a1111"))
    routes = {r.path: r for r in app.routes}
    assert len(app.routes) == 2 and all(r.methods == ["GET"] for r in app.routes)
    schema = routes["/clora/schema"].endpoint()
    assert schema["x-clora-positional-args"] == list(ARG_NAMES)
    assert set(schema["properties"]) == set(CloraSettings().to_json())
    assert routes["/clora/loras"].endpoint() == {"loras": ["cat_v1"]}

    app2 = FakeApp()
    glue.add_routes(app2, lambda: HostDetection(None, "forge", "not supported yet"))
    assert {r.path: r for r in app2.routes}["/clora/loras"].endpoint() == {"loras": [],
                                                                           "error": "CLoRA: Not supported yet"}


# ----- previews ------------------------------------------------------------------------------------------------------


def test_previews_collected_per_batch_and_appended():
    B, V, T = 2, 3, 77
    masks = torch.zeros(B, V, 1, 8, 8)
    masks[:, 1, :, :, :4] = 1
    masks[:, 2, :, :, 4:] = 1
    masks[:, 0] = 0
    composer = SimpleNamespace(last_masks=masks, mean_maps=torch.rand(B, V, 2, 2, T), last_maps=None)
    run = SimpleNamespace(composer=composer, variants=SimpleNamespace(groups=[[[2], [2], [2]], [[5], [5], [5]]]))

    class Host(RecordingHost):
        def run_of(self, p):
            return run

    settings = CloraSettings(enabled=True, show_previews=True, bindings=CAT_DOG.bindings)
    p, host = FakeP(), Host()
    glue.on_process(p, args_for(settings), host)
    images = torch.rand(B, 3, 64, 64)
    glue.on_postprocess_batch(p, host, images)
    assert host.calls == ["postprocess_batch"]
    previews = glue.state_of(p).previews
    assert len(previews) == 2 * B  # mask overlay + attention grid per image
    overlay = previews[0]
    assert overlay.width == 64 and overlay.height > 64  # the image, then its colour key below
    # left half is binding 1's region: tinted towards its palette colour, so it differs from the image there
    import numpy as np

    base = (images[0].permute(1, 2, 0).numpy() * 255).round()
    diff = np.abs(np.asarray(overlay, dtype=np.float64)[:64] - base)
    assert diff[:, :28].mean() > 5 and diff[:, 36:].mean() > 5

    processed = SimpleNamespace(images=["img0", "img1"], infotexts=["info0", "info1"])
    glue.on_postprocess(p, processed)
    assert processed.images[:2] == ["img0", "img1"] and len(processed.images) == 2 + 2 * B
    assert processed.infotexts == ["info0", "info1"] + ["info0"] * (2 * B)


def test_preview_failure_keeps_the_images():
    class Host(RecordingHost):
        def run_of(self, p):
            return SimpleNamespace(composer=SimpleNamespace(last_masks=torch.zeros(1, 2, 1, 4, 4), mean_maps=None,
                                                            last_maps=torch.zeros(1, 2, 2, 2, 77)),
                                   variants=None)  # broken: no groups

    settings = CloraSettings(enabled=True, show_previews=True, bindings=CAT_DOG.bindings[:1])
    p, host = FakeP(), Host()
    glue.on_process(p, args_for(settings), host)
    glue.on_postprocess_batch(p, host, None)
    assert host.calls == ["postprocess_batch"]
    assert p.extra_generation_params["CLoRA previews"].startswith("not available")


# ----- host detection ------------------------------------------------------------------------------------------------


def test_detect_without_a_webui():
    d = detect()
    assert d.host is None and d.kind == "none" and "No supported WebUI" in d.message


def test_detect_a1111(monkeypatch, cfg_denoiser):
    d = detect()
    assert d.kind == "a1111" and isinstance(d.host, A1111Host)


def test_detect_forge(monkeypatch, cfg_denoiser):
    fake_module(monkeypatch, "backend", package=True)
    fake_module(monkeypatch, "backend.patcher", package=True)
    d = detect()
    assert d.kind == "forge"
    if importlib.util.find_spec("clora.hosts.forge") is None:
        assert d.host is None and "Forge" in d.message
    assert not isinstance(d.host, A1111Host)


# ----- scripts/clora.py under a fake modules.scripts ----------------------------------------------------------------


def load_script(monkeypatch, with_callbacks: bool):
    fake_modules_package(monkeypatch)

    class Script:
        pass

    always = object()
    fake_module(monkeypatch, "modules.scripts", Script=Script, AlwaysVisible=always)
    registered = {}
    if with_callbacks:
        fake_module(monkeypatch, "modules.script_callbacks",
                    on_before_ui=lambda f: registered.setdefault("before_ui", f),
                    on_app_started=lambda f: registered.setdefault("app_started", f))
    spec = importlib.util.spec_from_file_location("clora_script_under_test", ROOT / "scripts" / "clora.py")
    module = importlib.util.module_from_spec(spec)
    path_before = list(sys.path)
    spec.loader.exec_module(module)
    assert sys.path == path_before  # clora is importable here, so the path is left alone
    return module, always, registered


def test_script_module(monkeypatch):
    module, always, registered = load_script(monkeypatch, with_callbacks=False)
    assert registered == {}
    script = module.CloraScript()
    assert script.title() == "CLoRA" and script.show(False) is always
    assert script.detection.host is None  # no WebUI here

    host = RecordingHost()
    script.__dict__["_clora_detection"] = HostDetection(host, "a1111")
    p = FakeP()
    args = args_for(CAT_DOG)
    script.process(p, *args)
    script.before_process_batch(p, *args, batch_number=0, prompts=p.prompts, seeds=[1], subseeds=[1])
    script.process_batch(p, *args, batch_number=0, prompts=p.prompts, seeds=[1], subseeds=[1])
    script.postprocess_batch(p, *args, images=torch.zeros(1, 3, 8, 8), batch_number=0)
    script.postprocess(p, SimpleNamespace(images=[], infotexts=[]), *args)
    # the UI checks each batch first with the host's own preparation on a copy of p (then undone)
    assert host.calls == ["before_process_batch", "process_batch", "postprocess_batch", "process_batch",
                          "postprocess_batch"]
    assert p.extra_generation_params["CLoRA 1 LoRA"] == "cat_v1"


def test_script_module_registers_callbacks_in_a_webui(monkeypatch):
    module, _, registered = load_script(monkeypatch, with_callbacks=True)
    assert registered["before_ui"] is glue.register_xyz_axes
    app = FakeApp()
    registered["app_started"](None, app)
    assert sorted(r.path for r in app.routes) == ["/clora/loras", "/clora/schema"]


def test_refused_request_answer_over_http(capsys):
    """A FastAPI app with each host's error handling answers the refused request with 422 and the message under
    ``detail`` (Forge: FastAPI's own HTTPException handler; A1111 1.8: its api_middleware's handle_exception,
    whose fields are repeated here), and prints nothing itself."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    message = "CLoRA: 'horse' (LoRA 'cat_v1') is not in the prompt."

    def refuse():
        raise glue.request_error(message)

    def forge_handler(request: Request, e: Exception):  # Forge's webui.py _handle_exception (for Exception)
        info = vars(e)
        return JSONResponse(status_code=int(info.get("status_code", 500)),
                            content={"error": type(e).__name__, "detail": info.get("detail", ""),
                                     "body": info.get("body", ""), "message": str(e)})

    forge = FastAPI(exception_handlers={Exception: forge_handler})
    forge.add_api_route("/sdapi/v1/txt2img", refuse, methods=["POST"])
    r = TestClient(forge).post("/sdapi/v1/txt2img")
    assert r.status_code == 422 and r.json() == {"detail": message}

    a1111 = FastAPI()

    @a1111.exception_handler(HTTPException)
    async def handle(request: Request, e: HTTPException):  # A1111 1.8 modules/api/api.py handle_exception
        return JSONResponse(status_code=vars(e).get("status_code", 500),
                            content={"error": type(e).__name__, "detail": vars(e).get("detail", ""),
                                     "body": vars(e).get("body", ""), "errors": str(e)})

    a1111.add_api_route("/sdapi/v1/txt2img", refuse, methods=["POST"])
    r = TestClient(a1111).post("/sdapi/v1/txt2img")
    assert r.status_code == 422
    assert r.json() == {"error": "CloraError", "detail": message, "body": "", "errors": message}


# ----- nothing of a generation outlives it -------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["success", "error", "interrupt"])
def test_run_is_released_after_the_batch_without_waiting_for_the_garbage_collector(monkeypatch, cfg_denoiser,
                                                                                    outcome):
    """The run and ``p`` refer to each other; the heavy part of the run (the Composer with its maps, the LoRA rows
    with their prepared factors, the encodings) must be dropped when the batch ends (postprocess_batch after
    success; at once after an error or interrupt, when the host skips postprocess_batch), not whenever Python's
    cyclic garbage collector next runs: measured with the collector off."""
    import gc
    import weakref

    class Heavy:  # stands for the Composer / LoRA rows / encodings
        pass

    def prepare(self):
        self.composer, self.unet_rows, self.variant_schedules = Heavy(), Heavy(), [Heavy()]

    monkeypatch.setattr(A1111Run, "prepare", prepare)
    monkeypatch.setattr(A1111Run, "encode_variants", lambda self, steps: None, raising=False)
    host = A1111Host()
    p = FakeP()
    host_sample = {"success": lambda *a, **k: "samples", "error": None, "interrupt": None}[outcome]
    if host_sample is None:
        exc = RuntimeError("boom") if outcome == "error" else KeyboardInterrupt()

        def host_sample(*a, **k):
            raise exc
    p.sample = host_sample
    host.process_batch(p, CAT_DOG)
    run = host.run_of(p)
    refs = [weakref.ref(run.composer), weakref.ref(run.unet_rows), weakref.ref(run.variant_schedules[0])]
    gc.disable()
    try:
        if outcome == "success":
            assert p.sample() == "samples"
            assert all(r() is not None for r in refs)  # kept for the previews until the batch ends
            host.postprocess_batch(p)
            assert host.run_of(p) is None and "sample" not in p.__dict__
        else:
            with pytest.raises(BaseException):
                p.sample()
        del run
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
