"""Forge glue units that need no Forge: the sampling wrapper's error reporting and deep-copy safe callbacks."""
from __future__ import annotations

import copy

import pytest
import torch

from clora.hosts.common import CloraError
from clora.hosts.forge import ForgeHost, ForgeRun, _Shared, _transformer_options
from clora.settings import Binding, CloraSettings

SETTINGS = CloraSettings(enabled=True, bindings=(Binding("cat_v1", ("cat",)), Binding("dog_v1", ("dog",))))


class FakeP:
    def __init__(self):
        self.prompts = ["a cat and a dog"]
        self.extra_generation_params = {}
        self.calls = 0

    def sample(self, *args, **kwargs):
        self.calls += 1
        return "samples"


def test_callbacks_survive_forge_deepcopy_of_model_options():
    class Holder:  # stands for a run holding things that cannot be copied
        def __init__(self):
            self.lock = __import__("threading").Lock()

        def cb(self):
            return 1

    h = Holder()
    options = {"conditioning_modifiers": [_Shared(h.cb)], "model_function_wrapper": _Shared(h.cb)}
    copied = copy.deepcopy(options)
    assert copied["model_function_wrapper"] is options["model_function_wrapper"]
    assert copied["conditioning_modifiers"][0]() == 1
    with pytest.raises(TypeError):
        copy.deepcopy({"x": h.cb})  # what Forge's clone() did before the callbacks were wrapped


def test_preparation_error_is_raised_from_sampling(monkeypatch):
    def bad_prepare(self):
        self.error = ValueError("'dog' (LoRA 'dog_v1') is not in the prompt.")

    monkeypatch.setattr(ForgeRun, "prepare", bad_prepare)
    p = FakeP()
    ForgeHost().process_batch(p, SETTINGS)
    with pytest.raises(CloraError, match="'dog'"):
        p.sample()
    assert p.calls == 0


def test_a_patch_that_never_ran_is_an_error_not_a_silent_plain_image(monkeypatch):
    monkeypatch.setattr(ForgeRun, "prepare", lambda self: None)
    monkeypatch.setattr(ForgeRun, "_should_stop", lambda self: False)
    p = FakeP()
    host = ForgeHost()
    host.process_batch(p, SETTINGS)
    with pytest.raises(CloraError, match="(?i)not applied"):
        p.sample()
    assert p.calls == 1
    run = host.run_of(p)
    run.pass_state["applied"] = 3  # the conditioning modifier ran
    assert p.sample() == "samples"
    host.postprocess_batch(p)
    assert "sample" not in p.__dict__  # the class's method again


def test_disabled_settings_leave_p_alone():
    p = FakeP()
    ForgeHost().process_batch(p, CloraSettings())
    assert "sample" not in p.__dict__


def test_transformer_options_for_our_rows():
    sigma = torch.tensor([2.0])
    opts = _transformer_options({"patches": {"x": 1}}, [1, 1, 1, 0, 0, 0], sigma)
    assert opts["cond_or_uncond"] == [1, 1, 1, 0, 0, 0] and opts["patches"] == {"x": 1} and opts["sigmas"] is sigma
