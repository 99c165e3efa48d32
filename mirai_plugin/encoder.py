"""The frozen bidirectional encoder that provides foresight targets.

Legend: b batch, f latent frames, c channels, h/w latent height/width,
p_t/p_h/p_w patch size, s tokens per frame, t = f*s tokens, e encoder width.

``FrozenEncoder`` is deliberately not an ``nn.Module``: assigning it to a trainer's
module cannot add the encoder to any ``state_dict()``, optimizer, DDP or FSDP wrap.
It runs the encoder under ``no_grad`` in eval mode and stops the forward right
after ``blocks[layer]`` by raising a private exception from a hook, so blocks
after ``layer`` and the output head never run.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mirai_plugin.blocks import BlockList, block_at
from mirai_plugin.errors import MiraiError
from mirai_plugin.wrappers import token_count, unwrap


class _EarlyExit(Exception):
    """Raised by the encoder's hook; caught only by the FrozenEncoder that raised it."""

    def __init__(self, owner: object, hidden: object) -> None:
        super().__init__("early exit")
        self.owner = owner
        self.hidden = hidden


def _parameter_names(model: nn.Module) -> set[str]:
    # The class's forward, not the instance attribute: a forward patched onto the
    # instance (a profiler, a test spy) usually takes (*args, **kwargs). Wan's
    # WanModel.forward itself takes (*args, **kwargs) and delegates to `_forward`.
    names: set[str] = set()
    for method in ("forward", "_forward"):
        try:
            params = inspect.signature(getattr(type(model), method)).parameters.values()
        except (AttributeError, TypeError, ValueError):
            continue
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names


class FrozenEncoder:
    """Wrap a frozen bidirectional model to return the output of ``blocks[layer]``.

    Call conventions, detected from the wrapped model's ``forward`` signature:

    * Self-Forcing ``WanDiffusionWrapper`` (``noisy_image_or_video``,
      ``conditional_dict``, ``timestep``): ``encoder(video, conditional_dict)`` with
      ``video`` ``(b f c h w)``; the timestep defaults to 0 (clean input).
    * Wan ``WanModel`` (``x``, ``t``, ``context``, ``seq_len``):
      ``encoder(video, context)`` with ``video`` ``(b f c h w)`` and ``context`` the
      text embeddings ``(b l c)``; ``t`` defaults to 0.
    * diffusers ``WanTransformer3DModel`` and its Wan-family siblings
      (``hidden_states``, ``timestep``, ``encoder_hidden_states``,
      ``encoder_hidden_states_image``): ``encoder(latents, encoder_hidden_states)``
      with ``latents`` in diffusers' layout ``(b c f h w)``; ``timestep`` defaults to
      zeros ``(b,)``; other keywords (``encoder_hidden_states_image``,
      ``attention_kwargs``) are passed on.
    * anything else: ``encoder(*args, **kwargs)`` calls ``model(*args, **kwargs)``.

    Wrappers (DDP, FSDP, ``torch.compile``, PEFT) are looked through for the
    detection. For the Wan conventions the result is ``(b t e)`` with ``t = f*s``
    (``s = (h/p_h)*(w/p_w)`` from the model's patch size, ``config.patch_size`` in
    diffusers), trimmed to the real tokens (Wan pads to ``seq_len``). The result
    is detached: targets are stop-gradient.

    Args:
        model: the frozen model (bare or wrapped); it is not modified.
        layer: 0-based index of the block whose output is returned.
        blocks: name the block list when it is not a ``.blocks`` attribute.
        call: ``call(model, *args, **kwargs)`` to run the forward yourself.

    Example:
        >>> import torch, torch.nn as nn
        >>> class Bidirectional(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        ...     def forward(self, x):
        ...         for block in self.blocks:
        ...             x = block(x)
        ...         return x
        >>> encoder = FrozenEncoder(Bidirectional(), layer=2)
        >>> z = encoder(torch.randn(1, 10, 8))
        >>> z.shape, z.requires_grad
        (torch.Size([1, 10, 8]), False)
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        *,
        blocks: str | BlockList | None = None,
        call: Callable[..., Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MiraiError(f"FrozenEncoder wraps an nn.Module, got {type(model).__name__}")
        if call is not None and not callable(call):
            raise MiraiError(f"call must be a callable call(model, *args, **kwargs), got {type(call).__name__}")
        self._block, self.location = block_at(model, layer, blocks)
        self._model = model
        self.layer = layer
        self._call = call
        self._swallow_reported = False
        names = _parameter_names(unwrap(model))
        if call is not None:
            self.convention = "custom"
        elif {"noisy_image_or_video", "conditional_dict", "timestep"} <= names:
            self.convention = "wan_wrapper"
        elif {"x", "t", "context", "seq_len"} <= names:
            self.convention = "wan_model"
        elif {"hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"} <= names:
            self.convention = "diffusers_wan"
        else:
            self.convention = "plain"

    @property
    def model(self) -> nn.Module:
        return self._model

    def __repr__(self) -> str:
        return f"FrozenEncoder({self.location}, convention={self.convention!r})"

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.convention == "wan_wrapper":
            run, tokens = self._wan_wrapper_call(*args, **kwargs)
        elif self.convention == "wan_model":
            run, tokens = self._wan_model_call(*args, **kwargs)
        elif self.convention == "diffusers_wan":
            run, tokens = self._diffusers_wan_call(*args, **kwargs)
        elif self.convention == "custom":
            call = self._call
            assert call is not None
            run, tokens = (lambda: call(self._model, *args, **kwargs)), None
        else:
            run, tokens = (lambda: self._model(*args, **kwargs)), None

        hidden = self._run_to_layer(run)
        if tokens is not None:
            if hidden.shape[1] < tokens:
                raise MiraiError(
                    f"{self.location} returned {hidden.shape[1]} tokens but the input video has {tokens}; "
                    f"check the patch size of the encoder"
                )
            hidden = hidden[:, :tokens]  # (b t e): drop Wan's padding to seq_len
        return hidden

    # --------------------------------------------------------------- internals

    def _run_to_layer(self, run: Callable[[], Any]) -> Tensor:
        outputs: list[object] = []  # what blocks[layer] returned, kept even if the forward swallows the exit

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            outputs.append(hidden)
            raise _EarlyExit(self, hidden)

        was_training = self._model.training
        handle = self._block.register_forward_hook(hook)
        exited = False
        try:
            self._model.eval()
            with torch.no_grad():
                run()
        except _EarlyExit as exit_:
            if exit_.owner is not self:
                raise
            exited = True
        finally:
            handle.remove()
            self._model.train(was_training)
        if not outputs:
            raise MiraiError(
                f"the encoder forward finished without calling {self.location}; "
                f"check that layer {self.layer} is used by the forward you call"
            )
        if not exited and not self._swallow_reported:
            # The block ran and its output is the target; the forward caught the exception that stops it.
            self._swallow_reported = True
            warnings.warn(
                f"the forward of {type(self._model).__name__} caught the exception FrozenEncoder raises after "
                f"{self.location} and went on: the target is {self.location}'s output as it should be, but the "
                f"blocks after it ran too (slower); let exceptions from the blocks through to skip them",
                stacklevel=3,
            )
        hidden = outputs[0]
        if not isinstance(hidden, Tensor):
            raise MiraiError(f"{self.location} returned {type(hidden).__name__}; the encoder target needs a tensor")
        return hidden.detach()

    def _wan_wrapper_call(self, video: Tensor, conditional_dict: dict, *, timestep: Tensor | None = None, **kwargs):
        b, f = _video_shape(video)
        if timestep is None:
            timestep = torch.zeros(b, f, dtype=torch.int64, device=video.device)  # clean rollout
        run = lambda: self._model(
            noisy_image_or_video=video, conditional_dict=conditional_dict, timestep=timestep, **kwargs
        )
        return run, token_count(self._model, f, *video.shape[-2:])

    def _wan_model_call(self, video: Tensor, context: Tensor | list, *, t: Tensor | None = None, **kwargs):
        b, f = _video_shape(video)
        tokens = token_count(self._model, f, *video.shape[-2:])
        if t is None:
            t = torch.zeros(b, dtype=torch.int64, device=video.device)
        x = list(video.permute(0, 2, 1, 3, 4))  # b x (c f h w), Wan's input layout
        seq_len = kwargs.pop("seq_len", tokens)
        run = lambda: self._model(x=x, t=t, context=context, seq_len=seq_len, **kwargs)
        return run, tokens

    def _diffusers_wan_call(
        self, latents: Tensor, encoder_hidden_states: Tensor, *, timestep: Tensor | None = None, **kwargs
    ):
        b, f = _video_shape(latents, layout="b c f h w")
        channels = getattr(getattr(unwrap(self._model), "config", None), "in_channels", None)
        if channels is not None and latents.shape[1] != channels:
            raise MiraiError(
                f"diffusers Wan takes latents (b c f h w) with c = in_channels = {channels}, got "
                f"{tuple(latents.shape)}; latents laid out (b f c h w) need latents.transpose(1, 2)"
            )
        if timestep is None:
            timestep = torch.zeros(b, dtype=torch.int64, device=latents.device)  # clean input
        run = lambda: self._model(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
            **kwargs,
        )
        return run, token_count(self._model, f, *latents.shape[-2:])


def _video_shape(video: Tensor, layout: str = "b f c h w") -> tuple[int, int]:
    """``(b, f)`` of a 5-d latent video laid out as ``layout``."""
    if not isinstance(video, Tensor) or video.dim() != 5:
        shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise MiraiError(f"the encoder expects a latent video ({layout}), got {shape}")
    return video.shape[0], video.shape[layout.split().index("f")]
