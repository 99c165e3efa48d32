"""Registries and capture: the wrapper registry keeps its built-in entries and checks what it is given when it is
given it; a model whose blocks sit in an ``nn.Sequential`` (timm's ViT and many others) is captured."""

import pytest
import torch
from torch import nn

from mirai_plugin import FrozenEncoder, MiraiError, capture_hidden
from mirai_plugin import wrappers as registry
from mirai_plugin.image import EMASource
from mirai_plugin.wrappers import (
    register_wrapper,
    strip_wrapper_prefixes,
    unregister_wrapper,
    unwrap,
    wrapper_attributes,
    wrapper_chain,
)


@pytest.fixture(autouse=True)
def registry_restored():
    """A regression here must not leave the registry broken for the tests that follow."""
    before = list(registry._WRAPPERS)
    yield
    registry._WRAPPERS[:] = before


def ddp_like(inner: nn.Module) -> nn.Module:
    wrapper = nn.Module()
    wrapper.module = inner  # DDP's and DeepSpeed's attribute
    return wrapper


class Engine(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


# ------------------------------------------------------------------ unregister_wrapper


def test_unregister_refuses_a_built_in_entry_and_ddp_still_unwraps():
    inner = nn.Linear(2, 2)
    with pytest.raises(MiraiError, match=r"no wrapper is registered at 'module' by register_wrapper \(a built-in"):
        unregister_wrapper("module")
    assert unwrap(ddp_like(inner)) is inner
    assert strip_wrapper_prefixes("module.blocks.0.weight") == "blocks.0.weight"
    for attribute in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "base_model", "model"):
        with pytest.raises(MiraiError, match="a built-in entry, which stays"):
            unregister_wrapper(attribute)


def test_unregister_removes_the_users_entry_at_a_built_in_attribute_and_leaves_the_built_in_one():
    inner = nn.Linear(2, 2)
    mine = register_wrapper("module", applies=lambda m: isinstance(m, Engine), in_state_dict=False)
    assert mine in registry._WRAPPERS
    unregister_wrapper("module")
    assert mine not in registry._WRAPPERS
    assert unwrap(ddp_like(inner)) is inner and unwrap(Engine(inner)) is inner  # the built-in entry sees both
    with pytest.raises(MiraiError, match="no wrapper is registered at 'module' by register_wrapper"):
        unregister_wrapper("module")  # the user's entry is gone; the built-in one stays


def test_unregister_takes_the_wrapper_register_returned_and_removes_only_it():
    class A(nn.Module):
        pass

    class B(nn.Module):
        pass

    first = register_wrapper("engine", applies=lambda m: isinstance(m, A))
    second = register_wrapper("engine", applies=lambda m: isinstance(m, B))
    inner = nn.Linear(2, 2)
    a, b = A(), B()
    a.engine, b.engine = inner, inner
    unregister_wrapper(first)
    assert unwrap(a) is a and unwrap(b) is inner
    with pytest.raises(MiraiError, match="no wrapper is registered at 'engine'"):
        unregister_wrapper(first)
    unregister_wrapper(second)
    assert unwrap(b) is b
    with pytest.raises(MiraiError, match="takes the attribute or the Wrapper"):
        unregister_wrapper(3)


# ------------------------------------------------------------------ register_wrapper


class NotATest(nn.Module):
    pass


@pytest.mark.parametrize("arguments, message", [
    ({"applies": 42}, r"applies must be None or a callable applies\(module\) -> bool, got int 42"),
    ({"applies": "Engine"}, r"applies must be None or a callable"),
    ({"applies": NotATest}, r"got the class NotATest; pass applies=lambda m: isinstance\(m, NotATest\)"),
    ({"in_state_dict": "yes"}, r"in_state_dict must be True or False, got 'yes'"),
    ({"in_state_dict": 1}, r"in_state_dict must be True or False, got 1"),
    ({"in_state_dict": None}, r"in_state_dict must be True or False, got None"),
])
def test_register_wrapper_checks_its_arguments_when_called(arguments, message):
    before = wrapper_attributes()
    with pytest.raises(MiraiError, match=message):
        register_wrapper("engine_module", **arguments)
    assert wrapper_attributes() == before and "engine_module" not in before  # nothing half-registered
    holder = nn.Module()
    holder.engine_module = nn.Linear(2, 2)
    assert [path for _, path in wrapper_chain(holder)] == ["Module"]  # first use is unaffected


def test_register_wrapper_names_a_built_in_duplicate():
    with pytest.raises(MiraiError, match="a wrapper at 'module' is already built in"):
        register_wrapper("module")
    register_wrapper("engine_module")
    with pytest.raises(MiraiError, match="a wrapper at 'engine_module' is already registered"):
        register_wrapper("engine_module")


# ------------------------------------------------------------------ nn.Sequential blocks


class Block(nn.Module):
    """A pre-norm residual MLP block, counting its calls."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.mlp(self.norm(x))


class SequentialViT(nn.Module):
    """timm's VisionTransformer layout: patch_embed, cls_token, ``blocks = nn.Sequential(...)``, norm."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Linear(12, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, patches):
        x = self.patch_embed(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(self.blocks(x))


def by_hand(model: SequentialViT, patches: torch.Tensor, layer: int) -> torch.Tensor:
    """The output of blocks[layer], block by block (independent of the hooks)."""
    x = model.patch_embed(patches)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    for block in list(model.blocks)[: layer + 1]:
        x = block(x)
    return x


@pytest.mark.parametrize("wrap", [lambda m: m, ddp_like], ids=["bare", "ddp"])
@pytest.mark.parametrize("blocks", [None, "blocks", "given"])
def test_a_model_whose_blocks_is_a_sequential_is_captured(wrap, blocks):
    model = SequentialViT()
    patches = torch.randn(2, 5, 12)
    named = model.blocks if blocks == "given" else blocks
    with capture_hidden(wrap(model), 2, blocks=named) as captured:
        model(patches)
    assert len(captured) == 1 and captured.location.endswith("[2]")
    torch.testing.assert_close(captured[0].hidden, by_hand(model, patches, 2))
    assert captured[0].hidden.requires_grad


def test_frozen_encoder_and_ema_source_stop_at_a_sequential_block():
    model = SequentialViT()
    patches = torch.randn(2, 5, 12)
    expected = by_hand(model, patches, 1).detach()
    for block in model.blocks:
        block.calls = 0
    torch.testing.assert_close(FrozenEncoder(model, 1)(patches), expected)
    assert [block.calls for block in model.blocks] == [1, 1, 0, 0]  # the forward stopped after blocks[1]
    source = EMASource(model, 1)
    assert len(source.model.blocks) == 2  # the blocks after the layer are dropped from the copy
    torch.testing.assert_close(source(patches), expected)  # the copy starts equal to the model


def test_without_a_blocks_attribute_the_error_lists_the_sequential_and_the_fix_works():
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(*[Block(8) for _ in range(3)])

        def forward(self, x):
            return self.trunk(x)

    model = Trunk()
    with pytest.raises(MiraiError) as error:
        capture_hidden(model, 1).__enter__()
    message = str(error.value)
    assert "trunk (Sequential, 3)" in message and "Pass blocks='<dotted.path>'" in message
    assert "mlp" not in message  # a block's own MLP is not offered as a block list
    x = torch.randn(2, 4, 8)
    with capture_hidden(model, 1, blocks="trunk") as captured:  # the fix the message names
        model(x)
    torch.testing.assert_close(captured[0].hidden, model.trunk[1](model.trunk[0](x)))
    with pytest.raises(MiraiError, match=r"blocks='trunk.0.mlp.1' on Trunk is a GELU, not an nn.ModuleList or "
                                         r"nn.Sequential of blocks; block lists present: trunk \(Sequential, 3\)"):
        capture_hidden(model, 0, blocks="trunk.0.mlp.1").__enter__()


def test_timm_vision_transformer_is_captured_when_installed():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0).eval()
    assert isinstance(model.blocks, nn.Sequential)
    images = torch.randn(1, 3, 32, 32)
    with capture_hidden(model, 5) as captured:
        model.forward_features(images)
    x = model._pos_embed(model.patch_embed(images))
    x = model.norm_pre(model.patch_drop(x))
    for block in list(model.blocks)[:6]:
        x = block(x)
    torch.testing.assert_close(captured[0].hidden, x)
