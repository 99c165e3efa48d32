"""Every trainer glue implements the one contract (``mirai_plugin.integrations.glue``): the same
names, the same signatures, the same checkpoint key; the patches call only those names."""

import importlib
import inspect
import pkgutil
import re

import pytest
import torch
from test_glue import ARGS, TinyDMD
from test_llamagen_glue import E, TinyLlamaGen, args_for

from mirai_plugin import integrations
from mirai_plugin.integrations import CHECKPOINT_KEY, TrainerGlue
from mirai_plugin.integrations.llamagen import LlamaGenMirai
from mirai_plugin.integrations.self_forcing import DMDForesight, ODEForesight
from mirai_plugin.tooling.patching import PATCHES, parse_patch

CONTRACT = sorted(name for name in vars(TrainerGlue) if not name.startswith("_"))


def glue_classes() -> list[type]:
    """The public classes of ``mirai_plugin.integrations`` that have ``add_term``: a new glue is checked
    here without being listed."""
    found = []
    for info in pkgutil.iter_modules(integrations.__path__):
        module = importlib.import_module(f"{integrations.__name__}.{info.name}")
        for name, cls in vars(module).items():
            public = inspect.isclass(cls) and cls.__module__ == module.__name__ and not name.startswith("_")
            if public and hasattr(cls, "add_term") and cls is not TrainerGlue:
                found.append(cls)
    return sorted(found, key=lambda cls: cls.__qualname__)


def test_the_contract_and_its_glues():
    assert CONTRACT == [
        "active", "add_term", "after_critic_step", "after_generator_step", "capturing", "checkpoint_state",
        "load_checkpoint_state", "log_values",
    ]  # fmt: skip
    assert CHECKPOINT_KEY == "foresight"
    assert {DMDForesight, ODEForesight, LlamaGenMirai} <= set(glue_classes())


def parameters(function) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("cls", glue_classes(), ids=lambda cls: cls.__name__)
def test_every_glue_has_the_contracts_names_and_signatures(cls):
    for name in CONTRACT:
        expected, actual = inspect.getattr_static(TrainerGlue, name), inspect.getattr_static(cls, name, None)
        assert actual is not None, f"{cls.__name__} has no {name}"
        if isinstance(expected, property):
            assert isinstance(actual, property), f"{cls.__name__}.{name} must be a property"
            continue
        assert callable(actual) and not isinstance(actual, (staticmethod, classmethod)), f"{cls.__name__}.{name}"
        if name == "add_term":  # (self, loss, <what this trainer has at hand>)
            assert parameters(actual)[:2] == parameters(expected)[:2], f"{cls.__name__}.add_term(self, loss, ...)"
        else:
            assert parameters(actual) == parameters(expected), f"{cls.__name__}.{name}{inspect.signature(actual)}"
        if name != "capturing":  # a generator under @contextmanager: checked by calling it below
            want, got = inspect.signature(expected).return_annotation, inspect.signature(actual).return_annotation
            assert got == want, f"{cls.__name__}.{name} returns {got}, the contract says {want}"


def glues(on: bool):
    llamagen = LlamaGenMirai(TinyLlamaGen(), args_for(*E) if on else args_for(), steps_per_epoch=4, device=0)
    dmd = TinyDMD(ARGS if on else {**ARGS, "foresight_weight": 0.0})
    return [("llamagen", llamagen), ("dmd", dmd.foresight)]


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_instances_follow_the_contract_and_one_checkpoint_key(on):
    for name, glue in glues(on):
        assert isinstance(glue, TrainerGlue), name  # names only: the signatures are checked above
        assert glue.active is on, name
        with glue.capturing() as captured:  # a context manager; no hook and nothing captured when off
            assert (captured is not None) is on, name
        if not on:  # add_term returns the loss itself, whatever the trainer's inputs
            loss, inputs = torch.tensor(1.0), (None,) * (len(inspect.signature(glue.add_term).parameters) - 1)
            assert glue.add_term(loss, *inputs) is loss, name
        glue.after_critic_step(True)
        values = glue.log_values()
        assert isinstance(values, dict) and all(isinstance(v, float) for v in values.values())
        state = glue.checkpoint_state()
        assert list(state) == ([CHECKPOINT_KEY] if on else []), name
        glue.load_checkpoint_state(state)


GLUE_RECEIVERS = re.compile(r"\b(?:mirai|self\.foresight|foresight_of\(self\.model\))\.(\w+)")
PATCH_ONLY = {"enabled", "begin_capture", "scaler"}  # set-up a patch may use besides the contract


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_patches_call_the_contracts_names(name):
    lines = [line for change in parse_patch(PATCHES[name].text()) if not change.new_file for line in change.added]
    called = {match for line in lines for match in GLUE_RECEIVERS.findall(line)}
    assert called and called <= set(CONTRACT) | PATCH_ONLY, sorted(called - set(CONTRACT) - PATCH_ONLY)
