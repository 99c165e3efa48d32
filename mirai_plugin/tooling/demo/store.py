"""Where the demo's models are kept: shipped with the package, or in a local cache, under their key.

``tools/train_demo_models.py`` writes the shipped ones to ``weights/registration-<N>``; each
file records the key of the settings and the code that produced it (``pretrained.models_key``)
and its training log. The demo uses the shipped files whose key matches, else the local cache
(``~/.cache/mirai-plugin/demo/<key>``, or ``MIRAI_DEMO_CACHE``), else trains the models there
when asked (``--train-models``), and otherwise says what it would train and stops.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from mirai_plugin.errors import MiraiError
from mirai_plugin.tooling.demo.pretrained import NAMES, Models, ModelSettings, models_key, state_copy, train_models
from mirai_plugin.tooling.demo.progress import Progress

SHIPPED = Path(__file__).parent / "weights"


def save_models(folder: Path, settings: ModelSettings, models: Models) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        metadata = {"key": models_key(settings), "settings": json.dumps(asdict(settings), sort_keys=True),
                    "training": json.dumps(models.training.get(name, {}))}
        save_file(state_copy(getattr(models, name)), folder / f"{name}.safetensors", metadata=metadata)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def stored_key(folder: Path) -> str | None:
    """The key recorded in ``folder``'s files, or None when they are missing or disagree."""
    keys = set()
    for name in NAMES:
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        keys.add(_metadata(path).get("key"))
    return keys.pop() if len(keys) == 1 else None


def training_logs(folder: Path) -> dict[str, dict]:
    """Each model's training log as recorded in ``folder``'s files (empty for files written without one)."""
    return {name: json.loads(_metadata(folder / f"{name}.safetensors").get("training") or "{}") for name in NAMES}


def load_models(folder: Path, settings: ModelSettings, source: str) -> Models:
    models = Models(settings.teacher(), settings.base(), settings.student(), source)
    for name in NAMES:
        getattr(models, name).load_state_dict(load_file(folder / f"{name}.safetensors"), strict=True)
    models.teacher.eval().requires_grad_(False)
    models.base.eval().requires_grad_(False)
    models.student.eval()
    models.training = training_logs(folder)
    return models


def cache_folder(settings: ModelSettings) -> Path:
    root = Path(os.environ.get("MIRAI_DEMO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "mirai-plugin" / "demo")
    return root / models_key(settings)


def shipped_folder(settings: ModelSettings) -> Path | None:
    """The shipped folder whose files carry ``settings``' key, if any."""
    key = models_key(settings)
    folders = sorted(p for p in SHIPPED.iterdir() if p.is_dir()) if SHIPPED.is_dir() else []
    return next((folder for folder in folders if stored_key(folder) == key), None)


def training_cost(settings: ModelSettings) -> str:
    """What training these models costs, from the shipped models trained under the same schedule."""
    folders = sorted(p for p in SHIPPED.iterdir() if p.is_dir()) if SHIPPED.is_dir() else []
    for folder in reversed(folders):
        logs = training_logs(folder) if stored_key(folder) else {}
        if logs and all(log.get("schedule") == settings.schedule and "seconds" in log for log in logs.values()):
            cpu = sum(log["seconds"] for log in logs.values())
            slowest = max(log["seconds"] for log in logs.values())
            return (f"the shipped models of {folder.name} took {cpu / 3600:.1f} CPU-hours "
                    f"(the longest model {slowest / 3600:.1f} hours; three models, one core each)")
    caps = sum(settings.steps(name) for name in NAMES)
    return f"up to {caps} training steps in all (about 0.1-0.3 s per step on one core)"


def obtain_models(settings: ModelSettings, progress: Progress, *, workers: int | None = None,
                  train: bool = False) -> Models:
    """The shipped models when they match ``settings`` and this code, else the local cache, else (with ``train``)
    train them, ``workers`` at a time (default: one per CPU), and fill the cache."""
    key = models_key(settings)
    shipped = shipped_folder(settings)
    if shipped is not None:
        return load_models(shipped, settings, f"shipped with the package ({shipped.name}, key {key})")
    cached = cache_folder(settings)
    if stored_key(cached) == key:
        return load_models(cached, settings, f"local cache {cached}")
    if not train:
        raise MiraiError(
            f"no models for these settings and this code (key {key}) are shipped or cached in {cached}; training "
            f"them takes hours ({training_cost(settings)}): run `mirai-plugin demo --train-models` to train them")
    began = time.perf_counter()
    models = train_models(settings, progress, workers=workers or os.cpu_count() or 1)
    save_models(cached, settings, models)
    models.source = f"trained now in {time.perf_counter() - began:.0f}s (key {key}), cached in {cached}"
    return models

