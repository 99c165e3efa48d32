"""Helpers for trainers built on diffusers' ``WanTransformer3DModel``.

Legend: b batch, c channels, f latent frames, h/w latent height/width,
s tokens per latent frame, p_t/p_h/p_w the transformer's patch size.

The rest needs no glue: ``capture_hidden`` finds ``transformer.blocks`` (through
DDP, FSDP, ``torch.compile``, PEFT), and ``FrozenEncoder`` detects the diffusers
Wan call (``encoder(latents, prompt_embeds)`` with ``latents`` ``(b c f h w)``).
What a diffusers trainer must add is the token count of a latent frame, because
one captured call often covers several segments (a teacher-forcing forward over
the whole video, or a block-causal mask) and the head then cannot infer it.

diffusers itself is never imported: the helpers read ``config.patch_size``.
"""

from __future__ import annotations

from torch import Tensor, nn

from mirai_plugin.errors import MiraiError
from mirai_plugin.wrappers import declared_patch_size, tokens_per_frame, wrapper_chain

__all__ = ["wan_tokens_per_frame"]


def wan_tokens_per_frame(transformer: nn.Module, latents: Tensor) -> int:
    """Tokens ``s = (h/p_h) * (w/p_w)`` that ``transformer`` makes of one latent frame.

    Pass it to the head as ``head(captured, z, tokens_per_frame=s)``; with it the
    head splits each captured call into segments of ``segment_frames * s`` tokens,
    so one call may cover the whole video or one segment (segments then follow
    call order).

    Args:
        transformer: a diffusers Wan transformer, bare or wrapped (DDP, FSDP,
            ``torch.compile``, PEFT), or any model with a 3-d ``patch_size``; a model
            that declares none, or another kind, is refused.
        latents: ``(b c f h w)`` (diffusers) or ``(b f c h w)``: only ``h, w`` are read.

    Example:
        >>> import torch, types
        >>> transformer = torch.nn.Module()
        >>> transformer.config = types.SimpleNamespace(patch_size=(1, 2, 2))  # as diffusers stores it
        >>> wan_tokens_per_frame(transformer, torch.zeros(1, 16, 21, 60, 104))
        1560
    """
    if not isinstance(latents, Tensor) or latents.dim() != 5:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise MiraiError(f"wan_tokens_per_frame needs the 5-d latents (b c f h w) the transformer takes, got {shape}")
    h, w = latents.shape[-2:]
    fix = "pass the head tokens_per_frame= (the tokens the model makes of one latent frame) yourself"
    declared = declared_patch_size(transformer, fix=fix)
    if declared is None:
        chain = " -> ".join(path for _, path in wrapper_chain(transformer, containers=True))
        raise MiraiError(
            f"{chain} declares no patch size (config.patch_size or patch_size): not a Wan transformer; {fix}"
        )
    p_t, p_h, p_w = declared
    if h == 0 or w == 0:
        raise MiraiError(f"latents of shape {tuple(latents.shape)} have no pixels (height x width {h}x{w})")
    if p_t != 1:
        raise MiraiError(
            f"the transformer patches {p_t} latent frames into one token frame; count segment_frames in "
            f"token frames and pass tokens_per_frame={(h // p_h) * (w // p_w)} yourself"
        )
    return tokens_per_frame(transformer, h, w)
