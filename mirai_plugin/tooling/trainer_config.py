"""A trainer's YAML config put into the form its trainer holds it in, which upstream it is for, and the
upstream's resolver on it (``mirai_plugin.integrations.resolve``): what ``config check``, ``flops`` and
``memory`` read.

- Self-Forcing / Causal-Forcing: their ``train.py`` merges the config over ``configs/default_config.yaml``
  (read from the folder it runs in); here the one in ``./configs/`` when there is one, else the one next
  to the config.
- LongLive 2.0: its ``train.py`` calls ``utils/config.py: normalize_config``; ``normalize_longlive``
  applies the same rules (sections flattened, the ``model:`` layout read into ``model_kwargs``, the DMD
  defaults, the role kwargs of an all-causal run).
- LlamaGen: ``train_c2i.py`` parses options; the YAML holds them by name (``mirai_layer`` or
  ``mirai-layer``), the parser's defaults fill the rest (``resolve_llamagen``).

Which upstream a config is for is given (``--upstream``) or detected, and the detection says how it was made:
Self-Forcing's layout is also Causal-Forcing's and Rolling Forcing's (``rolling-forcing``,
``causal-forcing-long-video``), so a flat config is a guess, and never read as Rolling Forcing's: that reader
takes ``--upstream``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirai_plugin.errors import MiraiError
from mirai_plugin.integrations.resolve import (
    LLAMAGEN_DEFAULTS,
    LONGLIVE_SECTIONS,
    ROLLING_UPSTREAMS,
    UPSTREAMS,
    ResolvedRun,
    resolve,
)

__all__ = ["Detection", "LoadedConfig", "detect", "load_trainer_config", "load_yaml", "normalize_longlive"]

# The trainer's keys only LongLive's configs have (besides its sections); our glue keys mark no upstream.
_LONGLIVE_FLAT = ("slice_last_frames", "min_num_training_frames", "sampling_steps", "adapter")
_LLAMAGEN_ONLY = ("mirai", "gpt_model", "code_path", "cls_token_num", "vocab_size", "image_size", "downsample_size",
                  "global_batch_size", "gpt_ckpt")


@dataclass(frozen=True)
class Detection:
    """Which upstream's reader applies, and how that was decided."""

    upstream: str
    how: str  # "given" (--upstream) or "detected"
    reason: str
    alternatives: tuple[str, ...] = ()

    def line(self) -> str:
        if self.how == "given":
            return f"upstream: {self.upstream} (--upstream {self.upstream})"
        text = f"upstream: {self.upstream} (detected: {self.reason})"
        if self.alternatives:
            text += (f"; it could also be {' or '.join(self.alternatives)}: pass --upstream "
                     f"{self.alternatives[0]} to choose")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.upstream, "how": self.how, "reason": self.reason, "alternatives": list(self.alternatives)}


@dataclass(frozen=True)
class LoadedConfig:
    """A config file in its trainer's form, the upstream it is read as, and what its resolver made of it."""

    path: Path
    detection: Detection
    config: Any
    resolved: ResolvedRun
    merged_over: Path | None = None


def load_yaml(path: str | Path) -> Any:
    """A trainer's YAML config as OmegaConf loads it."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        raise MiraiError("reading a YAML config needs omegaconf: pip install omegaconf") from None
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    file = Path(path)
    if not file.is_file():
        raise MiraiError(f"no such config file: {file}" if not file.exists() else f"{file} is not a file")
    try:
        config = OmegaConf.load(file)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as error:
        raise MiraiError(f"{file} is not a readable YAML config: {' '.join(str(error).split())}") from None
    if not hasattr(config, "keys"):
        raise MiraiError(f"{file} is not a trainer config: a YAML mapping of keys, got a list")
    return config


def detect(raw: Any) -> Detection:
    """The upstream a config (as written, before normalisation) is for, from its layout and keys."""
    keys = [key for key in raw.keys() if isinstance(key, str)]
    dashed = [key.replace("-", "_") for key in keys]
    llamagen = sorted({k for k in dashed if k in _LLAMAGEN_ONLY or (k.startswith("mirai_") and k in LLAMAGEN_DEFAULTS)})
    sections = [key for key in keys if key in LONGLIVE_SECTIONS and hasattr(raw[key], "keys")]
    if "model" in keys and hasattr(raw["model"], "keys"):
        sections.append("model")
    kwargs = raw.get("model_kwargs") if "model_kwargs" in keys else None
    name = kwargs.get("model_name") if hasattr(kwargs, "get") else None
    flat = [key for key in keys if key in _LONGLIVE_FLAT]
    longlive = []
    if sections:
        longlive.append(f"LongLive's sections {', '.join(sections)}")
    if isinstance(name, str) and name.startswith("Wan2.2"):
        longlive.append(f"model_kwargs.model_name: {name}")
    if flat:
        longlive.append(f"LongLive's keys {', '.join(flat)}")
    if llamagen:
        others = ("longlive",) if longlive else ()
        return Detection("llamagen", "detected", f"LlamaGen's train_c2i.py options {', '.join(llamagen)}", others)
    if longlive:
        return Detection("longlive", "detected", "; ".join(longlive))
    trainer = raw.get("trainer") if "trainer" in keys else None
    if trainer == "ode" or (trainer is None and raw.get("foresight_encoder_name") is not None):
        why = "trainer: ode" if trainer == "ode" else "foresight_encoder_name (no trainer key)"
        return Detection("causal-forcing-ode", "detected", f"a flat config (Self-Forcing's layout) with {why}: "
                         "Causal-Forcing's Stage-2 ODE trainer, the one ODE trainer patched")
    why = f"trainer: {trainer}" if trainer is not None else "no trainer key"
    return Detection(
        "self-forcing", "detected",
        f"a flat config, Self-Forcing's layout, {why}; Causal-Forcing's DMD configs look the same and are read by "
        f"the same rules; Rolling Forcing's and Causal-Forcing's long_video/ look the same too, with rolling "
        f"rollouts read by their own rules", ("causal-forcing", *ROLLING_UPSTREAMS))


def normalize_longlive(config: Any) -> Any:
    """``config`` (an OmegaConf ``DictConfig``, copied) as LongLive's ``normalize_config`` leaves it for the
    trainer. Keys nothing here reads (``wandb_host``, ``negative_prompt``) are not filled in."""
    from omegaconf import OmegaConf

    config = OmegaConf.create(OmegaConf.to_container(config))

    def set_once(key: str, value: Any, source: str) -> None:
        if value is None:
            return
        if key in config and config[key] != value:
            raise MiraiError(f"{key} is set twice with different values: {config[key]} and {value} from {source}; "
                             f"LongLive's normalize_config refuses it: keep one")
        config[key] = value

    for section in LONGLIVE_SECTIONS:
        values = config.get(section)
        if values is None:
            continue
        if not hasattr(values, "items"):
            raise MiraiError(f"LongLive's section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            config[key] = value
    evaluation = config.get("evaluation")
    if evaluation is not None:
        if "interval" in evaluation:
            set_once("generate_interval", evaluation.interval, "evaluation.interval")
            set_once("vis_interval", evaluation.interval, "evaluation.interval")
        if "num_frames" in evaluation:
            lengths = evaluation.num_frames
            if not isinstance(lengths, (list, tuple)):  # as upstream: a YAML list (a ListConfig) is not one
                try:
                    lengths = [int(lengths)]
                except (TypeError, ValueError):
                    raise MiraiError(f"evaluation.num_frames={lengths}: LongLive's normalize_config reads it as one "
                                     f"int (a YAML list fails there)") from None
            set_once("inference_num_frames", lengths[0] if lengths else 0, "evaluation.num_frames")
            set_once("vis_video_lengths", lengths, "evaluation.num_frames")
        if "use_ema" in evaluation:
            set_once("vis_ema", evaluation.use_ema, "evaluation.use_ema")

    model, kwargs = config.get("model"), OmegaConf.create({})
    if config.get("model_kwargs") is not None:
        kwargs = OmegaConf.merge(kwargs, config.model_kwargs)
    if model is not None:
        if model.get("kwargs") is not None:
            kwargs = OmegaConf.merge(kwargs, model.kwargs)
        if model.get("name") is not None:
            kwargs.model_name = config.model_name = model.name
        set_once("num_frame_per_block", model.get("num_frame_per_block"), "model.num_frame_per_block")
    for key in ("model_name", "timestep_shift"):
        if key in config and key not in kwargs:
            kwargs[key] = config[key]
    if "timestep_shift" in kwargs:
        set_once("timestep_shift", kwargs.timestep_shift, "model_kwargs.timestep_shift")
    set_once("num_frame_per_block", kwargs.get("num_frame_per_block"), "model_kwargs.num_frame_per_block")
    if len(kwargs) > 0:
        config.model_kwargs = kwargs

    if config.get("trainer") == "score_distillation":  # the DMD defaults
        for key, value in (("i2v", False), ("teacher_forcing", False), ("backward_simulation", True),
                           ("independent_first_frame", False), ("num_train_timestep", 1000),
                           ("denoising_loss_type", "flow"), ("real_guidance_scale", 3.0), ("fake_guidance_scale", 0.0)):
            if key not in config:
                config[key] = value
        if "causal" not in config:
            config.causal = bool(config.get("all_causal", True))
    if config.get("all_causal", False) and "model_kwargs" in config:  # one backbone for every role
        for key in ("real_model_kwargs", "fake_model_kwargs"):
            if config.get(key) is None:
                config[key] = OmegaConf.create(OmegaConf.to_container(config.model_kwargs, resolve=True))
    return config


def _default_config(path: Path) -> Path | None:
    """The ``default_config.yaml`` Self-Forcing's ``train.py`` would merge: ``./configs/`` (it reads it from the
    folder it runs in), else the one next to the config."""
    for base in (Path("configs") / "default_config.yaml", path.with_name("default_config.yaml")):
        if base.is_file() and base.resolve() != path.resolve():
            return base
    return None


def _llamagen_options(raw: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    options: dict[str, Any] = {}
    for key, value in OmegaConf.to_container(raw, resolve=True).items():  # type: ignore[union-attr]
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in options:
            raise MiraiError(f"option {dest} is given twice ({key!r}); keep one")
        options[dest] = value
    return options


def load_trainer_config(path: str | Path, *, upstream: str | None = None, stage: str | None = None,
                        defaults: bool = True) -> LoadedConfig:
    """``path`` read as its trainer reads it, by the resolver of ``upstream`` (detected when ``None``).

    ``stage`` (``"dmd"`` / ``"ode"``) picks the Self-Forcing-layout reader's stage; ``defaults=False`` reads a
    Self-Forcing-layout file without merging ``default_config.yaml``.
    """
    from omegaconf import OmegaConf

    file = Path(path)
    raw = load_yaml(file)
    if upstream is not None:
        if upstream not in UPSTREAMS:
            raise MiraiError(f"--upstream {upstream!r}: unknown; the readers are {', '.join(UPSTREAMS)} (the names "
                             f"`mirai-plugin patch` takes)")
        detection = Detection(upstream, "given", "--upstream")
    else:
        detection = detect(raw)
    name = detection.upstream
    if stage is not None:
        if name in ("longlive", "llamagen", *ROLLING_UPSTREAMS):
            raise MiraiError(f"--stage applies to the Self-Forcing layout (self-forcing, causal-forcing, "
                             f"causal-forcing-ode), not to {name}")
        wanted = "causal-forcing-ode" if stage == "ode" else ("self-forcing" if name == "causal-forcing-ode" else name)
        if detection.how == "given" and wanted != name:
            raise MiraiError(f"--stage {stage} disagrees with --upstream {name}: drop one")
        if wanted != name:
            detection = Detection(wanted, "detected", f"--stage {stage} ({detection.reason})",
                                  detection.alternatives if stage == "dmd" else ())
            name = wanted
    merged_over = None
    if name == "longlive":
        config = normalize_longlive(raw)
    elif name == "llamagen":
        config = _llamagen_options(raw)
    else:
        config = raw
        base = _default_config(file) if defaults else None
        if base is not None:
            config, merged_over = OmegaConf.merge(load_yaml(base), raw), base  # as train.py merges them
    try:
        resolved = resolve(name, config)
    except MiraiError as error:  # say which reader refused it: a detection can be wrong
        raise MiraiError(f"read as {name} ({'--upstream' if detection.how == 'given' else 'detected'}): "
                         f"{error}") from None
    return LoadedConfig(path=file, detection=detection, config=config, resolved=resolved, merged_over=merged_over)
