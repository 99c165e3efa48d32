"""What the plug-in's glue holds and sees inside a real run, recorded for the harnesses (record only: the
glue's calls and results are unchanged).

``watch_glue(model)`` returns a dict the harness stores under ``extra["glue"]``: the glue's class, the
``ForesightConfig`` it trains with (``config``), what its resolver made of the trainer's config
(``resolved``), the head's widths, and for every ``add_term`` call the shape of the video it got
(``videos``: ``[b, f, c, h, w]``), the generator's tokens per frame at that size (``tokens_per_frame``) and
the ``foresight_*`` values it logged (``logged``).

``dtypes`` holds what the head was handed and made, as dtype names, one entry per call (sets of the dtypes
seen): ``video`` (the rollout ``add_term`` got), ``captured`` (the generator states the head read),
``encoder_output`` (the targets' source), ``prediction`` (the predictor's output: its compute dtype),
``head_parameters``, and the replay cache's ``replay_hidden`` / ``replay_target``.

``head_calls`` holds, for every call of the head that builds a term (one per ``add_term``, or one per supervised
segment across a LongLive scene cut), the term (``term``, weighted), the unweighted loss (``loss``) and the
per-segment losses in the order of the segments the call got (``per_segment``): the head's own breakdown
(``return_breakdown=True``), asked for by the recorder; the term returned is the one the call computed.

``record_ema(trainer_module, events)`` records, each time the trainer builds or updates its ``EMA_FSDP``, the
hooks of this package present on the generator then.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from monkeypatch import patched


def watch_glue(model: Any) -> dict:
    glue = getattr(model, "foresight", None)
    record: dict[str, Any] = {"class": type(glue).__name__ if glue is not None else None}
    if glue is None:
        return record
    from mirai_plugin.wrappers import tokens_per_frame

    head = getattr(glue, "head", None)
    resolved = getattr(glue, "resolved", None)
    dtypes: dict[str, list[str]] = {key: [] for key in ("video", "captured", "encoder_output", "prediction",
                                                        "head_parameters", "replay_hidden", "replay_target")}
    record.update(config=glue.config.to_dict(), resolved=resolved.to_dict() if resolved is not None else None,
                  student_dim=getattr(head, "student_dim", None), encoder_dim=getattr(head, "encoder_dim", None),
                  videos=[], tokens_per_frame=[], logged=[], dtypes=dtypes, head_calls=[])
    add_term = glue.add_term

    @functools.wraps(add_term)
    def recorded(loss, log_dict, video, conditional_dict, *args, **kwargs):
        out = add_term(loss, log_dict, video, conditional_dict, *args, **kwargs)
        record["videos"].append(list(video.shape))
        record["tokens_per_frame"].append(tokens_per_frame(model.generator, *video.shape[-2:]))
        record["logged"].append({k: float(v) for k, v in log_dict.items() if k.startswith("foresight_")})
        dtypes["video"].append(str(video.dtype))
        return out

    glue.add_term = recorded
    if head is not None:
        _watch_head(head, dtypes)
        _watch_terms(head, record["head_calls"])
    return record


def _watch_terms(head: Any, calls: list[dict]) -> None:
    term = head._term

    @functools.wraps(term)
    def recorded(captured, encoder_hidden, tokens_per_frame, prefix_frames, return_breakdown):
        weighted, breakdown = term(captured, encoder_hidden, tokens_per_frame, prefix_frames, True)
        calls.append({"term": float(weighted), "loss": float(breakdown["foresight_loss_unweighted"]),
                      "per_segment": breakdown["per_segment"].float().tolist()})
        return (weighted, breakdown) if return_breakdown else weighted

    head._term = recorded


def _watch_head(head: Any, dtypes: dict[str, list[str]]) -> None:
    import torch

    def names(values) -> str:
        return ",".join(sorted({str(v.dtype) for v in values}))

    def before(module, args, kwargs):
        captured = args[0] if args else kwargs.get("captured")
        encoder_hidden = args[1] if len(args) > 1 else kwargs.get("encoder_hidden")
        if not isinstance(encoder_hidden, torch.Tensor):  # the head calling itself through its wrapper
            return
        states = [getattr(r, "hidden", r) for r in captured]  # CapturedHidden, records or tensors
        dtypes["captured"].append(names(states))
        dtypes["encoder_output"].append(str(encoder_hidden.dtype))
        dtypes["head_parameters"].append(names(module.parameters()))

    def predicted(module, args, output):
        dtypes["prediction"].append(str(output.dtype))

    head.register_forward_pre_hook(before, with_kwargs=True)
    last = head.project if head.project is not None else head.predictor
    last.register_forward_hook(predicted)
    add = head.replay_cache.add

    @functools.wraps(add)
    def add_recorded(*args, **kwargs):
        out = add(*args, **kwargs)
        batch = head.replay_cache.batches[-1]
        dtypes["replay_hidden"].append(str(batch.hidden.dtype))
        dtypes["replay_target"].append(str(batch.target.dtype))
        return out

    head.replay_cache.add = add_recorded


@contextlib.contextmanager
def record_ema(trainer_module: Any, events: list[dict]):
    """While active, the trainer module's ``EMA_FSDP`` records into ``events`` (record only: the EMA
    computes what it computes)."""
    ema_cls = getattr(trainer_module, "EMA_FSDP", None)
    if ema_cls is None:
        yield
        return

    def ours(fsdp_module) -> list[str]:
        found = []
        for name, sub in fsdp_module.named_modules():
            for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks):
                found += [f"{name}: {getattr(h, '__qualname__', h)}" for h in hooks.values()
                          if getattr(h, "__module__", "").startswith("mirai_plugin")]
        return found

    class RecordedEMA(ema_cls):
        def __init__(self, fsdp_module, *args, **kwargs):
            events.append({"event": "init", "mirai_hooks": ours(fsdp_module)})
            super().__init__(fsdp_module, *args, **kwargs)

        def update(self, fsdp_module):
            events.append({"event": "update", "mirai_hooks": ours(fsdp_module)})
            return super().update(fsdp_module)

    with patched(trainer_module, "EMA_FSDP", RecordedEMA):
        yield
