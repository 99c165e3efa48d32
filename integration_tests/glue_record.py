"""What the plug-in's glue holds and sees inside a real run, recorded for the harnesses (record only: the
glue's calls and results are unchanged).

``watch_glue(model)`` returns a dict the harness stores under ``extra["glue"]``: the glue's class, the
``ForesightConfig`` it trains with (``config``), what its resolver made of the trainer's config
(``resolved``), the head's widths, and for every ``add_term`` call the shape of the video it got
(``videos``: ``[b, f, c, h, w]``), the generator's tokens per frame at that size (``tokens_per_frame``) and
the ``foresight_*`` values it logged (``logged``).
"""

from __future__ import annotations

import functools
from typing import Any


def watch_glue(model: Any) -> dict:
    glue = getattr(model, "foresight", None)
    record: dict[str, Any] = {"class": type(glue).__name__ if glue is not None else None}
    if glue is None:
        return record
    from mirai_plugin.wrappers import tokens_per_frame

    head = getattr(glue, "head", None)
    resolved = getattr(glue, "resolved", None)
    record.update(config=glue.config.to_dict(), resolved=resolved.to_dict() if resolved is not None else None,
                  student_dim=getattr(head, "student_dim", None), encoder_dim=getattr(head, "encoder_dim", None),
                  videos=[], tokens_per_frame=[], logged=[])
    add_term = glue.add_term

    @functools.wraps(add_term)
    def recorded(loss, log_dict, video, conditional_dict, *args, **kwargs):
        out = add_term(loss, log_dict, video, conditional_dict, *args, **kwargs)
        record["videos"].append(list(video.shape))
        record["tokens_per_frame"].append(tokens_per_frame(model.generator, *video.shape[-2:]))
        record["logged"].append({k: float(v) for k, v in log_dict.items() if k.startswith("foresight_")})
        return out

    glue.add_term = recorded
    return record
