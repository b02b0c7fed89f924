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
    """The processing object: only what the glue reads and writes."""

    def __init__(self, prompt="a cat and a dog", steps=4):
        self.prompt = prompt
        self.prompts = [prompt]
        self.steps = steps
        self.extra_generation_params = {}

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


def test_missing_word_raises_at_sampling_through_the_script_hooks(monkeypatch):
    install_prepare_fakes(monkeypatch)
    host = A1111Host()
    p = FakeP("a cat on a sofa")
    p.sd_model = fake_sd_model()
    settings = CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)), Binding("horse_v1", ("horse",))))

    glue.on_process(p, args_for(settings), host)
    assert p.extra_generation_params["CLoRA 2 subject"] == "horse"
    glue.on_before_process_batch(p, host)
    glue.on_process_batch(p, host)
    assert glue.state_of(p).error is None  # the host keeps the problem in its run and raises it at sampling
    with pytest.raises(CloraError, match="'horse'.*not in the prompt"):
        p.sample(conditioning=None)
    host.postprocess_batch(p)
    assert p.sample() == "sampled"  # the per-p replacement is gone; the class method is back in effect


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


def test_settings_error_raises_at_sampling(monkeypatch):
    p = FakeP()
    a = args_for(CloraSettings())
    a[ARG_NAMES.index("enabled")] = True
    a[ARG_NAMES.index("b1_lora")] = "cat_v1"  # no subject word
    host = A1111Host()
    state = glue.on_process(p, a, host)
    assert state.settings is None and "no subject word" in str(state.error)
    assert p.extra_generation_params == {}
    glue.on_before_process_batch(p, host)
    glue.on_process_batch(p, host)
    with pytest.raises(CloraError, match=r"^CLoRA: Binding 1 \(LoRA 'cat_v1'\): no subject word"):
        p.sample()


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
def test_unexpected_host_failure_reaches_the_user(fail_in):
    p, host = FakeP(), RecordingHost(fail_in)
    glue.on_process(p, args_for(CAT_DOG), host)
    glue.on_before_process_batch(p, host)
    glue.on_process_batch(p, host)
    with pytest.raises(CloraError, match="cond_stage_model"):
        p.sample()


def test_unavailable_host_reaches_the_user():
    p = FakeP()
    glue.on_process(p, args_for(CAT_DOG), None, "Forge is not supported yet.")
    assert p.extra_generation_params["CLoRA"] is True
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
    glue.on_process(pc, disabled, RecordingHost())
    flat = pc.extra_generation_params
    assert (flat["CLoRA maps from"], flat["CLoRA predict after update"], flat["CLoRA negative TE LoRA"]) == (
        "cond", True, False)


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
    assert overlay.size == (64, 64)
    # left half is binding 1's region: tinted towards its palette colour, so it differs from the image there
    import numpy as np

    base = (images[0].permute(1, 2, 0).numpy() * 255).round()
    diff = np.abs(np.asarray(overlay, dtype=np.float64) - base)[16:, :, :]  # below the legend strip
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
    assert host.calls == ["before_process_batch", "process_batch", "postprocess_batch"]
    assert p.extra_generation_params["CLoRA 1 LoRA"] == "cat_v1"


def test_script_module_registers_callbacks_in_a_webui(monkeypatch):
    module, _, registered = load_script(monkeypatch, with_callbacks=True)
    assert registered["before_ui"] is glue.register_xyz_axes
    app = FakeApp()
    registered["app_started"](None, app)
    assert sorted(r.path for r in app.routes) == ["/clora/loras", "/clora/schema"]
