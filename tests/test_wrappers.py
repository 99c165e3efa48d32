"""One wrapper registry: registering a wrapper type once makes every part of the package see through it."""

import pytest
import torch
from tiny_models import make_inputs, make_pair, rollout
from torch import nn

from mirai_plugin import ForesightConfig, ForesightHead, FrozenEncoder, MiraiError, capture_hidden
from mirai_plugin.integrations.self_forcing import wan_transformer
from mirai_plugin.wrappers import (
    patch_size,
    register_wrapper,
    strip_wrapper_prefixes,
    tokens_per_frame,
    unregister_wrapper,
    unwrap,
    wrapper_chain,
)


class Engine(nn.Module):
    """A training-engine wrapper the package has never heard of (DeepSpeed-like, another attribute)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.engine_module = inner

    def forward(self, *args, **kwargs):
        return self.engine_module(*args, **kwargs)


@pytest.fixture
def engine_registered():
    register_wrapper("engine_module")
    yield
    unregister_wrapper("engine_module")


def test_an_unknown_wrapper_hides_the_model():
    generator, _ = make_pair()
    with pytest.raises(MiraiError, match="no block list found in Engine"):
        with capture_hidden(Engine(generator), 1):
            pass
    assert unwrap(Engine(generator)) is not generator


def test_registering_it_once_makes_capture_encoder_glue_and_official_loading_see_through_it(engine_registered):
    generator, encoder = make_pair()
    noise, cond = make_inputs(frames=6)

    # capture: the generator's blocks are found through the engine
    wrapped = Engine(generator)
    with capture_hidden(wrapped, 1) as captured:
        video, _ = rollout(generator, noise, cond, segment_frames=3)  # the hooks sit on the same blocks
    assert len(captured.records) == 2 and captured.location.startswith("Engine.engine_module")

    # encoder: the call convention and the patch size are read through the engine
    frozen = FrozenEncoder(Engine(encoder), layer=2)
    assert frozen.convention == "wan_wrapper"
    z = frozen(video.detach(), cond)
    assert z.shape == (2, 6 * tokens_per_frame(encoder, *video.shape[-2:]), 48)
    assert patch_size(Engine(encoder)) == patch_size(encoder) == encoder.model.patch_size

    # glue: the Wan transformer inside the trainer's wrapper
    assert wan_transformer(Engine(generator)) is generator.model

    # official loading: the engine's state-dict prefix is stripped
    cfg = ForesightConfig(num_heads=2, segment_frames=3, predictor_depth=1)
    head = ForesightHead(cfg, student_dim=32, encoder_dim=48)
    official = {f"engine_module.{key}": value for key, value in _official_projector(head).items()}
    loaded = ForesightHead.load_official(official, config=cfg, dim_proj={"weight": head.project.weight})
    for name, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


def test_unregistering_restores_the_registry():
    before = [path for _, path in wrapper_chain(Engine(nn.Linear(2, 2)))]
    register_wrapper("engine_module")
    unregister_wrapper("engine_module")
    assert [path for _, path in wrapper_chain(Engine(nn.Linear(2, 2)))] == before == ["Engine"]
    with pytest.raises(MiraiError, match="no wrapper is registered at 'engine_module'"):
        unregister_wrapper("engine_module")
    with pytest.raises(MiraiError, match="a child-module name"):
        register_wrapper("not a name")


def test_state_dict_prefixes_are_stripped_only_at_name_boundaries():
    assert strip_wrapper_prefixes("_orig_mod.module.blocks.0.q.weight") == "blocks.0.q.weight"
    assert strip_wrapper_prefixes("submodule.weight") == "submodule.weight"  # "module." inside a name stays
    assert strip_wrapper_prefixes("base_model.model.blocks.0.weight") == "base_model.model.blocks.0.weight"  # PEFT


def _official_projector(head: ForesightHead) -> dict[str, torch.Tensor]:
    """The head's DiT weights under the official trainer's names."""
    names = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out": "o", "norm_q": "norm_q", "norm_k": "norm_k",
             "ffn_in": "ffn.0", "ffn_out": "ffn.2"}
    out = {}
    for key, value in head.predictor.state_dict().items():
        _, index, name, kind = key.split(".") if key.count(".") == 3 else (None, None, None, None)
        if name in names:
            out[f"blocks.{index}.{names[name]}.{kind}"] = value
        elif key.endswith("modulation_bias"):
            out[f"blocks.{key.split('.')[1]}.adaLN_modulation.1.bias"] = value
            out[f"blocks.{key.split('.')[1]}.adaLN_modulation.1.weight"] = torch.zeros(value.numel(), head.student_dim)
    return out
