"""Run the official Video-Mirai code (or its base, Self-Forcing) on a CPU with tiny random models.

Nothing from the checkout is copied here: ``import_upstream`` imports it from
its own directory at run time and every workaround below is a monkeypatch
applied from outside. Each workaround carries a comment saying why it is
needed (see ``integration_tests/README.md``, "Running upstream code on a CPU with tiny
random models"). Files under the checkout are never edited.

Typical use::

    up = import_upstream(os.environ["MIRAI_VIDEO_MIRAI_DIR"])
    student = tiny_diffusion_wrapper(tiny_causal_wan(dim=16, num_heads=4), is_causal=True)
    encoder = tiny_diffusion_wrapper(tiny_wan(dim=24, num_heads=4), is_causal=False)
    pipe = tiny_training_pipeline(student, ema_generator=encoder, mirai_projector=..., ...)
    video, _, _, loss = pipe.inference_with_trajectory_and_foresight(noise, prompt_embeds=...)

Shapes: latent video ``[b, f, c, h, w]``; a Wan patch is (1, 2, 2), so one latent
frame is ``(h/2)*(w/2)`` tokens.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "cuda_is_identity",
    "devices_per_node_as_on_gpus",
    "ensure_process_group",
    "fit_attention_to_frames",
    "fit_pipeline_to_model",
    "import_modules",
    "import_upstream",
    "randomize_parameters",
    "tiny_causal_wan",
    "tiny_diffusion_wrapper",
    "tiny_training_pipeline",
    "tiny_wan",
    "warped_denoising_steps",
]

# The checkout's top-level packages have generic names; they must come from the checkout.
_TOP_LEVEL = ("wan", "utils", "pipeline", "demo_utils", "model", "trainer")
_UP: types.SimpleNamespace | None = None


# ----------------------------------------------------------------------------- import


def import_upstream(checkout: str | os.PathLike) -> types.SimpleNamespace:
    """Import the official modules from ``checkout`` and apply the CPU workarounds.

    Idempotent: a second call with the same checkout returns the same namespace;
    a call with another checkout raises (module names would collide).
    Returns a namespace with the modules (``model``, ``causal_model``,
    ``wan_wrapper``, ``training``), the classes used here, ``checkout`` and
    ``commit`` (``git rev-parse HEAD`` of the checkout).
    """
    global _UP
    root = Path(checkout).resolve()
    if _UP is not None:
        if _UP.checkout != root:
            raise RuntimeError(f"upstream already imported from {_UP.checkout}, not {root}")
        return _UP
    if not (root / "wan" / "modules" / "model.py").is_file():
        raise FileNotFoundError(f"{root} is not a Video-Mirai / Self-Forcing checkout (no wan/modules/model.py)")
    for name in _TOP_LEVEL:
        mod = sys.modules.get(name)
        origin = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", [])), None)
        if mod is not None and (origin is None or not Path(origin).resolve().is_relative_to(root)):
            raise RuntimeError(f"a module named {name!r} is already imported from {origin}; "
                               f"it would shadow the checkout's {name!r} package")

    # Import the third-party packages the checkout needs *before* any stub below
    # exists, so that their own feature probes (find_spec) never see a stub.
    import diffusers.configuration_utils
    import diffusers.models.modeling_utils  # noqa: F401

    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # Rolling Forcing renamed the training pipeline's module and class.
    training_module = ("pipeline.self_forcing_training" if (root / "pipeline" / "self_forcing_training.py").is_file()
                       else "pipeline.rolling_forcing_training")
    with _import_time_workarounds(root):
        import importlib

        training = importlib.import_module(training_module)
        import utils.wan_wrapper as wan_wrapper
        import wan.modules.causal_model as causal_model
        import wan.modules.model as model

    # `flash_attention` asserts CUDA and `attention` (the flash-less fallback)
    # casts q/k/v to bf16 and ignores padding: both replaced by a float-preserving
    # SDPA that honours `k_lens`. `wan.modules.model.flash_attention` is also the
    # attention of the foresight projector (`_ForesightDiTLayer`), so it is covered.
    model.flash_attention = _sdpa_attention
    causal_model.attention = _sdpa_attention

    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    _UP = types.SimpleNamespace(
        checkout=root, commit=commit,
        model=model, causal_model=causal_model, wan_wrapper=wan_wrapper, training=training,
        WanModel=model.WanModel, CausalWanModel=causal_model.CausalWanModel,
        MiraiForesightDiTBlock=getattr(model, "MiraiForesightDiTBlock", None),  # Video-Mirai only
        WanDiffusionWrapper=wan_wrapper.WanDiffusionWrapper,
        SelfForcingTrainingPipeline=getattr(training, "SelfForcingTrainingPipeline", None),  # not Rolling Forcing
        RollingForcingTrainingPipeline=getattr(training, "RollingForcingTrainingPipeline", None),  # Rolling Forcing
    )
    return _UP


def import_modules(*names: str) -> list[types.ModuleType]:
    """Import more modules of the checkout (e.g. ``trainer.distillation``, ``utils.dataset``)
    under the same import-time workarounds as ``import_upstream``, which must come first."""
    import importlib

    with _import_time_workarounds(_up().checkout):
        return [importlib.import_module(name) for name in names]


@contextlib.contextmanager
def _import_time_workarounds(root: Path):
    """Workarounds needed only while the checkout's modules are being imported."""
    added = []
    # `wan/__init__.py` imports easydict, torchvision, the T5 / VAE stacks and the
    # configs: pre-register empty `wan` and `wan.modules` packages whose __path__
    # points into the checkout, so their __init__ files never run.
    for name, path in (("wan", root / "wan"), ("wan.modules", root / "wan" / "modules")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            pkg.__spec__.submodule_search_locations = pkg.__path__
            sys.modules[name] = pkg
    sys.modules["wan"].modules = sys.modules["wan.modules"]
    # `wan/modules/tokenizers.py` (imported by utils/wan_wrapper.py) needs ftfy and
    # transformers, and `utils/dataset.py` needs lmdb (LMDB datasets), none of
    # which the tiny models use: if they are not installed, stub them for the
    # import only (with a real __spec__: diffusers and importlib call find_spec)
    # and remove the stubs afterwards.
    for name in ("ftfy", "transformers", "lmdb"):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
            stub.__getattr__ = functools.partial(_missing, name)
            sys.modules[name] = stub
            added.append(name)
    # `torch.cuda.current_device()` is evaluated at import time (a default argument
    # in wan/modules/t5.py, a module global in demo_utils/memory.py): answer 0.
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = current_device
        for name in added:
            sys.modules.pop(name, None)


def _missing(package: str, attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Unavailable(f"{package}.{attr}")


class _Unavailable:
    """Placeholder for a name of a package that is not installed (tokenizer only)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        raise RuntimeError(f"{self._name} is a stub: install the real package to use it")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a stub: install the real package to use it")


def _sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                    causal=False, window_size=(-1, -1), deterministic=False, dtype=None, version=None,
                    fa_version=None):
    """Drop-in for upstream `flash_attention` / `attention`: q [b, lq, n, d], k/v [b, lk, n, d].

    Computes in the inputs' dtype (no bf16 cast); keys at positions >= k_lens[i]
    are masked out for sample i, as flash-attn's varlen kernel does.
    """
    if tuple(window_size) != (-1, -1) or causal:
        raise NotImplementedError("windowed / causal flash attention is not used on the DMD path")
    b, lq, lk = q.size(0), q.size(1), k.size(1)
    if q_lens is not None and bool((torch.as_tensor(q_lens) < lq).any()):
        raise NotImplementedError("padded queries (q_lens < Lq) are not used on the DMD path")
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None:
        k_lens = torch.as_tensor(k_lens, device=k.device)
        mask = (torch.arange(lk, device=k.device)[None, :] < k_lens[:, None]).view(b, 1, 1, lk)  # (b 1 1 lk)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2),  # (b n l d)
        attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out.transpose(1, 2).contiguous()  # (b lq n d)


def _up() -> types.SimpleNamespace:
    if _UP is None:
        raise RuntimeError("call import_upstream(checkout) first")
    return _UP


# ----------------------------------------------------------------------------- models


def _wan_kwargs(dim, num_heads, ffn_dim, num_layers, text_dim, text_len, freq_dim, in_dim):
    return dict(model_type="t2v", patch_size=(1, 2, 2), text_len=text_len, in_dim=in_dim, dim=dim,
                ffn_dim=ffn_dim, freq_dim=freq_dim, text_dim=text_dim, out_dim=in_dim, num_heads=num_heads,
                num_layers=num_layers, qk_norm=True, cross_attn_norm=True, eps=1e-6)


def _reinit_head(model: torch.nn.Module) -> None:
    # `init_weights()` zeroes the output head: every prediction would be the input
    # and every rollout frame identical up to noise. Give the head random weights.
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02)


def tiny_causal_wan(*, dim=16, num_heads=4, ffn_dim=32, num_layers=6, text_dim=32, text_len=512, freq_dim=64,
                    in_dim=16, gradient_checkpointing=True, local_attn_size=-1, sink_size=0):
    """A randomly initialised official `CausalWanModel` (the causal student), float32, CPU."""
    model = _up().CausalWanModel(**_wan_kwargs(dim, num_heads, ffn_dim, num_layers, text_dim, text_len,
                                               freq_dim, in_dim), local_attn_size=local_attn_size,
                                 sink_size=sink_size)
    _reinit_head(model)
    # The official DMD config trains with activation checkpointing, and the rollout's
    # backward needs it: the KV cache is written in place after the grad-enabled call.
    # diffusers 0.42 no longer accepts upstream's `_set_gradient_checkpointing`
    # signature, so set the flag the forward reads directly.
    model.gradient_checkpointing = gradient_checkpointing
    return model


def tiny_wan(*, dim=24, num_heads=4, ffn_dim=48, num_layers=8, text_dim=32, text_len=512, freq_dim=64, in_dim=16):
    """A randomly initialised official bidirectional `WanModel` (real score / encoder), float32, CPU."""
    model = _up().WanModel(**_wan_kwargs(dim, num_heads, ffn_dim, num_layers, text_dim, text_len, freq_dim,
                                         in_dim))
    _reinit_head(model)
    return model


def tiny_diffusion_wrapper(model, is_causal: bool, *, timestep_shift=None, num_frames=21, height=8, width=8):
    """The official `WanDiffusionWrapper` around ``model``, built by its own ``__init__``.

    ``timestep_shift`` None keeps the wrapper's default (8.0, as for the official
    real score); the official student is built with ``model_kwargs.timestep_shift`` 5.0.
    """
    up = _up()
    cls = up.CausalWanModel if is_causal else up.WanModel
    kwargs = {"is_causal": is_causal}
    if timestep_shift is not None:
        kwargs["timestep_shift"] = timestep_shift
    # `__init__` loads weights with `from_pretrained("wan_models/...")`: hand it the tiny model instead.
    own = cls.__dict__.get("from_pretrained")
    cls.from_pretrained = classmethod(lambda _cls, *a, **k: model)
    try:
        wrapper = up.WanDiffusionWrapper(**kwargs)
    finally:
        if own is None:
            del cls.from_pretrained
        else:
            cls.from_pretrained = own
    # `seq_len` is hard-coded to 32760 (the full-size 21x60x104 video): the
    # bidirectional model zero-pads every input to it. Use this video's token count.
    wrapper.seq_len = num_frames * height * width // 4
    return wrapper


def randomize_parameters(module: torch.nn.Module, *, std=0.05, norm_std=0.1) -> None:
    """Redraw every parameter: normal(0, std), norm weights 1 + norm_std * normal.

    Makes zero-initialised parts live (e.g. the projector's AdaLN output layers,
    which start at zero so that every projector block is the identity).
    """
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "Norm" in type(mod).__name__
            for name, p in mod.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    p.copy_(1 + norm_std * torch.randn_like(p))
                else:
                    p.normal_(0.0, std)


# ----------------------------------------------------------------------------- pipeline


def warped_denoising_steps(scheduler, steps=(1000, 750, 500, 250)) -> torch.Tensor:
    """The denoising step list as the official trainer builds it with `warp_denoising_step: true`:
    step t is replaced by the scheduler's (shifted) timestep number 1000 - t (0 past the end)."""
    table = torch.cat([scheduler.timesteps.cpu(), torch.zeros(1)])
    return table[1000 - torch.tensor(steps, dtype=torch.long)]


def ensure_process_group() -> None:
    """A gloo process group, unless one exists: torchrun's (env:// rendezvous) when
    launched by torchrun, else a one-process group (file:// rendezvous, no ports)."""
    # `generate_and_sync_list` calls `dist.broadcast` unconditionally, and the
    # upstream launcher wants nccl (no CPU support) and CUDA devices.
    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", init_method="env://")
    else:
        store = Path(tempfile.mkdtemp(prefix="mirai-pg-")) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


@contextlib.contextmanager
def devices_per_node_as_on_gpus():
    """FSDP's HYBRID_SHARD (``sharding_strategy: hybrid_full``, no process group given) shards within a
    node of ``device_count()`` devices and replicates across nodes. On a CPU the device count is 1, so
    every rank is a node of one: FSDP then falls back to NO_SHARD over that one-rank group, which drops
    the all-reduce across nodes while still dividing by the world size, and each rank keeps its own
    gradient / world size (``test_cpu_stand_ins.py`` reproduces it with plain torch). A GPU node runs one
    rank per device: answer torchrun's ranks per node, as ``torch.cuda.device_count()`` does there."""
    from monkeypatch import patched  # a sibling module: integration_tests/ is on the path wherever this runs

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    with patched(torch.cpu, "device_count", lambda: per_node):
        yield


@contextlib.contextmanager
def cuda_is_identity():
    # The timestep bookkeeping at the end of a rollout calls `.cuda()` on CPU tensors.
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def tiny_training_pipeline(generator_wrapper, *, denoising_steps=(1000, 750, 500, 250), warp_denoising_step=True,
                           num_frame_per_block=3, num_frames=21, height=8, width=8, same_step_across_blocks=True,
                           context_noise=0, dim_proj=None, cache_foresight_pairs=False, **foresight_kwargs):
    """The official `SelfForcingTrainingPipeline` sized for a tiny generator.

    ``foresight_kwargs`` go to the official constructor unchanged
    (``ema_generator``, ``mirai_projector``, ``foresight_student_layer``, ...).
    ``dim_proj`` and ``cache_foresight_pairs`` are set as attributes afterwards,
    as the official `DMD` model does.
    """
    up = _up()
    model = generator_wrapper.model
    scheduler = generator_wrapper.get_scheduler()
    steps = (warped_denoising_steps(scheduler, denoising_steps) if warp_denoising_step
             else torch.tensor(denoising_steps, dtype=torch.long))
    # The official DMD model sets this on the generator (used by its block masks).
    model.num_frame_per_block = num_frame_per_block
    pipe = up.SelfForcingTrainingPipeline(
        denoising_step_list=steps, scheduler=scheduler, generator=generator_wrapper,
        num_frame_per_block=num_frame_per_block, independent_first_frame=False,
        same_step_across_blocks=same_step_across_blocks, last_step_only=False, num_max_frames=num_frames,
        context_noise=context_noise, **foresight_kwargs)
    pipe.foresight_dim_proj = dim_proj
    pipe.cache_foresight_pairs = cache_foresight_pairs
    fit_pipeline_to_model(pipe, model, height=height, width=width)

    # `.cuda()` at the end of both rollouts; `dist.broadcast` at their start.
    ensure_process_group()
    for name in ("inference_with_trajectory", "inference_with_trajectory_and_foresight"):
        if hasattr(pipe, name):
            setattr(pipe, name, _on_cpu(getattr(pipe, name)))
    return pipe


def fit_pipeline_to_model(pipe, model, *, height: int, width: int) -> None:
    """Size an official pipeline (training or inference) for ``model`` and latents ``height x width``.

    Only the attributes the pipeline has are touched, so it fits every pipeline
    class of the three checkouts.
    """
    # `__init__` hard-codes Wan-1.3B: 30 blocks, 1560 tokens per frame and a
    # 30x52 token grid. Use the tiny generator's values; the KV cache keeps the
    # number of frames upstream sized it for.
    tokens_per_frame = (height // model.patch_size[1]) * (width // model.patch_size[2])
    if hasattr(pipe, "kv_cache_size"):
        pipe.kv_cache_size = pipe.kv_cache_size // pipe.frame_seq_length * tokens_per_frame
    pipe.num_transformer_blocks = len(model.blocks)
    pipe.frame_seq_length = tokens_per_frame
    if hasattr(pipe, "foresight_H_tok"):
        pipe.foresight_H_tok, pipe.foresight_W_tok = height // model.patch_size[1], width // model.patch_size[2]

    # The KV and cross-attention caches are allocated as [b, len, 12, 128]
    # (Wan-1.3B heads): let the official allocator run, then give every cache
    # entry the tiny model's heads and head width (same length, dtype, device).
    # (The ema_* allocators and the foresight rollout exist in Video-Mirai only.)
    heads, head_dim = model.num_heads, model.dim // model.num_heads
    for name in ("_initialize_kv_cache", "_initialize_crossattn_cache",
                 "_initialize_ema_kv_cache", "_initialize_ema_crossattn_cache"):
        if hasattr(pipe, name):
            setattr(pipe, name, _resized_caches(pipe, getattr(pipe, name), heads, head_dim))


WAN_FRAME_TOKENS = 1560  # Wan-1.3B at 480x832: a 30x52 token grid per latent frame


def fit_attention_to_frames(model, tokens_per_frame: int) -> None:
    """Give attention modules that hard-code Wan's 1560 tokens per frame (Rolling Forcing's causal
    self-attention: ``frame_length``, a 21-frame ``max_attention_size``, a 3-frame ``block_length``)
    ``tokens_per_frame``, each length keeping its number of frames. Models without them are untouched."""
    for module in model.modules():
        if getattr(module, "frame_length", None) != WAN_FRAME_TOKENS:
            continue
        for name in ("max_attention_size", "block_length"):
            frames, rest = divmod(getattr(module, name), WAN_FRAME_TOKENS)
            if rest:
                raise ValueError(f"{type(module).__name__}.{name} = {getattr(module, name)} is not a whole "
                                 f"number of {WAN_FRAME_TOKENS}-token frames")
            setattr(module, name, frames * tokens_per_frame)
        module.frame_length = tokens_per_frame


def _resized_caches(pipe, allocate, heads, head_dim):
    # Rolling Forcing's training pipeline names its KV cache `kv_cache_clean`.
    attrs = {"_initialize_kv_cache": ("kv_cache1", "kv_cache_clean"),
             "_initialize_crossattn_cache": ("crossattn_cache",),
             "_initialize_ema_kv_cache": ("ema_kv_cache",),
             "_initialize_ema_crossattn_cache": ("ema_crossattn_cache",)}[allocate.__name__]

    @functools.wraps(allocate)
    def wrapped(*args, **kwargs):
        allocate(*args, **kwargs)
        for entry in (e for attr in attrs for e in getattr(pipe, attr, None) or []):
            for key in ("k", "v"):
                old = entry[key]
                entry[key] = old.new_zeros(old.shape[0], old.shape[1], heads, head_dim)  # (b len n d)
    return wrapped


def _on_cpu(rollout):
    @functools.wraps(rollout)
    def wrapped(*args, **kwargs):
        with cuda_is_identity():
            return rollout(*args, **kwargs)
    return wrapped
