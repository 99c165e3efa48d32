"""FrozenEncoder: early exit at the right block, frozen, and invisible to the trainer's modules."""

import pytest
import torch
from conftest import all_hooks
from tiny_models import TOKENS_PER_FRAME, make_inputs, make_pair

from mirai_plugin import FrozenEncoder, MiraiError

LAYER = 3


def full_forward_hidden(encoder, video, cond):
    timestep = torch.zeros(video.shape[:2], dtype=torch.int64)
    with torch.no_grad():
        return encoder(video, cond, timestep, return_hidden_at_layer=LAYER)[2]


def test_returns_block_output_and_stops_there():
    _, encoder = make_pair()
    video, cond = make_inputs()
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(encoder.model.blocks)]
    head_calls = []
    hooks.append(encoder.model.head.register_forward_hook(lambda *a: head_calls.append(1)))
    z = FrozenEncoder(encoder, LAYER)(video, cond)
    for h in hooks:
        h.remove()
    assert calls == [0, 1, 2, 3] and head_calls == []
    assert torch.equal(z, full_forward_hidden(encoder, video, cond))
    assert z.shape == (2, 9 * TOKENS_PER_FRAME, 48) and not z.requires_grad
    assert all_hooks(encoder) == 0


def test_convention_detection_and_plain_modules():
    _, encoder = make_pair()
    assert FrozenEncoder(encoder, 0).convention == "wan_wrapper"
    plain = FrozenEncoder(encoder.model, LAYER)
    assert plain.convention == "plain"
    video, cond = make_inputs()
    z = plain(video, torch.zeros(video.shape[:2], dtype=torch.int64), cond["prompt_embeds"])
    assert torch.equal(z, full_forward_hidden(encoder, video, cond))


def test_frozen_mode_restored_and_nothing_registered():
    _, encoder = make_pair()
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    seen_modes = []
    hook = encoder.model.blocks[0].register_forward_hook(lambda m, a, o: seen_modes.append(m.training))
    wrapped = FrozenEncoder(encoder, LAYER)
    video, cond = make_inputs()
    with torch.enable_grad():
        wrapped(video, cond)
    hook.remove()
    assert seen_modes == [False] and encoder.training
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())

    trainer = torch.nn.Module()
    trainer.foresight_encoder = wrapped
    assert list(trainer.state_dict()) == [] and list(trainer.parameters()) == []


def test_exception_inside_forward_is_not_swallowed():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

        def forward(self, x):
            raise RuntimeError("bad input")

    wrapped = FrozenEncoder(Broken(), 1)
    with pytest.raises(RuntimeError, match="bad input"):
        wrapped(torch.zeros(1, 4))
    assert all_hooks(wrapped.model) == 0


def test_layer_not_reached_is_an_error():
    class SkipsLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

        def forward(self, x):
            return self.blocks[0](x)

    with pytest.raises(MiraiError, match="without calling SkipsLast.blocks\\[1\\]"):
        FrozenEncoder(SkipsLast(), 1)(torch.zeros(1, 4))


def test_nested_encoders_catch_only_their_own_exit():
    class Outer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = FrozenEncoder(inner, 1)
            self.blocks = torch.nn.ModuleList([torch.nn.Identity()])

        def forward(self, x):
            return self.blocks[0](self.inner(x))

    plain = torch.nn.Sequential()
    plain.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    plain.forward = lambda x: plain.blocks[2](plain.blocks[1](plain.blocks[0](x)))
    outer = Outer(plain)
    x = torch.randn(2, 4)
    assert torch.equal(FrozenEncoder(outer, 0)(x), plain.blocks[1](plain.blocks[0](x)).detach())


def test_wan_wrapper_trims_padding():
    class Padded(torch.nn.Module):  # pads the token sequence like Wan's seq_len
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, noisy_image_or_video, conditional_dict, timestep):
            return self.model(noisy_image_or_video, timestep, conditional_dict["prompt_embeds"])

    _, encoder = make_pair()
    blocks, pad = encoder.model.blocks, 5
    video, cond = make_inputs()
    tokens = 9 * TOKENS_PER_FRAME

    # Reference: blocks 0..LAYER run by hand on the block inputs of an unpadded forward, zeros appended
    inputs = []
    handle = blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args))
    unpadded = full_forward_hidden(encoder, video, cond)  # (b t e)
    handle.remove()
    x, e = inputs[0]  # (b t d), (b d)
    x = torch.cat([x, torch.zeros_like(x[:, :pad])], dim=1)  # (b t+pad d)
    with torch.no_grad():
        for block in blocks[: LAYER + 1]:
            x = block(x, e)

    pad_hook = blocks[0].register_forward_pre_hook(
        lambda m, args: (torch.cat([args[0], torch.zeros_like(args[0][:, :pad])], dim=1), *args[1:])
    )
    z = FrozenEncoder(Padded(encoder.model), LAYER)(video, cond)
    pad_hook.remove()
    assert z.shape == (2, tokens, 48)
    assert torch.equal(z, x[:, :tokens])  # the real tokens, in order
    # controls: the last t tokens (padding kept, first tokens dropped) and the unpadded forward are other values
    # (attention over the padding moved the real tokens)
    assert (x[:, pad:] - x[:, :tokens]).abs().max() > 0.1
    assert (unpadded - x[:, :tokens]).abs().max() > 0.1


def test_wan_model_convention_list_input_and_seq_len_padding():
    class WanLike(torch.nn.Module):  # WanModel: forward(*args, **kwargs) -> _forward(x, t, context, seq_len)
        def __init__(self, model):
            super().__init__()
            self.inner = model
            self.blocks = model.blocks
            self.patch_size = (1, 2, 2)

        def forward(self, *args, **kwargs):
            return self._forward(*args, **kwargs)

        def _forward(self, x, t, context, seq_len):
            video = torch.stack(x).permute(0, 2, 1, 3, 4)  # list of (c f h w) -> (b f c h w)
            timestep = t[:, None].expand(-1, video.shape[1])
            return self.inner(video, timestep, context)

    _, encoder = make_pair()
    wrapped = FrozenEncoder(WanLike(encoder.model), LAYER)
    assert wrapped.convention == "wan_model"
    video, cond = make_inputs()
    assert torch.equal(wrapped(video, cond["prompt_embeds"]), full_forward_hidden(encoder, video, cond))
