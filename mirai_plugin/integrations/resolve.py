"""One resolver per upstream: a trainer's config, as the trainer holds it, -> one ``ResolvedRun``.

The glues call their upstream's resolver at start-up; ``mirai-plugin config check``, ``flops`` and
``memory`` call the same resolver on a YAML file put into the form the trainer holds it in (merged
over ``default_config.yaml`` for Self-Forcing / Causal-Forcing, ``normalize_config``'d for LongLive;
``mirai_plugin.tooling.trainer_config``). So a config the glue would refuse at start-up is refused
before the run, and the tools count what the trainer runs.

Each rule below is the trainer's own (read from its code at the pinned commit) or the glue's:

- foresight keys only where the trainer reads them (top level); one inside another mapping, or a
  ``foresight:`` section of one's own, is refused ("move these keys to the top level");
- model names from ``WAN_MODELS`` / ``GPT_MODELS`` (an unknown name lists the known ones, never a
  default); ``student_layer`` < the generator's depth, ``encoder_layer`` < the encoder's;
- frame counts a whole number of blocks (the trainer asserts it), a DMD window of at least one frame,
  latents of at least one 2x2 patch;
- glue keys of another upstream or stage are refused, files named by glue keys must exist when the
  term is on.

>>> run = resolve_self_forcing({"foresight_weight": 0.2, "num_frame_per_block": 3, "real_name": "Wan2.1-T2V-14B"})
>>> run.upstream, run.stage, run.foresight.segment_frames, run.trainer.real_score, run.trainer.window_frames
('self-forcing', 'dmd', 3, 'Wan2.1-T2V-14B', 21)
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mirai_plugin.checks import Rule, check, did_you_mean, fail
from mirai_plugin.config import ForesightConfig
from mirai_plugin.errors import MiraiError
from mirai_plugin.image import ImageForesightConfig
from mirai_plugin.keys import GLUE_RULES, config_view, glue_value, looks_like_ours

__all__ = [
    "GPT_MODELS", "UPSTREAMS", "WAN_MODELS", "ModelShape", "ResolvedRun", "TokenRun", "VideoRun", "model_shape",
    "resolve", "resolve_llamagen", "resolve_longlive", "resolve_rolling_forcing", "resolve_self_forcing",
]

ROLLING_UPSTREAMS = ("rolling-forcing", "causal-forcing-long-video")  # one trainer (docs/rolling-forcing.md)
UPSTREAMS = ("self-forcing", "causal-forcing", "causal-forcing-ode", *ROLLING_UPSTREAMS, "longlive",
             "llamagen")  # the patch names


# ----------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class ModelShape:
    """A transformer's sizes: width, blocks, FFN width, attention heads."""

    name: str
    dim: int
    depth: int
    ffn_dim: int
    heads: int


WAN_MODELS = {m.name: m for m in (
    ModelShape("Wan2.1-T2V-1.3B", 1536, 30, 8960, 12),
    ModelShape("Wan2.1-T2V-14B", 5120, 40, 13824, 40),
    ModelShape("Wan2.2-TI2V-5B", 3072, 30, 14336, 24),  # LongLive 2.0
)}
# LlamaGen's autoregressive/models/gpt.py GPT_models (FFN: SwiGLU of 8/3 d, rounded; not needed here).
GPT_MODELS = {m.name: m for m in (
    ModelShape("GPT-B", 768, 12, 0, 12), ModelShape("GPT-L", 1024, 24, 0, 16), ModelShape("GPT-XL", 1280, 36, 0, 20),
    ModelShape("GPT-XXL", 1536, 48, 0, 24), ModelShape("GPT-XXXL", 2560, 48, 0, 40),
    ModelShape("GPT-1B", 2048, 22, 0, 32), ModelShape("GPT-3B", 3200, 24, 0, 32), ModelShape("GPT-7B", 4096, 32, 0, 32),
)}


def model_shape(name: Any, key: str, table: Mapping[str, ModelShape] = WAN_MODELS) -> ModelShape:
    """The sizes of the model ``name`` that config key ``key`` names; an unknown name lists the known ones.

    >>> model_shape("Wan2.1-T2V-14B", "real_name").depth
    40
    >>> model_shape("Wan2.2-T2V-A14B", "real_name")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mirai_plugin.errors.MiraiError: real_name: unknown model 'Wan2.2-T2V-A14B'; known: Wan2.1-T2V-1.3B, ...
    """
    if not isinstance(name, str) or name not in table:
        raise MiraiError(f"{key}: unknown model {name!r}; known: {', '.join(table)}")
    return table[name]


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True, kw_only=True)
class VideoRun:
    """What a video trainer runs (what ``flops`` and ``memory`` count). ``None``: the trainer does not have it
    (a Stage-2 ODE run has no critic and takes its frames from the data)."""

    generator: str
    real_score: str | None
    critic: str | None
    encoder: str  # the model whose block gives the targets
    frames: int | None  # latent frames of the longest rollout
    min_frames: int | None  # of the shortest (LongLive draws the length in [min, max] blocks)
    window_frames: int | None  # the DMD window: the rollout's last frames that DMD and the encoder see
    height: int | None  # latent; None: from the data (Stage-2 ODE)
    width: int | None
    tokens_per_frame: int | None
    frames_per_block: int
    attention_frames: int | None  # local attention window; None: every earlier frame
    denoising_steps: int | None
    critic_ratio: int | None  # dfake_gen_update_ratio
    checkpointing: bool
    lora: bool
    mixed_precision: bool
    sharding_strategy: str
    batch_per_rank: int
    accumulation_steps: int
    independent_first_frame: bool = False
    i2v: bool = False
    rolling_window_blocks: int | None = None  # Rolling Forcing: L, blocks of a full window (its denoising steps)
    rolling_share: float = 0.0  # the share of rollouts in rolling mode (the rest are self-forcing rollouts)


@dataclass(frozen=True, kw_only=True)
class TokenRun:
    """What LlamaGen's c2i trainer runs, as far as the term needs it."""

    gpt_model: str | None  # None: a model the trainer passed in (its sizes below)
    depth: int
    dim: int
    grid: int  # tokens per side
    prefix_tokens: int
    epochs: int
    steps_per_epoch: int | None  # None: from the data (len(loader)), known to the trainer only
    step_down_step: int | None


@dataclass(frozen=True, kw_only=True)
class ResolvedRun:
    """One trainer config resolved: what the glue builds and what the tools count.

    ``upstream`` is a patch name (``UPSTREAMS``), ``stage`` ``"dmd"``, ``"ode"`` or ``"c2i"``;
    ``foresight`` the term's settings; ``glue`` every glue key of the upstream with its default filled in;
    ``trainer`` what the trainer runs.
    """

    upstream: str
    stage: str
    foresight: ForesightConfig | ImageForesightConfig
    glue: Mapping[str, Any]
    trainer: VideoRun | TokenRun

    @property
    def enabled(self) -> bool:
        return self.foresight.enabled

    def to_dict(self) -> dict[str, Any]:
        return {"upstream": self.upstream, "stage": self.stage, "enabled": self.enabled,
                "config": self.foresight.to_dict(), "glue": dict(self.glue), "trainer": asdict(self.trainer)}


def resolve(upstream: str, args: Any, **kwargs: Any) -> ResolvedRun:
    """The resolver of ``upstream`` (a patch name) on ``args``, the config as the trainer holds it."""
    check("upstream", upstream, Rule("choice", choices=UPSTREAMS))
    if upstream == "longlive":
        return resolve_longlive(args, **kwargs)
    if upstream == "llamagen":
        return resolve_llamagen(args, **kwargs)
    if upstream in ROLLING_UPSTREAMS:
        return resolve_rolling_forcing(args, upstream=upstream, **kwargs)
    return resolve_self_forcing(args, "ode" if upstream == "causal-forcing-ode" else "dmd", upstream=upstream,
                                **kwargs)


# ----------------------------------------------------------------------------- reading


class _Reader:
    """Typed reads of a trainer config (a mapping or a namespace); ``None`` counts as absent."""

    def __init__(self, args: Any, caller: str) -> None:
        self.keys, self.raw = config_view(args, caller=caller)
        self.args = args

    def get(self, key: str, rule: Rule, default: Any = None) -> Any:
        value = self.raw(key)
        return default if value is None else check(key, value, rule, coerce=True)

    def sub(self, key: str) -> Mapping[str, Any]:
        """A nested mapping (``model_kwargs``), empty when absent."""
        value = self.raw(key)
        if value is None:
            return {}
        if not hasattr(value, "keys"):
            fail(key, "a mapping", value)
        return value


_INT1 = Rule("int", minimum=1)
_BOOL = Rule("bool")
_GLUE_DEFAULTS = {"foresight_head_sharding": "replicate"}
LONGLIVE_KEYS = ("foresight_encoder", "foresight_encoder_ckpt", "foresight_encoder_sharding", "foresight_scene_cut",
                 "foresight_window_first_block", "foresight_i2v_first_block")
ROLLING_KEYS = ("foresight_window_blocks", "foresight_window_first_block", "foresight_window_max_timestep")
ROLLING_SHARE = 0.5  # model/base.py draws the rolling or the self-forcing rollout with probability 1/2 each
ROLLING_ATTENTION = 21  # frames a call attends to at most, its own included (causal_model.py max_attention_size)
ODE_ENCODER = "Wan2.1-T2V-1.3B"
SF_WINDOW = 21  # Self-Forcing / Causal-Forcing's model/base.py keeps the rollout's last 21 frames for DMD
SF_MIN_FRAMES = 21  # ... and draws the rollout in [21, num_training_frames] frames


def _nested_keys(read: _Reader, flattened: Iterable[str], layout: str) -> None:
    """Foresight keys inside a mapping the trainer does not flatten would be ignored: refuse them."""
    skip = set(flattened)
    for section in read.keys:
        values = read.raw(section)
        if section in skip or not hasattr(values, "keys"):
            continue
        nested = [key for key in values if isinstance(key, str) and looks_like_ours(key)]
        if nested or looks_like_ours(section):
            raise MiraiError(
                f"foresight key(s) {nested or [section]} inside the {section!r} mapping: {layout} reads them only at "
                f"the top level, so they would be ignored; move these keys to the top level")


def _glue(read: _Reader, keys: Iterable[str], refused: Mapping[str, str]) -> dict[str, Any]:
    """The glue keys, checked, defaults filled; keys of another upstream or stage refused when set."""
    for key in GLUE_RULES:
        glue_value(read.args, key)  # every value checked, also of keys this upstream refuses
    for key, why in refused.items():
        if read.raw(key) is not None:
            raise MiraiError(f"{key} {why}: remove the key")
    return {key: glue_value(read.args, key, _GLUE_DEFAULTS.get(key)) for key in keys}


def _existing(path: str | None, key: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise MiraiError(f"{key}: no such file: {path} (a relative path is read from the folder the trainer runs in; "
                         f"check the config there)")


def _layers(config: ForesightConfig, generator: ModelShape, generator_key: str, encoder: ModelShape,
            encoder_key: str) -> None:
    for what, layer, model, key in (("foresight_student_layer", config.student_layer, generator, generator_key),
                                    ("foresight_teacher_layer", config.encoder_layer, encoder, encoder_key)):
        if layer >= model.depth:
            raise MiraiError(f"{what}={layer} is out of range: {model.name} ({key}) has {model.depth} blocks "
                             f"(0..{model.depth - 1}); the paper aligns the block at half depth ({model.depth // 2})")


def _latent_shape(read: _Reader, default: tuple[int, ...] | None) -> tuple[int, ...]:
    """``image_or_video_shape`` [batch, frames, channels, height, width]: ints >= 1, height and width >= 2
    (one 2x2 patch)."""
    shape = read.raw("image_or_video_shape")
    expected = "[batch, frames, channels, height, width]: five ints >= 1, height and width >= 2 (one 2x2 patch)"
    if shape is None:
        if default is None:
            fail("image_or_video_shape", expected, shape, "the trainer reads it")
        return default
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable) or len(list(shape)) != 5:
        fail("image_or_video_shape", expected, shape)
    values = tuple(check("image_or_video_shape", v, Rule("int", minimum=1, what=expected), coerce=True)
                   for v in shape)
    if min(values[3:]) < 2:
        fail("image_or_video_shape", expected, list(shape), "a latent has no token below 2x2")
    return values


def _steps(read: _Reader, sampling_steps: int | None) -> int | None:
    """Denoising steps of the rollout: ``sampling_steps`` (LongLive), else ``denoising_step_list`` without
    its trailing 0 (the training pipelines drop it)."""
    if sampling_steps is not None:
        return sampling_steps
    steps = read.raw("denoising_step_list")
    if steps is None:
        return None
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable) or not list(steps):
        fail("denoising_step_list", "a non-empty list of timesteps", steps)
    values = [check("denoising_step_list", v, Rule("int", minimum=0), coerce=True) for v in steps]
    return len(values) - (1 if values[-1] == 0 and len(values) > 1 else 0)


def _trainer_builds_the_glue(read: _Reader, upstream: str, wanted: tuple[str, str | None]) -> None:
    """``train.py`` builds its trainer from ``trainer`` (and DMD's model from ``distribution_loss``): a config for
    another trainer never builds this glue (its foresight keys would be ignored, its run is not this one)."""
    trainer, loss = read.raw("trainer"), read.raw("distribution_loss")
    if (trainer is not None and trainer != wanted[0]) or (wanted[1] and loss not in (None, wanted[1])):
        got = f"trainer: {trainer}" + (f", distribution_loss: {loss}" if wanted[1] and loss is not None else "")
        hooks = f"trainer: {wanted[0]}" + (f" with distribution_loss: {wanted[1]}" if wanted[1] else "")
        raise MiraiError(f"{got} never builds the {upstream} glue (it hooks {hooks}): foresight keys would be ignored "
                         f"and this reader does not describe that run; choose the reader of that trainer (--upstream)")


def _window_segments(config: ForesightConfig, window: int, block: int) -> None:
    """The term needs a segment with a target in the DMD window (else it would never train anything)."""
    segments = window // block
    if not any(k + d < segments for k in range(segments) for d in config.offsets):
        raise MiraiError(f"the DMD window of {window} frames holds {segments} whole block(s) of {block} frames: no "
                         f"segment has a target at offsets {config.offsets}, so the term would never train; use a "
                         f"longer window (slice_last_frames), shorter blocks or smaller offsets")


def _whole_blocks(frames: int, key: str, block: int, separate_first: bool) -> None:
    """The training pipelines assert the rollout is whole blocks (after a separate first frame)."""
    counted = frames - 1 if separate_first else frames
    if counted < 0 or counted % block:
        first = " after the independent first frame" if separate_first else ""
        plus = " plus 1" if separate_first else ""
        raise MiraiError(f"{key}={frames} is not a whole number of blocks of num_frame_per_block={block} "
                         f"frames{first}; the trainer asserts it: use a multiple of {block}{plus}")


# ----------------------------------------------------------------------------- Self-Forcing / Causal-Forcing


def resolve_self_forcing(args: Any, stage: str = "dmd", *, upstream: str | None = None) -> ResolvedRun:
    """Self-Forcing and Causal-Forcing (one layout): Stage 3 DMD (``stage="dmd"``) or Causal-Forcing's Stage 2
    ODE regression (``"ode"``), from the config as their ``train.py`` holds it (merged over
    ``configs/default_config.yaml``). Defaults are the trainer's own (``getattr`` defaults in ``model/``).

    Stage 2 defaults to ``fusion="frame_mean"`` (when neither ``foresight_fusion`` nor
    ``foresight_delta_mean_pool`` is set) and has no replay (every step is a generator step).
    """
    check("stage", stage, Rule("choice", choices=("dmd", "ode")))
    upstream = upstream or ("self-forcing" if stage == "dmd" else "causal-forcing-ode")
    rolling = upstream in ROLLING_UPSTREAMS
    if rolling and stage != "dmd":
        raise MiraiError(f"{upstream} is a DMD trainer (Rolling Forcing's); it has no {stage} stage")
    read = _Reader(args, "the foresight glue")
    _nested_keys(read, (), "Self-Forcing's train.py")
    config = ForesightConfig.from_upstream(args)
    _trainer_builds_the_glue(read, upstream, ("score_distillation", "dmd") if stage == "dmd" else ("ode", None))
    longlive_only = {key: "applies to LongLive 2.0's glue only" for key in LONGLIVE_KEYS if key not in ROLLING_KEYS}
    rolling_only = {key: f"applies to the glues of {', '.join(ROLLING_UPSTREAMS)}" + (
        " and LongLive 2.0" if key in LONGLIVE_KEYS else "") + " only (--upstream)" for key in ROLLING_KEYS}
    if not rolling:
        longlive_only.update(rolling_only)
    block = read.get("num_frame_per_block", _INT1, 1)
    config = config.replace(segment_frames=block)  # the trainer's default is 1 (model/dmd.py), not the recipe's 3
    generator_name = read.sub("model_kwargs").get("model_name", "Wan2.1-T2V-1.3B")
    generator = model_shape(generator_name, "model_kwargs.model_name")
    if stage == "dmd":
        _, _, _, height, width = _latent_shape(read, (1, 21, 16, 60, 104))  # Self-Forcing's shipped shape
        latent: dict[str, Any] = dict(height=height, width=width, tokens_per_frame=(height // 2) * (width // 2))
    else:  # the ODE trainer takes its latents' shape from the data
        latent = dict(height=None, width=None, tokens_per_frame=None)
    common = dict(
        generator=generator.name, **latent,
        frames_per_block=block, attention_frames=None, denoising_steps=_steps(read, None),
        checkpointing=read.get("gradient_checkpointing", _BOOL, True),
        lora=False, mixed_precision=read.get("mixed_precision", _BOOL, True),
        sharding_strategy=read.get("sharding_strategy", Rule("str"), "full"),
        batch_per_rank=read.get("batch_size", _INT1, 1), accumulation_steps=1,
        independent_first_frame=read.get("independent_first_frame", _BOOL, False), i2v=read.get("i2v", _BOOL, False),
    )
    if stage == "dmd":
        glue = _glue(read, ("foresight_head_sharding", "foresight_head_init", *(ROLLING_KEYS if rolling else ())), {
            "foresight_encoder_name": "applies to Stage 2 (ODE regression); Stage 3 (DMD) takes its targets from "
                                      "the real score the trainer already holds (real_name)", **longlive_only})
        real = model_shape(read.raw("real_name") or "Wan2.1-T2V-1.3B", "real_name")
        critic = model_shape(read.raw("fake_name") or "Wan2.1-T2V-1.3B", "fake_name")
        separate = common["independent_first_frame"]
        frames = read.get("num_training_frames", _INT1, 21)
        _whole_blocks(SF_MIN_FRAMES, "the shortest rollout (21 frames, model/base.py)", block, separate)
        _whole_blocks(frames, "num_training_frames", block, separate)
        if frames < SF_MIN_FRAMES:
            raise MiraiError(f"num_training_frames={frames}: the trainer draws the rollout in [21, "
                             f"num_training_frames] frames; use at least 21")
        if rolling:
            _rolling_window(glue, common["denoising_steps"], upstream)
        run = VideoRun(real_score=real.name, critic=critic.name, encoder=real.name, frames=frames,
                       min_frames=SF_MIN_FRAMES, window_frames=min(SF_WINDOW, frames),
                       critic_ratio=read.get("dfake_gen_update_ratio", _INT1, 5),
                       rolling_window_blocks=common["denoising_steps"] if rolling else None,
                       rolling_share=ROLLING_SHARE if rolling else 0.0,
                       **{**common, "attention_frames": ROLLING_ATTENTION if rolling else None})
        encoder, encoder_key = real, "real_name"
    else:
        glue = _glue(read, ("foresight_head_sharding", "foresight_head_init", "foresight_encoder_name"),
                     longlive_only)
        glue["foresight_encoder_name"] = glue["foresight_encoder_name"] or ODE_ENCODER
        encoder, encoder_key = model_shape(glue["foresight_encoder_name"], "foresight_encoder_name"), \
            "foresight_encoder_name"
        raw = read.raw
        if raw("foresight_fusion") is None and raw("foresight_delta_mean_pool") is None:
            config = config.replace(fusion="frame_mean")  # the paper's best Stage-2 target
        config = config.replace(replay=False)
        run = VideoRun(real_score=None, critic=None, encoder=encoder.name, frames=None, min_frames=None,
                       window_frames=None, critic_ratio=None, **common)
    if config.enabled:
        _layers(config, generator, "model_kwargs.model_name", encoder, encoder_key)
        if run.window_frames is not None:
            _window_segments(config, run.window_frames, block)
        _existing(glue["foresight_head_init"], "foresight_head_init")
        if glue["foresight_head_sharding"] == "fsdp":
            check("sharding_strategy", run.sharding_strategy, Rule("choice", choices=FSDP_STRATEGIES))
        if rolling and glue["foresight_window_blocks"] != "all" and glue["foresight_head_sharding"] != "replicate":
            raise MiraiError(
                f"foresight_window_blocks: {glue['foresight_window_blocks']} supervises a number of blocks that "
                f"depends on each rank's exit_flag, which a {glue['foresight_head_sharding']} head cannot replay "
                f"(its ranks need equal backward counts): use foresight_head_sharding: replicate, or "
                f"foresight_window_blocks: all (docs/rolling-forcing.md)")
    return ResolvedRun(upstream=upstream, stage=stage, foresight=config, glue=types.MappingProxyType(glue), trainer=run)


def resolve_rolling_forcing(args: Any, *, upstream: str = "rolling-forcing") -> ResolvedRun:
    """Rolling Forcing and Causal-Forcing's ``long_video/`` (one DMD trainer, Self-Forcing's config layout),
    from the config as their ``train.py`` holds it (merged over ``configs/default_config.yaml``).

    Self-Forcing's rules (``resolve_self_forcing``), plus: L, the blocks of a full rolling window, is the
    number of denoising steps (``denoising_step_list``, which must be set); ``foresight_window_blocks``
    (``all``), ``foresight_window_first_block`` (``as_dmd``) and ``foresight_window_max_timestep`` (needed by
    ``noise_below`` and only there); ``last`` and ``noise_below`` need a replicated head.

    >>> run = resolve_rolling_forcing({"foresight_weight": 0.2, "num_frame_per_block": 3,
    ...                                "denoising_step_list": [1000, 800, 600, 400, 200]})
    >>> run.trainer.rolling_window_blocks, run.glue["foresight_window_blocks"], run.glue["foresight_window_first_block"]
    (5, 'all', 'as_dmd')
    """
    check("upstream", upstream, Rule("choice", choices=ROLLING_UPSTREAMS))
    return resolve_self_forcing(args, "dmd", upstream=upstream)


def _rolling_window(glue: dict[str, Any], steps: int | None, upstream: str) -> None:
    """Rolling Forcing's own rules, and the window keys' defaults."""
    if steps is None:
        raise MiraiError(f"denoising_step_list is not set: {upstream}'s rolling window holds one block per denoising "
                         f"step (the shipped configs set 1000, 800, 600, 400, 200 or 1000, 750, 500, 250)")
    glue["foresight_window_blocks"] = glue["foresight_window_blocks"] or "all"
    glue["foresight_window_first_block"] = glue["foresight_window_first_block"] or "as_dmd"
    threshold = glue["foresight_window_max_timestep"]
    if glue["foresight_window_blocks"] == "noise_below" and threshold is None:
        raise MiraiError("foresight_window_blocks: noise_below keeps the blocks at or under a timestep: set "
                         "foresight_window_max_timestep (e.g. 400), or choose all or last")
    if glue["foresight_window_blocks"] != "noise_below" and threshold is not None:
        raise MiraiError(f"foresight_window_max_timestep only acts with foresight_window_blocks: noise_below (it is "
                         f"{glue['foresight_window_blocks']}): remove the key, or set noise_below")


FSDP_STRATEGIES = ("full", "hybrid_full", "hybrid_zero2", "no_shard")  # the trainers' fsdp_wrap names


# ----------------------------------------------------------------------------- LongLive 2.0


# The sections LongLive's `normalize_config` flattens to the top level (utils/config.py SECTION_KEYS).
LONGLIVE_SECTIONS = ("infra", "algorithm", "training", "data", "evaluation", "inference", "logging", "checkpoints")
LONGLIVE_ENCODERS = ("bidirectional", "causal_real_score")


def _section_get(read: _Reader, section: str, key: str, default: Any, aliases: tuple[str, ...] = ()) -> Any:
    """LongLive's ``utils/config.py: section_get``: the section's value, else the flat one, else ``default``."""
    values = read.raw(section)
    for candidate in (key, *aliases):
        if values is not None and candidate in values:
            return values[candidate]
    for candidate in (key, *aliases):
        if candidate in read.keys:
            return read.raw(candidate)
    return default


def resolve_longlive(args: Any) -> ResolvedRun:
    """LongLive 2.0 DMD, from the config as its ``train.py`` holds it (``normalize_config``'d: sections
    flattened, ``model:`` read into ``model_kwargs``). Defaults are the trainer's (``model/dmd.py``,
    ``model/base.py``: 21-frame rollouts and window, 1-frame blocks when unset)."""
    read = _Reader(args, "the foresight glue")
    _nested_keys(read, LONGLIVE_SECTIONS, "LongLive's normalize_config (it flattens only "
                                          f"{', '.join(LONGLIVE_SECTIONS)})")
    _trainer_builds_the_glue(read, "longlive", ("score_distillation", "dmd"))
    config = ForesightConfig.from_upstream(args)
    glue = _glue(read, ("foresight_head_sharding", "foresight_head_init", *LONGLIVE_KEYS), {
        "foresight_encoder_name": "is for Stage 2 (ODE); LongLive takes foresight_encoder "
                                  f"({' or '.join(LONGLIVE_ENCODERS)}) and foresight_encoder_ckpt",
        **{key: f"applies to the glues of {', '.join(ROLLING_UPSTREAMS)} only" for key in ROLLING_KEYS
           if key not in LONGLIVE_KEYS}})
    for key, default in (("foresight_encoder", "bidirectional"), ("foresight_encoder_sharding", "fsdp"),
                         ("foresight_scene_cut", "mask"), ("foresight_window_first_block", "as_dmd"),
                         ("foresight_i2v_first_block", "supervise")):
        glue[key] = glue[key] or default
    kwargs = read.sub("model_kwargs")
    name = kwargs.get("model_name")
    if name is None:
        raise MiraiError("model_kwargs.model_name (or model.name) is not set: LongLive's trainer reads it; set it to "
                         "Wan2.2-TI2V-5B")
    generator = model_shape(name, "model_kwargs.model_name")

    def role(kwargs_key: str, name_key: str) -> ModelShape:
        role_kwargs = read.raw(kwargs_key)  # model/base.py: `<role>_model_kwargs`, else {"model_name": <role>_name}
        if role_kwargs is not None:
            return model_shape(role_kwargs.get("model_name", "Wan2.2-TI2V-5B"), f"{kwargs_key}.model_name")
        return model_shape(read.raw(name_key) or "Wan2.2-TI2V-5B", name_key)

    real, critic = role("real_model_kwargs", "real_name"), role("fake_model_kwargs", "fake_name")
    block = read.get("num_frame_per_block", _INT1, 1)
    config = config.replace(segment_frames=block)
    i2v, independent = read.get("i2v", _BOOL, False), read.get("independent_first_frame", _BOOL, False)
    separate = independent and not i2v  # model/base.py: a first frame of its own, then whole blocks
    frames = read.get("num_training_frames", _INT1, 21)
    minimum = read.get("min_num_training_frames", _INT1, 21)
    _whole_blocks(frames, "num_training_frames", block, separate)
    _whole_blocks(minimum, "min_num_training_frames", block, separate)
    if minimum > frames:
        raise MiraiError(f"min_num_training_frames={minimum} > num_training_frames={frames}: the rollout length is "
                         f"drawn between them")
    batch, shape_frames, _, height, width = _latent_shape(read, None)
    if shape_frames < frames:
        raise MiraiError(f"image_or_video_shape[1]={shape_frames} < num_training_frames={frames}: the trainer asserts "
                         f"the dataset provides prompts for the whole rollout")
    window = read.get("slice_last_frames", Rule("int", minimum=-1, what="-1 (the whole rollout) or an int >= 1"), 21)
    if window == 0:
        fail("slice_last_frames", "-1 (the whole rollout) or an int >= 1", 0, "a DMD window of 0 frames trains nothing")
    local = _section_get(read, "inference", "local_attn_size", kwargs.get("local_attn_size", -1),
                         aliases=("inference_local_attn_size",))
    local = check("local_attn_size", local, Rule("int", minimum=-1, what="-1 (global) or an int >= 1"), coerce=True)
    if local == 0:
        fail("local_attn_size", "-1 (global attention) or an int >= 1", 0)
    sampling = read.get("sampling_steps", _INT1)
    steps = _steps(read, sampling)
    if steps is None:
        raise MiraiError("neither sampling_steps nor denoising_step_list is set: LongLive's training pipeline needs "
                         "one (the shipped configs set inference.sampling_steps: 4)")
    adapter = read.raw("adapter")
    if adapter is not None and adapter.get("type", "lora") != "lora":
        raise MiraiError(f"adapter.type={adapter.get('type')!r}: LongLive implements only 'lora'")
    encoder = generator if glue["foresight_encoder"] == "bidirectional" else real
    run = VideoRun(
        generator=generator.name, real_score=real.name, critic=critic.name, encoder=encoder.name, frames=frames,
        min_frames=minimum, window_frames=frames if window == -1 else min(window, frames), height=height,
        width=width, tokens_per_frame=height * width // 4,  # the pipeline's frame_seq_length
        frames_per_block=block, attention_frames=None if local == -1 else local, denoising_steps=steps,
        critic_ratio=read.get("dfake_gen_update_ratio", _INT1, 5),
        checkpointing=read.get("gradient_checkpointing", _BOOL, True), lora=adapter is not None,
        mixed_precision=read.get("mixed_precision", _BOOL, True),
        sharding_strategy=read.get("sharding_strategy", Rule("str"), "full"),
        batch_per_rank=read.get("batch_size", _INT1, batch),
        accumulation_steps=read.get("gradient_accumulation_steps", _INT1, 1),
        independent_first_frame=independent, i2v=i2v,
    )
    if config.enabled:
        _layers(config, generator, "model_kwargs.model_name", encoder,
                "model_kwargs.model_name" if encoder is generator else "real score")
        assert run.window_frames is not None
        _window_segments(config, run.window_frames, block)
        _existing(glue["foresight_head_init"], "foresight_head_init")
        if separate:
            raise MiraiError("independent_first_frame without i2v gives a 1-frame first block, which the LongLive glue "
                             "does not place in segments; set independent_first_frame: false, or i2v: true")
        if glue["foresight_encoder"] == "bidirectional":
            if glue["foresight_encoder_ckpt"] is None:
                raise MiraiError(
                    "foresight_encoder: bidirectional (the default, the paper's method) needs foresight_encoder_ckpt: "
                    "the weights of a bidirectional Wan2.2-TI2V-5B (the base model LongLive distils from). Options: "
                    "set foresight_encoder_ckpt: PATH; or foresight_encoder: causal_real_score to use LongLive's "
                    "causal real score (no extra memory; the paper's weaker causal-encoder ablation, offset 0 then "
                    "sees no future); or foresight_weight: 0 to turn the term off. See docs/longlive.md")
            _existing(glue["foresight_encoder_ckpt"], "foresight_encoder_ckpt")
        if "fsdp" in (glue["foresight_head_sharding"], glue["foresight_encoder_sharding"]):
            check("sharding_strategy", run.sharding_strategy, Rule("choice", choices=FSDP_STRATEGIES))
    return ResolvedRun(upstream="longlive", stage="dmd", foresight=config, glue=types.MappingProxyType(glue),
                       trainer=run)


# ----------------------------------------------------------------------------- LlamaGen


# train_c2i.py's parser defaults that the term reads, and the --mirai* options (add_mirai_arguments).
LLAMAGEN_DEFAULTS = {
    "gpt_model": "GPT-B", "cls_token_num": 1, "image_size": 256, "downsample_size": 16, "epochs": 300, "lr": 1e-4,
    "weight_decay": 5e-2, "beta1": 0.9, "beta2": 0.95, "max_grad_norm": 1.0,
    "mirai": "none", "mirai_layer": 7, "mirai_neighbours": None, "mirai_order": "grid", "mirai_border": "raster",
    "mirai_weight": 2.0, "mirai_weight_after": 1.0, "mirai_step_down": 0.5, "mirai_warmup_steps": 0,
    "mirai_ema_decay": 0.9999, "mirai_projector_dim": 2048, "mirai_encoder": "dinov2_vitb14", "mirai_vq_model": "VQ-16",
    "mirai_vq_ckpt": None,
}


def resolve_llamagen(args: Any, *, model: Any = None, steps_per_epoch: int | None = None) -> ResolvedRun:
    """LlamaGen's ``train_c2i.py`` (``--mirai E`` or ``I``), from its parsed arguments (or a mapping of them).

    ``model``: the GPT the trainer built (its depth, width, token grid and class-token prefix); without it
    they come from ``--gpt-model``, ``--image-size`` / ``--downsample-size`` and ``--cls-token-num``.
    ``steps_per_epoch``: the trainer's ``len(loader)``; lambda steps down after ``--mirai-step-down`` of
    ``--epochs`` x ``steps_per_epoch`` steps (without it the step is left open: ``weight_changes`` empty).
    """
    read = _Reader(args, "the Mirai glue")
    _nested_keys(read, (), "LlamaGen's argument parser")

    def arg(key: str) -> Any:
        value = read.raw(key)
        return LLAMAGEN_DEFAULTS[key] if value is None and key in LLAMAGEN_DEFAULTS else value

    unknown = [key for key in read.keys if key.startswith("mirai") and key not in LLAMAGEN_DEFAULTS]
    if unknown:  # the parser refuses them; a mapping read here must too
        known = [key for key in LLAMAGEN_DEFAULTS if key.startswith("mirai")]
        raise MiraiError(f"unknown Mirai option(s) {unknown}" + did_you_mean(unknown[0], known).replace(
            " (", "; ").rstrip(")") + f"; the options are {', '.join(known)}")
    mirai = check("mirai", arg("mirai"), Rule("choice", choices=("none", "E", "I")))
    if model is not None:
        run_model, depth, dim = None, len(model.layers), int(model.config.dim)
        grid, prefix = round(math.sqrt(model.block_size)), int(model.cls_token_num)
    else:
        shape = model_shape(arg("gpt_model"), "--gpt-model", GPT_MODELS)
        run_model, depth, dim = shape.name, shape.depth, shape.dim
        grid = check("image_size", arg("image_size"), _INT1, coerce=True) // check(
            "downsample_size", arg("downsample_size"), _INT1, coerce=True)
        prefix = check("cls_token_num", arg("cls_token_num"), _INT1, coerce=True)
    epochs = check("epochs", arg("epochs"), _INT1, coerce=True)
    if steps_per_epoch is not None:
        steps_per_epoch = max(1, check("steps_per_epoch", steps_per_epoch, Rule("int", minimum=0)))
    step_down = check("mirai_step_down", arg("mirai_step_down"), Rule("number", minimum=0), coerce=True)
    down = int(epochs * steps_per_epoch * step_down) if steps_per_epoch is not None else None
    foresight = ImageForesightConfig(
        source="ema" if mirai == "E" else "encoder",
        student_layer=check("mirai_layer", arg("mirai_layer"), Rule("int", minimum=0), coerce=True),
        neighbours=arg("mirai_neighbours"), order=arg("mirai_order"), border=arg("mirai_border"),
        prefix_tokens=prefix, projector_dim=arg("mirai_projector_dim"),
        weight=arg("mirai_weight") if mirai != "none" else 0.0,
        weight_changes=((down, arg("mirai_weight_after")),) if down is not None else (),
        weight_start=arg("mirai_warmup_steps"), ema_decay=arg("mirai_ema_decay"), lr=arg("lr"),
        betas=(arg("beta1"), arg("beta2")), weight_decay=arg("weight_decay"),
        max_grad_norm=arg("max_grad_norm") or None,
    )
    glue = {key: arg(key) for key in ("mirai", "mirai_encoder", "mirai_vq_model", "mirai_vq_ckpt")}
    if mirai == "I":
        if not glue["mirai_vq_ckpt"]:
            raise MiraiError("--mirai I decodes the codes to images: pass --mirai-vq-ckpt (the tokenizer that made "
                             "them)")
        _existing(glue["mirai_vq_ckpt"], "--mirai-vq-ckpt")
        if not str(glue["mirai_encoder"]).startswith("dinov2"):
            _existing(glue["mirai_encoder"], "--mirai-encoder")
    if mirai != "none":
        if foresight.student_layer >= depth:
            raise MiraiError(f"--mirai-layer {foresight.student_layer} is out of range: the GPT "
                             f"({run_model or 'the model built'}) has {depth} layers (0..{depth - 1})")
    run = TokenRun(gpt_model=run_model, depth=depth, dim=dim, grid=grid, prefix_tokens=prefix, epochs=epochs,
                   steps_per_epoch=steps_per_epoch, step_down_step=down)
    return ResolvedRun(upstream="llamagen", stage="c2i", foresight=foresight, glue=types.MappingProxyType(glue),
                       trainer=run)

