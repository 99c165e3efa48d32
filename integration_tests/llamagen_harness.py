"""Run LlamaGen's real class-conditional trainer (``autoregressive/train/train_c2i.py``, ``main(args)``) on a CPU
with a tiny GPT and a small in-memory dataset of random image codes, for a fixed number of iterations, and
record what it trains.

Nothing from the checkout is copied here: the checkout is imported from its own directory and every
workaround is a monkeypatch applied from outside, for the duration of one run, with a comment saying why.
The trainer's arguments come from its own ``argparse`` parser (the ``__main__`` block of ``train_c2i.py``,
run up to ``parse_args``), so options a patch adds to it (``--mirai-...``) pass through unchanged. Point
``--checkout`` at a *copy* of a checkout (patched or not); files under it are never edited.

Usage::

    python integration_tests/llamagen_harness.py --checkout DIR --steps N --out OUTDIR [--overrides JSON] \\
        [--args "TRAIN_C2I ARGS"] [--model JSON] [--data JSON] [--grad-probe] [--threads 1] [-- TRAIN_C2I ARGS]
    torchrun --nproc_per_node 2 integration_tests/llamagen_harness.py ...        # same arguments (gloo)

``--overrides`` is a JSON object of ``train_c2i.py`` options keyed by dest or by flag
(``{"ema": false, "lr": 0.001, "--mixed-precision": "bf16"}``): merged over the tiny-run defaults
(``TINY_ARGS``), then turned into command-line flags with the parser's own option strings (a
``store_true`` option is given for ``true`` and left out for ``false``; ``null`` leaves an option at its
default). ``--args`` (use ``--args="..."``: the value starts with ``--``) and everything after a bare
``--`` are raw ``train_c2i.py`` arguments appended after those, unchanged. The parser rejects unknown
options, as upstream. ``--model`` sets the tiny GPT (``ModelArgs`` fields, see ``TINY_MODEL``),
``--data`` the synthetic dataset (``{"num_images": 16, "seed": 0}``; ``"flip": false`` stores the images
only, so the augmentation the trainer draws per item always picks the image and the data do not depend on
the rank's seed).

API (the same, from Python; one checkout per process: its top-level package names ``utils``, ``dataset``,
``autoregressive`` are generic)::

    run_training(checkout, *, steps, out, overrides=None, args=(), model=None, data=None,
                 grad_probe=False, threads=1) -> dict | None      # the result on rank 0, None elsewhere
    load_result(out) -> dict

``OUTDIR/result.pt`` (rank 0), a dict:

- ``losses``: one record per ``scaler.scale(loss)`` call, i.e. per loss the trainer backpropagates,
  unscaled: ``{"step": k, "index": i, "loss": float}`` where ``k`` is the 1-based iteration of this run
  (the trainer's ``train_steps`` when not resuming) and ``i`` counts calls within the iteration (0 for
  the unpatched trainer, which has one);
- ``logs``: every message of the trainer's logger (``utils.logger``), e.g. ``"(step=0000001) Train
  Loss: 4.1589, ..."`` (the loss averaged over ranks, every ``--log-every`` steps);
- ``model``, ``model_init``: the GPT's state dict after training and right after DDP wrapping (rank 0's
  weights, broadcast), keyed as the trainer's checkpoint ``"model"``; ``ema`` (None without ``--ema``);
- ``optimizer``: ``optimizer.state_dict()`` after training;
- ``grads`` (``--grad-probe``, else None): full GPT gradients just before the first optimizer step
  (after DDP's all-reduce, GradScaler's unscale and clipping), keyed like ``model``;
- ``args``: the trainer's ``args`` namespace as a dict (after ``init_distributed_mode``);
- ``checkpoints``: the paths of the checkpoints the trainer saved itself (``--ckpt-every``; the tiny
  default saves once, at step N, under ``OUTDIR/results/000-GPT-tiny/checkpoints/`` and ``OUTDIR/cloud/``;
  they pickle ``args``, so load them with ``weights_only=False``);
- ``extra``: ``argv`` (what the parser was given), ``steps``, ``final_step`` (iterations run; fewer than
  N if ``--epochs`` ran out first), ``world_size``, ``model``, ``data``, ``timings`` (seconds),
  ``checkout``, ``commit``, ``glue`` (what a patched trainer's ``LlamaGenMirai`` held once built: its
  config, its resolver's result, the ``steps_per_epoch`` it was given, the head's weights as built
  (``head_init``); ``{"class": None}`` unpatched).

Determinism: ``main`` seeds torch with ``global_seed * world_size + rank`` before it builds the model,
DDP broadcasts rank 0's weights, and the data are a function of ``data["seed"]`` only; the flip
augmentation and dropout draw from the global RNG, as upstream. Two runs with the same arguments give
identical losses and weights.

Workarounds (each is commented where applied):

1. ``dataset/imagenet.py`` and ``dataset/pexels.py`` import ``torchvision.datasets.ImageFolder`` (image
   datasets only): when torchvision is not installed, a stub stands in for the import.
2. ``init_distributed_mode`` wants nccl and ``torch.cuda.set_device``, and without torchrun's variables it
   creates no process group at all (``main`` then fails): gloo instead, torchrun's env:// rendezvous or a
   one-process file:// group.
3. ``torch.cuda`` as ``main`` sees it (the module's ``torch`` name only): ``is_available()`` is true, the
   device ``rank % device_count()`` is the CPU, ``set_device`` / ``synchronize`` do nothing, and
   ``torch.cuda.amp.autocast`` / ``GradScaler`` are their CPU versions (``bf16`` and ``fp16`` autocast on
   the CPU; ``none`` is no autocast).
4. ``DDP(model, device_ids=[args.gpu])``: DDP takes no device ids for a CPU module.
5. ``build_dataset`` (ImageNet codes from ``extract_codes_c2i.py``, 1,281,167 ``.npy`` files) -> N images
   of random codes in the same format (see ``_SyntheticCodes``).
6. The GPT: a tiny ``Transformer`` registered as ``GPT_models["GPT-tiny"]`` (``TINY_MODEL``).
7. The epoch loop: the loader raises a private exception when batch N + 1 is asked for, i.e. after N
   whole iterations (checkpoint save included).
8. Resuming (``--gpt-ckpt``): torch >= 2.6 loads with ``weights_only=True``, which refuses the
   ``argparse.Namespace`` the trainer pickles into its checkpoints: that class is allowed during the run.
9. Arguments (``TINY_ARGS``): ``--no-compile`` (``torch.compile`` on a CPU needs a C++ toolchain and
   minutes), ``--num-workers 0``, checkpoints and logs under OUTDIR, vocabulary
   64, 10 classes, 256x256 images with downsample 16 (256 codes per image, the smallest the parser allows).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import math
import os
import runpy
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import upstream  # noqa: E402  (integration_tests/upstream.py: the gloo process-group helper)
from monkeypatch import patched  # noqa: E402

__all__ = ["TINY_ARGS", "TINY_DATA", "TINY_MODEL", "TINY_MODEL_NAME", "load_result", "run_training"]

TRAIN_SCRIPT = "autoregressive/train/train_c2i.py"
TINY_MODEL_NAME = "GPT-tiny"
# `ModelArgs` fields; `multiple_of` keeps the SwiGLU width at 96 (upstream rounds it up to 256).
TINY_MODEL = {"dim": 32, "n_layer": 4, "n_head": 2, "multiple_of": 32}
TINY_DATA = {"num_images": 16, "seed": 0}
# train_c2i.py options for a tiny CPU run, keyed by dest; `{OUT}` and `{STEPS}` are filled in.
TINY_ARGS = {
    "code_path": "in-memory",  # required by the parser; read only by the real build_dataset
    "results_dir": "{OUT}/results",
    "cloud_save_path": "{OUT}/cloud",
    "gpt_model": TINY_MODEL_NAME,
    "vocab_size": 64,
    "num_classes": 10,
    "image_size": 256,  # the smallest choice: with --downsample-size 16, 16x16 = 256 codes per image
    "downsample_size": 16,
    "global_batch_size": 4,  # 2 per rank under torchrun --nproc_per_node 2
    "lr": 1e-3,  # upstream 1e-4 barely moves a tiny model in a few steps
    "ema": True,
    "no_compile": True,
    "mixed_precision": None,  # upstream's default, bf16 (CPU autocast here, see 3.)
    "num_workers": 0,  # upstream 24: forking the trainer process per worker only costs time here
    "log_every": 1,
    "ckpt_every": "{STEPS}",  # the trainer saves once, after the last step
}
# The checkout's top-level packages; namespace packages (no __init__.py), so they must be pinned to it.
_TOP_LEVEL = ("autoregressive", "dataset", "utils", "tokenizer", "language")


class _StopTraining(Exception):
    """Raised by the data loader once N iterations ran; caught only by ``run_training``."""


class _ArgsParsed(Exception):
    """Raised from ``parse_args`` in ``train_c2i.py``'s ``__main__`` block once the args are parsed."""


# ----------------------------------------------------------------------------- public API


def run_training(checkout, *, steps: int, out, overrides: dict | None = None, args=(), model: dict | None = None,
                 data: dict | None = None, grad_probe: bool = False, threads: int = 1) -> dict | None:
    """Train ``steps`` iterations with the checkout's ``train_c2i.main``; write ``out/result.pt`` on rank 0.

    ``overrides``: train_c2i options by dest or flag, merged over ``TINY_ARGS``; ``args``: raw
    train_c2i arguments (a string or a list), appended unchanged; ``threads``: torch's intra-op threads
    during the run. Returns the result dict on rank 0,
    None on other ranks. The process group stays up (``main`` only destroys it when its epochs run out).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, not {steps}")
    timings = {}
    started = time.perf_counter()
    out = Path(out).resolve()
    module, root = _import_train_c2i(checkout)
    model_cfg = {**TINY_MODEL, **(model or {})}
    data_cfg = {**TINY_DATA, **(data or {})}
    options = {key: (value.format(OUT=out, STEPS=max(steps, 1)) if isinstance(value, str) else value)
               for key, value in TINY_ARGS.items()}
    options.update(overrides or {})
    raw = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    timings["import_s"] = time.perf_counter() - started

    run = _Run(steps, grad_probe)
    with contextlib.ExitStack() as stack:
        # One intra-op thread (torchrun's default too): a tiny model gains nothing from more, and on a
        # 2-core machine with the other core busy, OpenMP's waiting threads make each step ~50x slower.
        stack.enter_context(_intra_op_threads(threads))
        _apply_patches(stack, module, run, model_cfg, data_cfg)
        glue: dict = {"class": None}
        stack.enter_context(_recorded_glue(glue))
        train_args, argv = _parse_train_args(root, options, raw)
        started = time.perf_counter()
        try:
            module.main(train_args)
        except _StopTraining:
            pass
        timings["main_s"] = time.perf_counter() - started

    started = time.perf_counter()
    result = run.collect(train_args)
    timings["collect_s"] = time.perf_counter() - started
    world_size = dist.get_world_size() if dist.is_initialized() else train_args.world_size
    rank = dist.get_rank() if dist.is_initialized() else train_args.rank
    result["extra"] = {
        "argv": argv, "steps": steps, "final_step": run.batches, "world_size": world_size, "model": model_cfg,
        "data": data_cfg, "timings": timings, "checkout": str(root), "commit": _commit(root), "glue": glue,
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / "result.pt")
    if dist.is_initialized():
        dist.barrier()
    return result if rank == 0 else None


def load_result(out) -> dict:
    """``out/result.pt`` as written by ``run_training``."""
    return torch.load(Path(out) / "result.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- import and arguments


def _import_train_c2i(checkout) -> tuple[types.ModuleType, Path]:
    """Import ``autoregressive.train.train_c2i`` from ``checkout`` (idempotent for one checkout)."""
    root = Path(checkout).resolve()
    if not (root / TRAIN_SCRIPT).is_file():
        raise FileNotFoundError(f"{root} is not a LlamaGen checkout (no {TRAIN_SCRIPT})")
    for name in _TOP_LEVEL:
        mod = sys.modules.get(name)
        paths = [str(p) for p in getattr(mod, "__path__", [])] or [getattr(mod, "__file__", None) or "?"]
        if mod is not None and not all(Path(p).resolve().is_relative_to(root) for p in paths if p != "?"):
            raise RuntimeError(f"a module named {name!r} is already imported from {paths}; "
                               f"it would shadow the checkout's {name!r} package")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # The checkout's packages have no __init__.py: a regular package of the same name anywhere on
    # sys.path (site-packages has had `utils` packages) would win over them. Pin each to the checkout.
    for name in _TOP_LEVEL:
        if name not in sys.modules and (root / name).is_dir():
            sys.modules[name] = _namespace_package(name, root / name)
    with _stubbed_if_missing("torchvision", "torchvision.datasets"):
        module = importlib.import_module("autoregressive.train.train_c2i")
    if not Path(module.__file__).resolve().is_relative_to(root):
        raise RuntimeError(f"train_c2i was imported from {module.__file__}, not from {root}")
    return module, root


def _namespace_package(name: str, path: Path) -> types.ModuleType:
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(path)]
    pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    pkg.__spec__.submodule_search_locations = pkg.__path__
    return pkg


@contextlib.contextmanager
def _stubbed_if_missing(*names: str):
    # Workaround 1: `dataset/build.py` imports every dataset module, and `dataset/imagenet.py` /
    # `dataset/pexels.py` import `torchvision.datasets.ImageFolder`, used only by the image datasets
    # (the trainer reads codes). Without torchvision, stub the import (with a real __spec__, for
    # find_spec callers) and remove the stubs afterwards.
    added = []
    if importlib.util.find_spec(names[0]) is None:
        for name in names:
            if name not in sys.modules:
                stub = types.ModuleType(name)
                stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
                stub.__path__ = []
                stub.__getattr__ = functools.partial(_unavailable, name)
                sys.modules[name] = stub
                added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _unavailable(package: str, attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)

    def missing(*args, **kwargs):
        raise RuntimeError(f"{package}.{attr} is a stub: install torchvision to use the image datasets")
    return missing


def _parse_train_args(root: Path, options: dict, raw: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse with ``train_c2i.py``'s own parser: run its ``__main__`` block until ``parse_args``.

    ``options`` become flags through the parser's actions; ``raw`` is appended unchanged.
    """
    captured = {}
    real_parse_known_args = argparse.ArgumentParser.parse_known_args
    real_parse_args = argparse.ArgumentParser.parse_args

    def intercept(real):
        def parse(self, args=None, namespace=None):
            if captured.get("busy"):  # parse_args calls parse_known_args
                return real(self, args, namespace)
            captured["busy"] = True
            argv = _options_to_argv(self, options) + raw
            captured["argv"] = argv
            try:
                parsed = real(self, argv, namespace)
            except SystemExit as exc:  # argparse has printed its usage and message to stderr
                raise ValueError(f"train_c2i.py's parser rejected {argv}") from exc
            captured["args"] = parsed[0] if isinstance(parsed, tuple) else parsed
            raise _ArgsParsed
        return parse

    with patched(argparse.ArgumentParser, "parse_known_args", intercept(real_parse_known_args)), \
            patched(argparse.ArgumentParser, "parse_args", intercept(real_parse_args)):
        try:
            runpy.run_path(str(root / TRAIN_SCRIPT), run_name="__main__")
        except _ArgsParsed:
            pass
    if "args" not in captured:
        raise RuntimeError(f"{TRAIN_SCRIPT}'s __main__ block returned without parsing arguments")
    return captured["args"], captured["argv"]


def _options_to_argv(parser: argparse.ArgumentParser, options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        action = _find_action(parser, key)
        flag = action.option_strings[-1] if action.option_strings else None
        if flag is None:
            raise ValueError(f"{key!r} is a positional argument of train_c2i.py: pass it in args")
        if value is None:
            continue
        if action.nargs == 0:  # store_true / store_false / store_const
            if value == action.const:
                argv.append(flag)
            elif value != action.default:
                raise ValueError(f"{flag} takes no value: {key!r} can be {action.const!r} or {action.default!r}")
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [flag, *map(str, values)]
    return argv


def _find_action(parser: argparse.ArgumentParser, key: str) -> argparse.Action:
    for action in parser._actions:
        if key in action.option_strings or key.replace("-", "_") == action.dest or f"--{key}" in action.option_strings:
            return action
    known = sorted(s for a in parser._actions for s in a.option_strings)
    raise ValueError(f"train_c2i.py has no option {key!r}; it has {known}")


# ----------------------------------------------------------------------------- patches


def _apply_patches(stack: contextlib.ExitStack, module, run: _Run, model_cfg: dict, data_cfg: dict) -> None:
    """Everything a CPU run of ``train_c2i.main`` needs, scoped to this run."""
    gpt = sys.modules["autoregressive.models.gpt"]

    # Workaround 2: upstream `init_distributed_mode` sets the CUDA device and initialises nccl.
    stack.enter_context(patched(module, "init_distributed_mode", _init_distributed_gloo))
    # `setup_for_distributed` (called there) replaces builtins.print for good: restore it afterwards.
    import builtins
    stack.enter_context(patched(builtins, "print", builtins.print))

    # Workaround 3: `main` asserts CUDA, takes `device = rank % torch.cuda.device_count()` and calls
    # `torch.cuda.set_device` / `synchronize` / `amp.autocast` / `amp.GradScaler`. Only its module's
    # `torch` name is replaced, by a view of torch whose `cuda` answers for one CPU device.
    stack.enter_context(patched(module, "torch", _TorchOnCpu(torch, run)))

    # Workaround 4: DDP refuses device ids for a CPU module (`device_ids=[args.gpu]`).
    stack.enter_context(patched(module, "DDP", run.wrap_ddp(module.DDP)))

    # Workaround 5: ImageNet codes on disk -> random codes in memory, same format.
    stack.enter_context(patched(module, "build_dataset", functools.partial(_SyntheticCodes.build, **data_cfg)))

    # Workaround 6: a tiny GPT under its own name (also a valid `--gpt-model` choice: the parser reads
    # the keys of this very dict).
    stack.enter_context(_patched_item(gpt.GPT_models, TINY_MODEL_NAME,
                                      functools.partial(_tiny_gpt, gpt, model_cfg)))

    # Workaround 7: stop after N iterations (the loader raises when batch N + 1 is asked for).
    stack.enter_context(patched(module, "DataLoader", run.wrap_loader(module.DataLoader)))

    # Recording only: the optimizer (grad probe, final state), the EMA model, the logger's messages.
    stack.enter_context(patched(module, "creat_optimizer", run.wrap_optimizer(module.creat_optimizer)))
    stack.enter_context(patched(module, "update_ema", run.wrap_update_ema(module.update_ema)))
    stack.enter_context(_recorded_logger(run.logs))

    # Workaround 8: resuming (`--gpt-ckpt`) loads the trainer's own checkpoint, which pickles `args`,
    # with `torch.load(map_location="cpu")`; since torch 2.6 that means `weights_only=True`, which refuses
    # `argparse.Namespace`. Allow that one class while `main` runs.
    stack.enter_context(torch.serialization.safe_globals([argparse.Namespace]))


def _init_distributed_gloo(args) -> None:
    """Stands in for ``utils.distributed.init_distributed_mode``: the same ``args`` fields, gloo, no CUDA."""
    upstream.ensure_process_group()  # torchrun's env:// rendezvous, else a one-process file:// group
    args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
    args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    args.dist_url = "env://" if "RANK" in os.environ else "file://"
    args.dist_backend = "gloo"
    args.distributed = True
    dist.barrier()
    sys.modules["utils.distributed"].setup_for_distributed(args.rank == 0)


class _OneCpuDevice(int):
    """``torch.cuda.device_count()`` as ``main`` sees it: 1, and ``rank % device_count()`` is the CPU."""

    def __new__(cls):
        return super().__new__(cls, 1)

    def __rmod__(self, rank):
        return torch.device("cpu")


class _TorchOnCpu:
    """The ``torch`` module as ``train_c2i.main`` sees it: everything is torch's, except ``torch.cuda``."""

    def __init__(self, real, run: _Run):
        self._real = real
        self.cuda = _CudaOnCpu(real.cuda, run)

    def __getattr__(self, name):
        return getattr(self._real, name)


class _CudaOnCpu:
    def __init__(self, real_cuda, run: _Run):
        self._real = real_cuda
        self.amp = types.SimpleNamespace(autocast=_cpu_autocast, GradScaler=run.wrap_scaler(_cpu_grad_scaler))

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return _OneCpuDevice()

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._real, name)


def _cpu_autocast(enabled: bool = True, dtype: torch.dtype = torch.float16, cache_enabled: bool = True):
    # `torch.cuda.amp.autocast(dtype=ptdtype)`: CPU autocast for bf16 / fp16; float32 (`none`) is no autocast.
    return torch.autocast("cpu", dtype=dtype, enabled=enabled and dtype != torch.float32,
                          cache_enabled=cache_enabled)


def _cpu_grad_scaler(*args, **kwargs):
    # `torch.cuda.amp.GradScaler(enabled=fp16)` disables itself without CUDA: the CPU scaler instead.
    return torch.amp.GradScaler("cpu", *args, **kwargs)


def _tiny_gpt(gpt, model_cfg: dict, **kwargs):
    # The trainer passes vocab_size, block_size, num_classes, ... from its args; the size is ours.
    return gpt.Transformer(gpt.ModelArgs(**model_cfg, **kwargs))


class _SyntheticCodes(torch.utils.data.Dataset):
    """Stands in for ``dataset.imagenet.CustomDataset`` (what ``build_imagenet_code`` returns).

    Item ``i``: ``(codes, label)`` as ``CustomDataset`` gives it with flip augmentation (the
    ``*_flip_*`` code directories ``extract_codes_c2i.py`` writes): codes ``int64 [1, L]``
    (``L = (image_size // downsample_size) ** 2``, one of the two stored augmentations, picked with the
    global RNG), label ``int64 [1]``. Stored augmentations: the image's codes and its left-right flip on
    the ``sqrt(L) x sqrt(L)`` grid. Codes are drawn per image from a Zipf-like distribution over a
    per-class permutation of the vocabulary, so a few steps can lower the loss. Deterministic in ``seed``.
    Also has the attributes ``main`` reads: ``flip``, ``feature_dir``, ``aug_feature_dir``.
    """

    def __init__(self, num_images: int, vocab_size: int, num_classes: int, tokens: int, seed: int = 0,
                 flip: bool = True):
        gen = torch.Generator().manual_seed(seed)
        side = math.isqrt(tokens)
        probs = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
        perms = torch.stack([torch.randperm(vocab_size, generator=gen) for _ in range(num_classes)])
        self.labels = torch.randint(num_classes, (num_images, 1), generator=gen)  # (n 1)
        ranks = torch.multinomial(probs.expand(num_images, -1), tokens, replacement=True, generator=gen)
        codes = perms[self.labels[:, 0, None], ranks]  # (n L)
        flipped = codes.view(num_images, side, side).flip(-1).reshape(num_images, tokens)
        self.codes = torch.stack([codes, flipped] if flip else [codes], dim=1)[:, None]  # (n 1 2 L): [image, flip]
        self.flip = flip
        self.feature_dir = f"<in-memory flip codes: {num_images} x {tokens}, vocab {vocab_size}>"
        self.label_dir = f"<in-memory labels: {num_classes} classes>"
        self.aug_feature_dir = self.aug_label_dir = None

    @classmethod
    def build(cls, args, num_images: int, seed: int, flip: bool = True, **kwargs):
        if kwargs:
            raise ValueError(f"unknown data settings {sorted(kwargs)}")
        if args.dataset != "imagenet_code":
            raise ValueError(f"the harness stands in for --dataset imagenet_code only, not {args.dataset!r}")
        return cls(num_images, args.vocab_size, args.num_classes, (args.image_size // args.downsample_size) ** 2,
                   seed=seed, flip=flip)

    def __len__(self):
        return self.codes.shape[0]

    def __getitem__(self, idx):
        aug_idx = torch.randint(low=0, high=self.codes.shape[2], size=(1,)).item()  # as CustomDataset
        return self.codes[idx, :, aug_idx], self.labels[idx]  # (1 L), (1,)


# ----------------------------------------------------------------------------- recording


class _Run:
    """What one run records, and the wrappers that record it."""

    def __init__(self, steps: int, grad_probe: bool):
        self.steps, self.grad_probe = steps, grad_probe
        self.batches = 0  # iterations started (= batches handed out)
        self.losses: list[dict] = []
        self.logs: list[str] = []
        self.model = self.optimizer = self.ema = None
        self.model_init = None
        self.grads = None

    def wrap_loader(self, data_loader):
        run = self

        class BoundedLoader:
            def __init__(self, *args, **kwargs):
                # `pin_memory=True` only warns that there is no accelerator to pin for.
                kwargs["pin_memory"] = kwargs.get("pin_memory", False) and torch.cuda.is_available()
                self._loader = data_loader(*args, **kwargs)

            def __iter__(self):
                for batch in self._loader:
                    if run.batches >= run.steps:
                        raise _StopTraining
                    run.batches += 1
                    yield batch
                if run.batches >= run.steps:  # the last batch of an epoch was the last step
                    raise _StopTraining

            def __len__(self):
                return len(self._loader)

            def __getattr__(self, name):
                return getattr(self._loader, name)

        return BoundedLoader

    def wrap_ddp(self, ddp):
        def cpu_ddp(module, *args, device_ids=None, **kwargs):
            wrapped = ddp(module, *args, **kwargs)  # device_ids dropped (workaround 4)
            self.model_init = _clone(_unwrap(module).state_dict())  # after DDP's broadcast from rank 0
            return wrapped
        return cpu_ddp

    def wrap_scaler(self, make_scaler):
        def make(*args, **kwargs):
            scaler = make_scaler(*args, **kwargs)
            scale = scaler.scale

            @functools.wraps(scale)
            def scale_recorded(outputs):
                if torch.is_tensor(outputs) and outputs.numel() == 1:  # the loss main backpropagates
                    index = sum(r["step"] == self.batches for r in self.losses)
                    self.losses.append({"step": self.batches, "index": index, "loss": outputs.detach().item()})
                return scale(outputs)

            scaler.scale = scale_recorded
            return scaler
        return make

    def wrap_optimizer(self, creat_optimizer):
        @functools.wraps(creat_optimizer)
        def recorded(model, *args, **kwargs):
            optimizer = creat_optimizer(model, *args, **kwargs)
            self.model, self.optimizer = model, optimizer
            if self.grad_probe:
                names = {p: n for n, p in model.named_parameters()}
                handle = None

                def probe(opt, args, kwargs):
                    handle.remove()
                    self.grads = {names[p]: p.grad.detach().clone() for group in opt.param_groups
                                  for p in group["params"] if p.grad is not None}

                handle = optimizer.register_step_pre_hook(probe)
            return optimizer
        return recorded

    def wrap_update_ema(self, update_ema):
        @functools.wraps(update_ema)
        def recorded(ema_model, model, *args, **kwargs):
            self.ema = ema_model
            return update_ema(ema_model, model, *args, **kwargs)
        return recorded

    def collect(self, train_args) -> dict:
        if self.model is None:
            raise RuntimeError("train_c2i.main stopped before it built its optimizer")
        checkpoints = sorted(str(p) for base in (train_args.results_dir, train_args.cloud_save_path)
                             for p in Path(base).glob("**/checkpoints/*.pt"))
        return {
            "losses": self.losses,
            "logs": self.logs,
            "model": _clone(_unwrap(self.model).state_dict()),
            "model_init": self.model_init,
            "ema": _clone(self.ema.state_dict()) if self.ema is not None else None,
            "optimizer": _clone(self.optimizer.state_dict()),
            "grads": self.grads,
            "args": {k: v for k, v in vars(train_args).items() if _plain(v)},
            "checkpoints": checkpoints,
        }


@contextlib.contextmanager
def _recorded_glue(record: dict):
    """Record what a patched trainer's ``LlamaGenMirai`` holds once built (record only)."""
    from mirai_plugin.integrations.llamagen import LlamaGenMirai

    init = LlamaGenMirai.__init__

    @functools.wraps(init)
    def recording(self, model, args, steps_per_epoch, device):
        init(self, model, args, steps_per_epoch, device)
        record.update({"class": type(self).__name__, "enabled": self.enabled, "steps_per_epoch": steps_per_epoch,
                       "config": self.config.to_dict() if self.enabled else None,
                       "resolved": self.resolved.to_dict(), "depth": len(model.layers),
                       "head_init": None if self.head is None else {
                           k: v.detach().clone() for k, v in self.head.state_dict().items()}})

    with patched(LlamaGenMirai, "__init__", recording):
        yield


@contextlib.contextmanager
def _recorded_logger(messages: list[str]):
    # `create_logger` (rank 0) calls `logging.basicConfig` with a FileHandler on the experiment's log.txt:
    # remove (and close) the root handlers it adds, so a later run in this process configures its own.
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level

    class Record(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("utils.logger")
    handler = Record()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for extra in [h for h in root.handlers if h not in before]:
            root.removeHandler(extra)
            extra.close()
        root.setLevel(level)


# ----------------------------------------------------------------------------- small helpers


@contextlib.contextmanager
def _intra_op_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _patched_item(mapping: dict, key, value):
    if key in mapping:
        raise RuntimeError(f"{key!r} is already registered")
    mapping[key] = value
    try:
        yield
    finally:
        mapping.pop(key, None)


def _unwrap(module):
    return getattr(module, "_orig_mod", module)  # torch.compile (without --no-compile)


def _clone(value):
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (str, int, float, bool, type(None)))


def _commit(root: Path) -> str:
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:  # everything after a bare `--` goes to train_c2i.py unchanged
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", required=True, help="a (copy of a) LlamaGen checkout")
    parser.add_argument("--steps", type=int, default=1, help="training iterations (optimizer steps)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overrides", default="{}", help="JSON: train_c2i.py options by dest or flag")
    parser.add_argument("--args", default="", help='raw train_c2i.py arguments, e.g. --args="--lr 0.01"')
    parser.add_argument("--model", default="{}", help="JSON: tiny GPT ModelArgs (see TINY_MODEL)")
    parser.add_argument("--data", default="{}", help="JSON: synthetic data (see TINY_DATA)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads during the run")
    parser.add_argument("--grad-probe", action="store_true", help="record full GPT gradients before the first "
                                                                  "optimizer step")
    opts = parser.parse_args(argv)
    result = run_training(opts.checkout, steps=opts.steps, out=opts.out, overrides=json.loads(opts.overrides),
                          args=shlex.split(opts.args) + passthrough, model=json.loads(opts.model),
                          data=json.loads(opts.data), grad_probe=opts.grad_probe, threads=opts.threads)
    if result is not None:
        extra = result["extra"]
        losses = ", ".join(f"{r['loss']:.4f}" for r in result["losses"])
        sys.stdout.write(f"[llamagen_harness] {extra['final_step']} iteration(s) (asked {opts.steps}) on "
                         f"{extra['world_size']} rank(s), losses [{losses}], timings "
                         f"{ {k: round(v, 2) for k, v in extra['timings'].items()} }; "
                         f"wrote {Path(opts.out) / 'result.pt'}\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
