"""Run LongLive's real DMD ``Trainer`` (``trainer/distillation.py``, LongLive 2.0 at the pinned commit) on a
CPU with tiny random-weight models, and record what it logs.

Nothing from the checkout is copied: it is imported from its own directory and every workaround is a
monkeypatch applied from outside for one run, commented where it is applied. Point ``--checkout`` at a
*copy* of a checkout (patched or not); files under it are never edited.

Usage::

    python integration_tests/longlive_harness.py --checkout DIR --config configs/train_dmd.yaml --steps N \\
        --out OUTDIR [--overrides JSON] [--flat JSON] [--seed S] [--grad-probe] [--scene-cut-at K] [--resume]
    torchrun --nproc_per_node 2 integration_tests/longlive_harness.py ...          # same arguments
    python integration_tests/longlive_harness.py --mode inference --checkout DIR --config configs/train_dmd.yaml \\
        --checkpoint OUTDIR/logs/checkpoint_model_000001/model.pt --out OUTDIR2

``--overrides`` (JSON) is merged over the YAML *before* LongLive's ``normalize_config`` (so it may
name sections: ``{"training": {"slice_last_frames": 16}}``) and after the tiny-run sizes; top-level
``foresight_*`` keys go here too. ``--flat`` is merged after ``normalize_config``.

The tiny run, and why each piece stands in (the shipped configs are used as they are otherwise,
``all_causal: true`` included):

- models: ``CausalWanModel`` / ``WanModel.from_pretrained`` build tiny models (width 32, 2 heads,
  4 blocks, 4 latent channels, text width 16); weights depend only on the role (generator, real
  score, fake score, foresight encoder), never on construction order;
- ``WanTextEncoder`` (umT5-XXL): a fixed embedding per prompt, seeded by its text;
- ``WanVAEWrapper``: a fixed random linear map, 16x spatial / 4x temporal (encode and decode), so the
  backward-simulation re-encode and I2V's image latent run;
- ``torchvision`` (cannot be installed beside the CPU torch wheel), ``wandb`` (a recorder), ``ftfy``,
  and ``transformers.models.x_clip.modeling_x_clip.x_clip_loss`` (absent from current transformers;
  that module is stubbed, not torchvision with a spec, which breaks transformers' image utilities);
- ``LLV2_TRITON_ROPE=0 LLV2_TRITON_ADALN=0``: the Triton kernels run on no-grad calls otherwise;
- flex attention: ``create_block_mask(_compile=True)`` takes ~21 s per process on a CPU and CPU flex
  attention has no backward: the mask is made dense (``create_mask``) and attention is SDPA on it;
- flash attention (absent): SDPA computing in the inputs' dtype (``upstream._sdpa_attention``);
- nccl and ``hybrid_full``: gloo with FULL_SHARD; ``torch.cuda.current_device()`` is the CPU;
  ``mixed_precision: false`` (bf16 relies on FSDP casts that CPU runs do not make here);
- FSDP's size-based wrap threshold 5e7 -> 5e3 parameters, so tiny blocks are nested FSDP units as the
  5B model's are (LoRA's ``save()`` gathers through them);
- ``offload_to_cpu`` in ``save()``'s ``FullStateDictConfig`` (segfaults on CPU tensors) is dropped;
- data: a synthetic prompt dataset (one prompt per block; ``--scene-cut-at K`` puts LongLive's scene-cut
  prefix on block K) with a random image per sample for I2V, in place of the caption/video folders;
  ``DataLoader(num_workers=2)`` runs in process;
- evaluation (validation videos every step) is off: ``evaluation.interval: -1``;
- a fixed seed (config seed 0 means random); ``gen_time``, ``loss_time`` and ``per iteration time``
  are left out of the logs (wall clock).

``Trainer.train`` catches every exception and only prints it: the harness records exceptions raised
inside the step and re-raises them, and stops after N iterations with a ``BaseException`` the loop
cannot swallow.

``result.pt``'s ``extra`` holds, besides timings and the commit, the config before ``normalize_config``
(``source_config``: the file with the tiny sizes and overrides merged in) and after it (``config``), and
what the plug-in's glue held and saw (``glue``, see ``glue_record.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.machinery
import json
import os
import random
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from glue_record import watch_glue  # noqa: E402  (after the sys.path insert above)
from monkeypatch import patched  # noqa: E402  (after the sys.path insert above)
from upstream import ensure_process_group  # noqa: E402

__all__ = ["MODELS", "TINY", "load_result", "run_inference", "run_training", "write_encoder_checkpoint"]

# Tiny sizes (the shipped configs: Wan2.2-TI2V-5B, 30 blocks of width 3072, 48 latent channels,
# 44x80 latents, 32-frame rollouts in 8-frame blocks).
MODELS = {"dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 4, "in_dim": 4, "text_dim": 16, "freq_dim": 32}
TEXT_LEN = 512  # the training pipeline's cross-attention cache is hard-coded to 512 text tokens
TINY = {
    "infra": {"sharding_strategy": "full", "mixed_precision": False, "gradient_checkpointing": True},
    "model_kwargs": {"num_frame_per_block": 8, "local_attn_size": 32},
    "training": {"max_iters": 1000, "log_iters": 1000, "max_checkpoints": 0},
    "data": {"image_or_video_shape": [1, 32, 4, 4, 4]},  # 4 tokens per frame (2x2 patches)
    "evaluation": {"interval": -1},
    "adapter": {"rank": 4, "alpha": 4, "verbose": False},
    "logging": {"seed": 1},
}
PROMPTS = (
    "A red fox trots through fresh snow at dawn.",
    "Waves roll onto a rocky beach under a grey sky.",
    "A chef slices vegetables on a wooden board.",
    "A paper boat drifts down a rain-filled gutter.",
)
WALL_CLOCK_KEYS = ("per iteration time", "gen_time", "loss_time")
_FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class _StopTraining(BaseException):
    """Raised by the step call once N iterations ran; a BaseException so `Trainer.train`'s
    `except Exception` cannot swallow it."""


# ----------------------------------------------------------------------------- import


def import_longlive(checkout) -> types.SimpleNamespace:
    """Import LongLive's modules from ``checkout`` under the CPU stand-ins (once per process)."""
    root = Path(checkout).resolve()
    os.environ.setdefault("LLV2_TRITON_ROPE", "0")
    os.environ.setdefault("LLV2_TRITON_ADALN", "0")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _install_import_stubs()
    torch.cuda.current_device = lambda: torch.device("cpu")
    import importlib

    names = ("utils.config", "utils.wan_5b_wrapper", "wan_5b.modules.causal_model", "wan_5b.modules.model",
             "wan_5b.modules.attention", "utils.distributed", "pipeline", "model.dmd", "model.base",
             "trainer.distillation")
    mods = {name: importlib.import_module(name) for name in names}
    for name, module in mods.items():
        if not Path(module.__file__).resolve().is_relative_to(root):
            raise RuntimeError(f"{name} was imported from {module.__file__}, not from {root}")
    commit = (root / ".git").exists() and os.popen(f"git -C {root} rev-parse HEAD").read().strip()
    return types.SimpleNamespace(root=root, commit=commit, **{n.replace(".", "_"): m for n, m in mods.items()})


def _stub(name: str, spec: bool = True, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    if spec:
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _install_import_stubs() -> None:
    def unavailable(what):
        def call(*args, **kwargs):
            raise RuntimeError(f"{what} is a stand-in in the LongLive CPU harness")
        return call

    # transformers, diffusers and peft first, while torchvision is still absent (they cache what they found).
    import diffusers.configuration_utils
    import diffusers.models.modeling_utils  # noqa: F401
    import peft  # noqa: F401

    try:
        import transformers.models.x_clip.modeling_x_clip as x_clip
        if not hasattr(x_clip, "x_clip_loss"):
            x_clip.x_clip_loss = unavailable("x_clip_loss")
    except ImportError:
        _stub("transformers.models.x_clip.modeling_x_clip", x_clip_loss=unavailable("x_clip_loss"))
    if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
        # No __spec__: transformers must keep seeing torchvision as absent.
        tv = _stub("torchvision", spec=False)
        tv.io = _stub("torchvision.io", spec=False, write_video=unavailable("torchvision.io.write_video"))
        tv.transforms = _stub("torchvision.transforms", spec=False, Compose=unavailable("transforms.Compose"))
        tv.transforms.functional = _stub("torchvision.transforms.functional", spec=False)
        tv.transforms.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", BICUBIC="bicubic")
    if importlib.util.find_spec("ftfy") is None and "ftfy" not in sys.modules:
        _stub("ftfy", fix_text=lambda text: text)
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        _stub("wandb", login=lambda *a, **k: True, init=lambda *a, **k: None, finish=lambda *a, **k: None,
              log=lambda *a, **k: None)


# ----------------------------------------------------------------------------- stand-ins


def _role_seed(role: str, weights_seed: int) -> int:
    return zlib.crc32(f"longlive:{weights_seed}:{role}".encode())


def _tiny_model(cls, role: str, weights_seed: int, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_role_seed(role, weights_seed))
        extra = {k: kwargs[k] for k in ("local_attn_size", "sink_size", "num_frame_per_block") if k in kwargs}
        model = cls(model_type="ti2v", patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=MODELS["in_dim"],
                    dim=MODELS["dim"], ffn_dim=MODELS["ffn_dim"], freq_dim=MODELS["freq_dim"],
                    text_dim=MODELS["text_dim"], out_dim=MODELS["in_dim"], num_heads=MODELS["num_heads"],
                    num_layers=MODELS["num_layers"], qk_norm=True, cross_attn_norm=True, eps=1e-6, **extra)
        # `init_weights` zeroes the output head (every prediction would equal its input): redraw it.
        with torch.no_grad():
            torch.nn.init.normal_(model.head.head.weight, std=0.05)
        return model.eval()


def _tiny_from_pretrained(weights_seed: int, causal: bool):
    """Causal builds are generator, real score, fake score in that order (`BaseModel._initialize_models`,
    `all_causal: true`); a bidirectional build is the foresight encoder (choice a) or, with
    `all_causal: false`, the real then the fake score."""
    built = []

    def from_pretrained(cls, *args, **kwargs):
        roles = ("generator", "real_score", "fake_score") if causal else ("encoder", "encoder_2", "encoder_3")
        role = roles[min(len(built), 2)]
        built.append(role)
        return _tiny_model(cls, role, weights_seed, **kwargs)

    return classmethod(from_pretrained)


class TinyTextEncoder(torch.nn.Module):
    """Stands in for `WanTextEncoder` (umT5-XXL): a fixed [512, text_dim] embedding per prompt, seeded by
    its text (padding past a prompt-dependent length is zero, as upstream zeroes padding)."""

    def forward(self, text_prompts):
        embeds = []
        for prompt in text_prompts:
            gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            e = torch.randn(TEXT_LEN, MODELS["text_dim"], generator=gen)
            e[8 + len(prompt) % 16:] = 0.0
            embeds.append(e)
        return {"prompt_embeds": torch.stack(embeds)}  # (n 512 text_dim)


class TinyVAE(torch.nn.Module):
    """Stands in for `WanVAEWrapper`: pixels (b c t H W) <-> latents (b f C h w) by a fixed random linear
    map, 16x spatial and 4x temporal compression (latent frame 0 <-> pixel frame 0, as Wan's causal VAE)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        self.register_buffer("to_rgb", torch.randn(3, MODELS["in_dim"], generator=gen) / 2)

    def decode_to_pixel(self, latent, use_cache=False):  # (b f C h w) -> (b t 3 H W)
        rgb = torch.einsum("rc,bfchw->bfrhw", self.to_rgb.to(latent.dtype), latent)
        rgb = rgb.repeat_interleave(16, dim=-1).repeat_interleave(16, dim=-2)
        frames = [rgb[:, :1]] + [rgb[:, i : i + 1].expand(-1, 4, -1, -1, -1) for i in range(1, rgb.shape[1])]
        return torch.tanh(torch.cat(frames, dim=1))

    def encode_to_latent(self, pixel):  # (b 3 t H W) -> (b f C h w)
        pixel = pixel[:, :, ::4]  # frames 0, 4, 8, ...
        pooled = F.avg_pool3d(pixel.float(), (1, 16, 16))  # (b 3 f h w)
        latent = torch.einsum("rc,brfhw->bfchw", torch.linalg.pinv(self.to_rgb.float()).T, pooled)
        return latent.to(pixel.dtype)


class SyntheticPrompts(torch.utils.data.Dataset):
    """Stands in for `MultiTextConcatDataset` / `MultiVideoConcatDataset`: per sample one prompt per
    block (``num_blocks``), the scene-cut prefix on block ``scene_cut_at`` onwards' first block, and for
    I2V a random conditioning image (3, H, W) in [-1, 1]; deterministic in (seed, index)."""

    scene_cut_at: int | None = None

    def __init__(self, *args, num_blocks=None, video_size=(64, 64), total_frames=None, num_frame_per_block=8,
                 temporal_compression_ratio=4, return_image=False, scene_cut_prefix=None, **kwargs):
        if num_blocks is None:  # MultiVideoConcatDataset: blocks from the frame count
            first = 1 + (num_frame_per_block - 1) * temporal_compression_ratio
            num_blocks = 1 + (total_frames - first) // (num_frame_per_block * temporal_compression_ratio)
        self.num_blocks, self.video_size, self.return_image = num_blocks, tuple(video_size), return_image
        self.prefix = scene_cut_prefix

    def __len__(self):
        return 16

    def __getitem__(self, idx):
        first, second = PROMPTS[idx % len(PROMPTS)], PROMPTS[(idx + 1) % len(PROMPTS)]
        prompts = [first] * self.num_blocks
        cut = self.scene_cut_at
        if cut is not None:
            prompts[cut:] = [second] * (self.num_blocks - cut)
            prompts[cut] = self.prefix + second
        item = {"prompts": prompts, "idx": idx}
        if self.return_image:
            gen = torch.Generator().manual_seed(1000 + idx)
            item["image"] = torch.rand(3, *self.video_size, generator=gen) * 2 - 1
            item["frames"] = torch.zeros(1)
        return item


def _collate(batch):
    out = {"prompts": [b["prompts"] for b in batch], "idx": torch.tensor([b["idx"] for b in batch])}
    if "image" in batch[0]:
        out["image"] = torch.stack([b["image"] for b in batch])
    return out


_DENSE: dict[int, tuple] = {}


class _DenseMask:
    """What `create_block_mask` returns here: the mask_mod made dense (1 1 q kv)."""

    def __init__(self, mask_mod, q_len, kv_len, device):
        from torch.nn.attention.flex_attention import create_mask

        self.mask = create_mask(mask_mod, None, None, q_len, kv_len, device=device)

    def __repr__(self):
        return f"_DenseMask{tuple(self.mask.shape)}"


def _dense_create_block_mask(mask_mod, B=None, H=None, Q_LEN=None, KV_LEN=None, device="cpu", **kwargs):
    return _DenseMask(mask_mod, Q_LEN, KV_LEN, device)


def _dense_flex_attention(query, key, value, block_mask=None, **kwargs):
    """SDPA on the dense mask (q/k/v (b n l d)), in place of the compiled flex attention."""
    if kwargs:
        raise NotImplementedError(f"flex_attention options {sorted(kwargs)} are not used on the DMD path")
    mask = block_mask.mask[..., : query.shape[-2], : key.shape[-2]]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def _replace_everywhere(stack, root: Path, original, replacement) -> None:
    # Modules bind upstream names with `from x import y`: replace every binding in the checkout's modules.
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or not Path(file).resolve().is_relative_to(root):
            continue
        for name, value in list(vars(module).items()):
            if value is original:
                stack.enter_context(patched(module, name, replacement))


def _apply_patches(stack, ll, recorder, weights_seed: int, tokens_per_frame: int, frames: int) -> None:
    import upstream  # the dtype-preserving SDPA in place of flash attention

    cm, wm = ll.wan_5b_modules_causal_model, ll.wan_5b_modules_model
    stack.enter_context(patched(cm.CausalWanModel, "from_pretrained", _tiny_from_pretrained(weights_seed, True)))
    stack.enter_context(patched(wm.WanModel, "from_pretrained", _tiny_from_pretrained(weights_seed, False)))
    for original in {ll.wan_5b_modules_attention.flash_attention, ll.wan_5b_modules_attention.attention}:
        _replace_everywhere(stack, ll.root, original, upstream._sdpa_attention)
    stack.enter_context(patched(cm, "create_block_mask", _dense_create_block_mask))
    stack.enter_context(patched(cm, "flex_attention", _dense_flex_attention))
    _replace_everywhere(stack, ll.root, ll.utils_wan_5b_wrapper.WanTextEncoder, TinyTextEncoder)
    _replace_everywhere(stack, ll.root, ll.utils_wan_5b_wrapper.WanVAEWrapper, TinyVAE)

    # diffusers >= 0.30 calls `_set_gradient_checkpointing(enable=..., gradient_checkpointing_func=...)`,
    # which upstream's `(module, value)` signature rejects: set the flag the forwards read.
    def set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None):
        self.gradient_checkpointing = enable

    for cls in (cm.CausalWanModel, wm.WanModel):
        stack.enter_context(patched(cls, "_set_gradient_checkpointing", set_gradient_checkpointing))

    # `seq_len` is hard-coded to the full-size video's 28160 tokens; the bidirectional model pads to it.
    wrapper_cls = ll.utils_wan_5b_wrapper.WanDiffusionWrapper
    init = wrapper_cls.__init__

    @functools.wraps(init)
    def init_tiny(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.seq_len = frames * tokens_per_frame

    stack.enter_context(patched(wrapper_cls, "__init__", init_tiny))

    # Rollouts end with `.cuda()` on timestep tensors.
    cuda = torch.Tensor.cuda
    stack.callback(setattr, torch.Tensor, "cuda", cuda)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    trainer_mod = ll.trainer_distillation
    stack.enter_context(patched(trainer_mod, "launch_distributed_job", _ensure_process_group))
    stack.enter_context(patched(trainer_mod, "wandb", recorder.wandb))
    # The size-based wrap threshold (5e7 parameters) makes every 5B block its own FSDP unit; scaled to the
    # tiny blocks so that they are nested units too (LoRA's `save()` needs FSDP modules inside the peft model).
    fsdp_wrap = trainer_mod.fsdp_wrap

    def tiny_fsdp_wrap(module, *args, **kwargs):
        return fsdp_wrap(module, *args, **{"min_num_params": 5000, **kwargs})

    stack.enter_context(patched(trainer_mod, "fsdp_wrap", tiny_fsdp_wrap))
    full_config = trainer_mod.FullStateDictConfig

    def no_offload(*args, **kwargs):  # `offload_to_cpu=True` segfaults on CPU tensors
        return full_config(*args, **{**kwargs, "offload_to_cpu": False})

    stack.enter_context(patched(trainer_mod, "FullStateDictConfig", no_offload))
    stack.enter_context(patched(trainer_mod, "MultiTextConcatDataset", SyntheticPrompts))
    stack.enter_context(patched(trainer_mod, "MultiVideoConcatDataset", SyntheticPrompts))
    stack.enter_context(patched(trainer_mod, "eval_collate_fn", _collate))
    stack.enter_context(patched(trainer_mod, "multi_video_collate_fn", _collate))
    loader = torch.utils.data.DataLoader

    def in_process_loader(*args, **kwargs):
        kwargs.update(num_workers=0, prefetch_factor=None, persistent_workers=False)
        return loader(*args, **kwargs)

    stack.enter_context(patched(torch.utils.data, "DataLoader", in_process_loader))


@contextlib.contextmanager
def patched_item(mapping, key, value):
    old = mapping[key]
    mapping[key] = value
    try:
        yield
    finally:
        mapping[key] = old


def _ensure_process_group(*args, **kwargs) -> None:
    """In place of LongLive's ``launch_distributed_job`` (nccl), whatever it is given: a gloo group."""
    ensure_process_group()


# ----------------------------------------------------------------------------- config


def source_config(ll, config, overrides=None):
    """The config file with the tiny-run sizes and ``overrides`` merged in, before ``normalize_config``."""
    from omegaconf import OmegaConf

    path = Path(config)
    if not path.is_file():
        path = ll.root / config
    cfg = OmegaConf.merge(OmegaConf.load(path), TINY, overrides or {})
    if cfg.get("adapter", None) is not None and not cfg.adapter.get("type"):
        cfg.adapter = None  # `{"adapter": null}` in overrides removes LoRA (full fine-tuning)
    return cfg, path


def build_config(ll, config, overrides=None, flat=None, *, logdir, auto_resume=True):
    cfg, path = source_config(ll, config, overrides)
    cfg = ll.utils_config.normalize_config(cfg)
    cfg.merge_with(flat or {})
    # What train.py sets from its command line (a plain launch with --logdir).
    cfg.no_save = False
    cfg.no_visualize = True
    cfg.config_name = path.stem
    cfg.logdir = str(logdir)
    cfg.wandb_save_dir = ""
    cfg.disable_wandb = False  # wandb is a recorder
    cfg.auto_resume = auto_resume
    cfg.generate_before_train = False
    if cfg.seed == 0:
        raise ValueError("seed 0 makes LongLive draw a random seed")
    return cfg


# ----------------------------------------------------------------------------- recording


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []
        self.losses: list[dict] = []
        self.grads = None
        self.errors: list[BaseException] = []
        self.wandb = types.SimpleNamespace(login=lambda *a, **k: True, init=lambda *a, **k: None,
                                           finish=lambda *a, **k: None, log=self._log)

    def _log(self, data, step=None, **kwargs):
        self.calls.append((step, _scalars(data)))

    def logs(self):
        merged = {}
        for step, data in self.calls:
            entry = merged.setdefault(step, {"step": step})
            entry.update({k: v for k, v in data.items() if k not in WALL_CLOCK_KEYS})
        return [merged[s] for s in sorted(merged, key=lambda s: -1 if s is None else s)]


def _scalars(data):
    out = {}
    for key, value in data.items():
        if key in WALL_CLOCK_KEYS:
            continue
        if torch.is_tensor(value) and value.numel() == 1:
            out[key] = value.item()
        elif isinstance(value, (int, float, bool)):
            out[key] = value
    return out


def _instrument(trainer, recorder: Recorder, steps: int, grad_probe: bool) -> None:
    fwdbwd = trainer.fwdbwd_one_step

    @functools.wraps(fwdbwd)
    def recorded(batch, train_generator, *args, **kwargs):
        if trainer.step >= steps:
            raise _StopTraining
        try:
            log = fwdbwd(batch, train_generator, *args, **kwargs)
        except Exception as error:  # `Trainer.train` would swallow it
            recorder.errors.append(error)
            raise _StopTraining from error
        recorder.losses.append({"step": trainer.step, "train_generator": bool(train_generator), **_scalars(log)})
        return log

    trainer.fwdbwd_one_step = recorded
    if grad_probe:
        handle = None

        def probe(optimizer, args, kwargs):
            handle.remove()
            recorder.grads = _full_grads(trainer.model.generator)

        handle = trainer.generator_optimizer.register_step_pre_hook(probe)


def _strip(name: str) -> str:
    for prefix in _FSDP_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _full_grads(module) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(module, writeback=False, with_grads=True):
        return {_strip(n): p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _full_state(module) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(module, writeback=False):
        return {_strip(n): p.detach().clone() for n, p in module.named_parameters()}


# ----------------------------------------------------------------------------- runs


def run_training(checkout, *, config, steps, out, overrides=None, flat=None, seed=1, weights_seed=0,
                 grad_probe=False, scene_cut_at=None, auto_resume=True):
    timings = {}
    started = time.perf_counter()
    ll = import_longlive(checkout)
    _ensure_process_group()
    rank = dist.get_rank()
    out = Path(out).resolve()
    logging_keys = {"seed": seed, **(overrides or {}).get("logging", {})}
    cfg = build_config(ll, config, {**(overrides or {}), "logging": logging_keys},
                       flat, logdir=out / "logs", auto_resume=auto_resume)
    source = _to_plain(source_config(ll, config, {**(overrides or {}), "logging": logging_keys})[0])
    shape = list(cfg.image_or_video_shape)
    tokens_per_frame = shape[3] * shape[4] // 4
    recorder = Recorder()
    if isinstance(scene_cut_at, str):
        per_rank = [int(v) for v in scene_cut_at.split(",")]
        scene_cut_at = per_rank[rank % len(per_rank)]
    SyntheticPrompts.scene_cut_at = None if scene_cut_at is None or scene_cut_at < 0 else scene_cut_at
    timings["import_s"] = time.perf_counter() - started
    with contextlib.ExitStack() as stack:
        _apply_patches(stack, ll, recorder, weights_seed, tokens_per_frame, shape[1])
        started = time.perf_counter()
        trainer = ll.trainer_distillation.Trainer(cfg)
        initial = {"generator": _full_state(trainer.model.generator), "step": trainer.step}
        foresight = getattr(trainer.model, "foresight", None)
        if foresight is not None and getattr(foresight, "head", None) is not None:
            initial["head"] = {k: v.detach().clone() for k, v in foresight.head.state_dict().items()}
            initial["head_steps"] = foresight.head.steps_taken
        glue = watch_glue(trainer.model)
        _instrument(trainer, recorder, steps, grad_probe)
        timings["build_s"] = time.perf_counter() - started
        random.seed(seed + rank)
        np.random.seed(seed + rank)
        torch.manual_seed(seed + rank)
        started = time.perf_counter()
        try:
            trainer.train()
        except _StopTraining:
            pass
        if recorder.errors:
            raise recorder.errors[0]
        timings["train_s"] = time.perf_counter() - started
        trainer.save()
        result = {
            "logs": recorder.logs(),
            "losses": recorder.losses,
            "generator": _full_state(trainer.model.generator),
            "critic": _full_state(trainer.model.fake_score),
            "grads": recorder.grads,
            "initial": initial,
            "extra": {"timings": timings, "world_size": dist.get_world_size(), "final_step": trainer.step,
                      "commit": ll.commit, "lora": trainer.is_lora_enabled, "glue": glue,
                      "source_config": source, "config": _to_plain(cfg)},
        }
        if foresight is not None and getattr(foresight, "head", None) is not None:
            result["head"] = {k: v.detach().clone() for k, v in foresight.head.state_dict().items()}
            result["head_steps"] = getattr(foresight.head, "steps_taken", None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / "result.pt")
    dist.barrier()
    return result if rank == 0 else None


def run_inference(checkout, checkpoint, *, config, out, overrides=None, noise_seed=0, weights_seed=0):
    """LongLive's `CausalDiffusionInferencePipeline` on the tiny generator with a training checkpoint's
    weights loaded strictly (LoRA: `generator_lora` into a peft-wrapped generator); returns latents."""
    ll = import_longlive(checkout)
    _ensure_process_group()
    cfg = build_config(ll, config, overrides, logdir=Path(tempfile.mkdtemp(prefix="mirai-ll-inf-")))
    shape = list(cfg.image_or_video_shape)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    recorder = Recorder()
    with contextlib.ExitStack() as stack:
        _apply_patches(stack, ll, recorder, weights_seed, shape[3] * shape[4] // 4, shape[1])
        import importlib

        inference = importlib.import_module("pipeline.causal_diffusion_inference")
        # The inference pipeline sizes its caches from `wan_default_config` (24 heads of 128, 30 blocks).
        sizes = ll.utils_config.wan_default_config[cfg.model_kwargs.model_name]
        for key, value in (("num_heads", MODELS["num_heads"]), ("head_dim", MODELS["dim"] // MODELS["num_heads"]),
                           ("num_transformer_blocks", MODELS["num_layers"])):
            stack.enter_context(patched_item(sizes, key, value))
        pipe = inference.CausalDiffusionInferencePipeline(args=cfg, device=torch.device("cpu"))
        if "generator_lora" in state:
            import peft

            targets = sorted({n for n, m in pipe.generator.model.named_modules()
                              if isinstance(m, torch.nn.Linear) and ".blocks." in f".{n}"})
            lora = peft.LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha, target_modules=targets)
            pipe.generator.model = peft.get_peft_model(pipe.generator.model, lora)
            result = peft.set_peft_model_state_dict(pipe.generator.model, state["generator_lora"])
            if result.unexpected_keys:
                raise RuntimeError(f"unexpected LoRA keys: {result.unexpected_keys[:5]}")
        else:
            pipe.generator.load_state_dict({_strip(k): v for k, v in state["generator"].items()}, strict=True)
        gen = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(shape[0], shape[1], *shape[2:], generator=gen)
        torch.manual_seed(noise_seed)
        with torch.no_grad():
            latents = pipe.inference(noise=noise, text_prompts=[[PROMPTS[0]] * (shape[1] // 8)],
                                     return_latents=True)
    latents = latents[0] if isinstance(latents, tuple) else latents
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"video": latents, "keys": sorted(state)}, out / "inference.pt")
    return latents


def write_encoder_checkpoint(checkout, path, *, weights_seed=0) -> None:
    """The tiny bidirectional Wan (role "encoder") as LongLive's wrapper state dict, ``{"generator": ...}``:
    what ``foresight_encoder_ckpt`` points at in the tiny runs."""
    ll = import_longlive(checkout)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(ll.wan_5b_modules_model.WanModel, "from_pretrained",
                                     _tiny_from_pretrained(weights_seed + 1, False)))
        encoder = ll.utils_wan_5b_wrapper.WanDiffusionWrapper(is_causal=False)
    torch.save({"generator": encoder.state_dict()}, path)


def load_result(out) -> dict:
    return torch.load(Path(out) / "result.pt", map_location="cpu", weights_only=False)


def _to_plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("train", "inference", "encoder-ckpt"), default="train")
    parser.add_argument("--checkout", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--flat", default="{}")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--weights-seed", type=int, default=0)
    parser.add_argument("--grad-probe", action="store_true")
    parser.add_argument("--scene-cut-at", help="block of the scene cut in every sample; per rank: '2,-1' "
                                                "(rank 0 cuts at block 2, rank 1 has no cut)")
    parser.add_argument("--no-auto-resume", action="store_true")
    parser.add_argument("--checkpoint")
    parser.add_argument("--noise-seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.mode == "encoder-ckpt":
        write_encoder_checkpoint(args.checkout, args.out, weights_seed=args.weights_seed)
        return
    if args.mode == "train":
        result = run_training(args.checkout, config=args.config, steps=args.steps, out=args.out,
                              overrides=json.loads(args.overrides), flat=json.loads(args.flat), seed=args.seed,
                              weights_seed=args.weights_seed, grad_probe=args.grad_probe,
                              scene_cut_at=args.scene_cut_at, auto_resume=not args.no_auto_resume)
        if result is not None:
            print(f"[longlive_harness] {result['extra']['final_step']} iteration(s), "
                  f"timings {result['extra']['timings']}")
        dist.destroy_process_group()
        return
    latents = run_inference(args.checkout, args.checkpoint, config=args.config, out=args.out,
                            overrides=json.loads(args.overrides), noise_seed=args.noise_seed,
                            weights_seed=args.weights_seed)
    print(f"[longlive_harness] inference {tuple(latents.shape)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
