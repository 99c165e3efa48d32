"""Run the real upstream ``Trainer`` (Self-Forcing, Causal-Forcing, official Video-Mirai,
Rolling Forcing) on a CPU with
tiny random-weight models for a fixed number of iterations, and record everything it logs.

Nothing from the checkout is copied here: the checkout is imported from its own directory
(``upstream.import_upstream``) and every workaround is a monkeypatch applied from outside, for the
duration of one run, with a comment saying why. Point ``--checkout`` at a *copy* of a checkout
(patched or not); files under it are never edited.

Usage::

    python integration_tests/trainer_harness.py --checkout DIR --trainer dmd|ode --config CONFIG.yaml \\
        --steps N --out OUTDIR [--overrides JSON] [--seed S] [--models JSON] [--weights-seed W] [--grad-probe] \
        [--rollout rolling|self_forcing] [--rollout-frames F] [--split-probe]
    torchrun --nproc_per_node 2 integration_tests/trainer_harness.py ...        # same arguments
    python integration_tests/trainer_harness.py --mode inference --checkout DIR --config CONFIG.yaml \\
        --checkpoint OUTDIR/result.pt --noise-seed 0 --out OUTDIR2 [--overrides JSON] [--models JSON] [--use-ema]

``CONFIG.yaml`` is resolved against the working directory, then against the checkout
(``configs/self_forcing_dmd.yaml`` works). ``--overrides`` is a JSON object merged over the
config (e.g. ``{"foresight_student_layer": 1, "generator_ckpt": "/x/model.pt"}``). ``--models``
changes the tiny model sizes per role (``{"real_score": {"dim": 64}}``, see ``DEFAULT_MODELS``).

API (the same, from Python; each run wants its own process: checkouts share top-level package
names and one process can import only one)::

    run_training(checkout, trainer="dmd", config=..., steps=2, out=..., overrides=None, seed=1,
                 models=None, weights_seed=0, grad_probe=False, rollout=None,
                 rollout_frames=None, split_probe=False) -> dict | None   # the result, rank 0
    run_inference(checkout, generator_state_dict, noise_seed, config=..., overrides=None,
                  models=None, weights_seed=0, prompt=PROMPTS[0]) -> Tensor [b, f, c, h, w]
    load_result(out) -> dict

What each mode writes:

- training, ``OUTDIR/result.pt`` (rank 0), a dict:

  - ``logs``: what the trainer passed to ``wandb.log``, merged per step (``[{"step": s, key: float,
    ...}, ...]``), wall-clock keys left out;
  - ``losses``: one record per ``fwdbwd_one_step`` call (per ODE ``generator_loss`` call):
    ``{"step", "train_generator", "accum_index", "generator_loss" | "critic_loss", any other scalar
    the call returned, e.g. "foresight_loss"}``;
  - ``generator``, ``critic``: full state dicts after training, as the trainer's own
    ``fsdp_state_dict`` gives them (``critic`` None for ODE);
  - ``grads`` (``--grad-probe``, else None): full generator gradients keyed like ``generator``, just
    before the first generator optimizer step (after clipping); parameters without one are absent;
  - ``head_grads`` (``--grad-probe``, else None): the foresight head's gradients just before its first
    optimizer step (the patched trainers' head; Video-Mirai's ``mirai_projector`` and ``foresight_dim_proj``,
    keyed ``{"mirai_projector": {...}, "foresight_dim_proj": {...}}``);
  - ``extra``: ``generator_init``, ``critic_init``, ``real_score`` (weights as built), ``head_init`` (the
    foresight head's training state once the trainer is built, e.g. resumed), Video-Mirai's
    ``mirai_projector`` / ``foresight_dim_proj`` state dicts after training and as built (``..._init``), the
    merged ``config``, the raw
    ``wandb_calls``, ``timings`` (seconds), ``world_size``, ``steps``, ``final_step``, ``commit``, what the
    plug-in's glue held and saw (``glue``, see ``glue_record.py``), ``ema`` (the trainer's ``generator_ema``
    at the end: ``None``, or its ``shadow`` dict, and for each time the trainer built or updated it the
    hooks of this package left on the generator then: ``events``), ...

  And the trainer's own ``save()``: ``OUTDIR/logs/checkpoint_model_{step:06d}/model.pt``.
  With more than one rank, every rank also writes ``OUTDIR/rank{r}.pt``: its foresight head's training
  state at the end (``head``), what its glue saw (``glue``), its rollouts' modes (``rollouts``) and
  ``--split-probe``'s record (``split``).
- inference, ``OUTDIR/inference.pt``: ``{"video": latents [b, 21, 16, h, w], "noise_seed", "commit"}``;
  ``--use-ema`` loads the checkpoint's ``generator_ema`` instead of ``generator``, as ``inference.py
  --use_ema`` does. A checkout with ``pipeline/rolling_forcing_inference.py`` (Rolling Forcing,
  Causal-Forcing ``long_video/``) generates with that pipeline's ``inference_rolling_forcing``, as its
  ``inference.py`` does; the others with ``pipeline/causal_inference.py``.

Determinism: model weights depend only on the model's role (generator / real_score / fake_score)
and ``weights_seed``, never on construction order or on what else a trainer builds (each model is
built under a forked RNG seeded from its role), so the official Video-Mirai trainer and a patched
Self-Forcing trainer start from identical generator, real and fake score weights. Right before the
loop the harness seeds torch, numpy and random with ``seed + rank``, so from there on both runs
consume identical random streams. Data order is the sampler's (fixed seed). Modules a trainer
initialises from the global RNG after its ``set_seed(seed + rank)`` (Video-Mirai's projector) are
rank-dependent under FSDP (``sync_module_states=False``), exactly as upstream: a 2-rank run does not
reproduce a 1-rank run there.

Workarounds (besides those of ``upstream.import_upstream``; each is commented where applied):

1. Weights: ``CausalWanModel`` / ``WanModel.from_pretrained`` build tiny random models (role sizes
   in ``DEFAULT_MODELS``, output head re-initialised: ``init_weights`` zeroes it, which would make
   real and fake score agree and every DMD gradient 0).
2. ``WanTextEncoder`` (umT5-XXL) -> a fixed ``[512, text_dim]`` embedding per prompt text;
   ``WanVAEWrapper`` -> a stand-in whose decode returns the latents as "pixels" and whose encode is the
   inverse (a rollout longer than 21 frames decodes the frames before the last 20 and re-encodes the last
   "pixel" frame as the first latent frame: here, that latent frame itself).
3. ``WanDiffusionWrapper.seq_len`` (32760, the full-size video) -> the tiny video's token count.
4. diffusers 0.42 calls ``_set_gradient_checkpointing(enable=...)``: accept that signature.
5. Pipelines hard-code 30 blocks, 1560 tokens per frame and [b, ., 12, 128] caches: resized
   after ``__init__`` (``upstream.fit_pipeline_to_model``). Rolling Forcing's causal self-attention
   also hard-codes 1560 tokens per frame in its attention limit (21 frames) and its block length
   (3 frames): each attention module's ``frame_length``, ``max_attention_size`` and ``block_length``
   get the tiny video's tokens per frame, the frame counts kept (``upstream.fit_attention_to_frames``).
6. ``flex_attention`` (teacher forcing, ODE) has no CPU backward: SDPA on the dense mask from
   ``create_mask(block_mask.mask_mod, ...)``.
7. ``Tensor.cuda`` is the identity and ``torch.cuda.current_device()`` answers the CPU device
   (the trainer's ``self.device``, ``fsdp_wrap(device_id=...)``).
8. ``launch_distributed_job`` (nccl, ``torch.cuda.set_device``) -> gloo: torchrun's env://
   rendezvous, or a one-process file:// group. FSDP's ``device_count()`` answers the ranks per node, as
   a GPU node does, so ``sharding_strategy: hybrid_full`` runs as shipped (on a CPU the count is 1 and
   HYBRID_SHARD drops the all-reduce across ranks; ``upstream.devices_per_node_as_on_gpus``).
9. Config: ``generator_ckpt: null`` unless overridden, a small prompt file for ``data_path``, latents
   ``[1, 21, 16, 8, 8]``. ``mixed_precision`` and ``sharding_strategy`` stay as the config sets them
   (bf16 and ``hybrid_full`` in the shipped recipes): FSDP casts through the upstream ``fsdp_wrap`` on a
   CPU as on a GPU. The umT5 stand-in returns its dtype under that policy (bf16), as umT5 does.
10. ``fsdp_state_dict`` with ``offload_to_cpu=True`` segfaults on CPU: offload is turned off.
11. ``wandb`` -> a recorder (``disable_wandb: false``), so every ``wandb.log`` is kept (Rolling
    Forcing's tensorboard ``SummaryWriter.add_scalar`` too, as a one-key ``wandb.log``); missing
    ``wandb_host`` / ``wandb_key`` / ... config keys (Video-Mirai) get placeholders.
12. ``DataLoader(num_workers=8)`` -> 0 workers (forking the trainer process only costs time;
    the batch order does not depend on it).
13. ODE: ``ODERegressionLMDBDataset`` -> a synthetic trajectory per prompt; its loss gather passes
    a stacked ``[world, n]`` output to ``all_gather_into_tensor``, which gloo rejects: a concatenated
    view of the same memory is passed instead.
14. The ``while True`` loop: the step call raises a private exception once ``trainer.step``
    reaches N; a loop that ends earlier by itself (Video-Mirai ``max_steps`` < N) is fine too
    (``extra["final_step"]`` says where it stopped).
    Gradient accumulation needs nothing: N counts iterations (``self.step``), not calls.
15. ``--rollout rolling|self_forcing`` (Rolling Forcing only; default: the trainer's coin): the training
    pipeline's other rollout method is pointed at the one asked for. The coin is still drawn and
    broadcast, so the random streams are those of a run whose coin fell that way. Every run records the
    mode of each rollout (``extra["rollouts"]``).
16. ``--rollout-frames F`` (Rolling Forcing only; default: the trainer's draw): each step's rollout length
    is drawn by ``torch.randint`` from the blocks between 21 frames and ``num_training_frames``, the
    first ``torch.randint`` of ``_run_generator``. It is still drawn (same random streams), then
    replaced by ``F // num_frame_per_block`` blocks before rank 0 broadcasts it. ``F`` must be a whole
    number of blocks in that range.
17. ``--split-probe`` (Rolling Forcing only): every grad-enabled generator call of a captured rollout is
    run a second time right after it returns, with the same arguments, under ``torch.no_grad()`` and with
    this package's hooks taken off the student layer (a call writes the same KV-cache entries as before,
    so the rerun leaves the cache as it found it): its student-layer output, the whole call's tokens, is
    recorded with the call's ``current_start`` (``extra["split"]["calls"]``), next to the blocks the glue's
    ``window_blocks`` made of the capture (``extra["split"]["blocks"]``: segment, rollout block, the block's
    tokens). A test slices each joint call by ``current_start`` and frame counts and compares.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.machinery
import importlib.util
import json
import math
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
import upstream  # noqa: E402  (after the sys.path insert above)
from glue_record import record_ema, watch_glue  # noqa: E402  (after the sys.path insert above)
from monkeypatch import patched  # noqa: E402  (after the sys.path insert above)

__all__ = ["DEFAULT_MODELS", "PROMPTS", "SHAPE", "build_config", "load_result", "run_inference", "run_training"]

SHAPE = (1, 21, 16, 8, 8)  # latent video [b, f, c, h, w]: 21 frames (upstream assumes it), 16 tokens per frame
DEFAULT_MODELS = {
    "generator": {"dim": 64, "num_heads": 4, "ffn_dim": 128, "num_layers": 4},  # causal student
    "real_score": {"dim": 96, "num_heads": 4, "ffn_dim": 192, "num_layers": 4},  # frozen teacher (foresight encoder)
    "fake_score": {"dim": 64, "num_heads": 4, "ffn_dim": 128, "num_layers": 4},  # critic
    "text_dim": 32,
}
PROMPTS = (
    "A red fox trots through fresh snow at dawn.",
    "Waves roll onto a rocky beach under a grey sky.",
    "A chef slices vegetables on a wooden board.",
    "A paper boat drifts down a rain-filled gutter.",
    "Time-lapse of clouds passing over a mountain ridge.",
    "A child releases a yellow balloon in a park.",
    "A train crosses a stone bridge in autumn.",
    "Close-up of honeybees working on lavender flowers.",
)
TEXT_LEN = 512
ROLLOUTS = ("rolling", "self_forcing")  # Rolling Forcing's two rollout modes (`--rollout`)
WALL_CLOCK_KEYS = ("per iteration time",)  # logged by the loop; differs between identical runs
_FSDP_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class _StopTraining(Exception):
    """Raised by the step call once N iterations ran; caught only by ``run_training``."""


# ----------------------------------------------------------------------------- public API


def run_training(checkout, *, trainer: str = "dmd", config, steps: int, out, overrides: dict | None = None,
                 seed: int = 1, models: dict | None = None, weights_seed: int = 0,
                 grad_probe: bool = False, rollout: str | None = None,
                 rollout_frames: int | None = None, split_probe: bool = False) -> dict | None:
    """Train ``steps`` iterations of the checkout's own Trainer; write ``out/result.pt`` (rank 0).

    Returns the result dict on rank 0, None on other ranks.
    """
    if trainer not in ("dmd", "ode"):
        raise ValueError(f"trainer must be 'dmd' or 'ode', not {trainer!r}")
    timings = {}
    started = time.perf_counter()
    up = upstream.import_upstream(checkout)
    upstream.ensure_process_group()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = Path(out).resolve()
    cfg = build_config(up.checkout, config, overrides, seed=seed, logdir=out / "logs",
                       data_path=_write_prompt_file())
    sizes = _model_sizes(models)
    recorder = _Recorder()
    module = _import_trainer(trainer, recorder)
    timings["import_s"] = time.perf_counter() - started

    with contextlib.ExitStack() as stack:
        _apply_tiny_model_patches(stack, up, cfg, sizes, weights_seed)
        _apply_trainer_patches(stack, up, module, recorder, trainer, seed)
        _record_rollouts(stack, recorder, rollout)
        if rollout_frames is not None:
            _force_rollout_frames(stack, rollout_frames)
        stack.enter_context(record_ema(module, recorder.ema_events))

        started = time.perf_counter()
        instance = module.Trainer(cfg)
        initial = _initial_state(module, instance.model)
        initial["head_init"] = _head_state(instance.model)
        glue = watch_glue(instance.model)
        _instrument(instance, trainer, recorder, steps, grad_probe)
        if split_probe:
            _install_split_probe(stack, instance.model, recorder)
        timings["build_s"] = time.perf_counter() - started

        # Both runs of a comparison consume identical random streams from here on,
        # whatever their constructors drew (e.g. Video-Mirai's projector init).
        _seed_everything(seed + rank)
        started = time.perf_counter()
        try:
            instance.train()
        except _StopTraining:
            pass
        timings["train_s"] = time.perf_counter() - started

        started = time.perf_counter()
        instance.save()
        result = _collect(module, instance, recorder, initial)
        head = _head_state(instance.model) if world_size > 1 else None  # for rank{r}.pt; collective under FSDP
        timings["save_s"] = time.perf_counter() - started

    result["extra"].update(
        timings=timings, world_size=world_size, steps=steps, final_step=instance.step, trainer=trainer,
        checkout=str(up.checkout), commit=up.commit, seed=seed, weights_seed=weights_seed, models=sizes,
        config=_to_container(cfg), glue=glue, rollout=rollout, rollout_frames=rollout_frames)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        torch.save(result, out / "result.pt")
    if world_size > 1:  # what each rank's head and glue ended with (rank 0's result holds rank 0's only)
        torch.save({"head": head, "glue": glue, "rollouts": recorder.rollouts, "split": recorder.split},
                   out / f"rank{rank}.pt")
    dist.barrier()
    return result if rank == 0 else None


def run_inference(checkout, generator_state_dict: dict, noise_seed: int, *, config, overrides: dict | None = None,
                  models: dict | None = None, weights_seed: int = 0, prompt: str = PROMPTS[0]) -> torch.Tensor:
    """The checkout's `CausalInferencePipeline` on the tiny generator with the given weights: from
    ``pipeline/rolling_forcing_inference.py`` with its ``inference_rolling_forcing`` where the checkout has it
    (Rolling Forcing, Causal-Forcing ``long_video/``: what their ``inference.py`` runs), else from
    ``pipeline/causal_inference.py`` with ``inference``.

    The state dict loads with ``strict=True`` after stripping FSDP prefixes (as a user's checkpoint
    would). Noise and every later draw come from ``noise_seed``. Returns the generated latents
    ``[b, f, c, h, w]`` (the VAE is a stand-in, so pixels would say nothing more).
    """
    up = upstream.import_upstream(checkout)
    rolling = (up.checkout / "pipeline" / "rolling_forcing_inference.py").is_file()
    (causal_inference,) = upstream.import_modules(
        "pipeline.rolling_forcing_inference" if rolling else "pipeline.causal_inference")
    cfg = build_config(up.checkout, config, overrides, seed=1, logdir=Path(tempfile.mkdtemp(prefix="mirai-inf-")),
                       data_path=_write_prompt_file())
    sizes = _model_sizes(models)
    with contextlib.ExitStack() as stack:
        _apply_tiny_model_patches(stack, up, cfg, sizes, weights_seed)
        pipe = causal_inference.CausalInferencePipeline(cfg, device=torch.device("cpu"))
        pipe.generator.load_state_dict(_strip_fsdp_prefixes(generator_state_dict), strict=True)
        noise = torch.randn(list(cfg.image_or_video_shape), generator=torch.Generator().manual_seed(noise_seed))
        torch.manual_seed(noise_seed)  # the re-noising between denoising steps draws from the global RNG
        with torch.no_grad():
            generate = pipe.inference_rolling_forcing if rolling else pipe.inference
            _, latents = generate(noise=noise, text_prompts=[prompt] * noise.shape[0], return_latents=True)
    return latents


def load_result(out) -> dict:
    """``out/result.pt`` as written by ``run_training``."""
    return torch.load(Path(out) / "result.pt", map_location="cpu", weights_only=True)


def build_config(checkout, config, overrides: dict | None = None, *, seed: int, logdir, data_path):
    """The config as the checkout's ``train.py`` builds it, plus the tiny-run and CPU keys.

    Order: ``configs/default_config.yaml`` <- ``config`` <- what train.py sets from its command line
    (a plain launch: no flags) <- tiny-run defaults <- ``overrides`` <- keys every run sets (a fixed seed,
    the recorder's logging, the output folder).
    """
    from omegaconf import OmegaConf

    if seed == 0:
        raise ValueError("seed 0 makes the upstream Trainer draw a random seed: pass a seed >= 1")
    root = Path(checkout)
    path = Path(config)
    if not path.is_file():
        path = root / config
    if not path.is_file():
        raise FileNotFoundError(f"config {config!r} not found in the working directory nor in {root}")
    cfg = OmegaConf.merge(OmegaConf.load(root / "configs" / "default_config.yaml"), OmegaConf.load(path))
    # train.py of the three checkouts, launched without flags (union of their keys).
    cfg.no_save = False
    cfg.no_visualize = False
    cfg.tf = False
    cfg.resume_ckpt = None
    cfg.config_name = os.path.basename(str(path)).split(".")[0]
    cfg.wandb_save_dir = ""
    tiny = {
        "image_or_video_shape": list(SHAPE),
        "generator_ckpt": None,  # no pretrained checkpoint for a random tiny model; overrides may set one
        "data_path": str(data_path),
        # Read by `wandb.login` / `wandb.init` when wandb is on; some configs leave them out
        # (Video-Mirai's), and the recorder ignores them.
        **{key: "unused" for key in ("wandb_host", "wandb_key", "wandb_entity", "wandb_project") if key not in cfg},
    }
    forced = {
        "seed": seed,  # 0 would mean "draw one at random"
        "disable_wandb": False,  # wandb is a recorder: keep the trainer's logging on
        "logdir": str(logdir),
    }
    return OmegaConf.merge(cfg, tiny, overrides or {}, forced)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("train", "inference"), default="train")
    parser.add_argument("--checkout", required=True, help="a (copy of a) Self-Forcing / Causal-Forcing / "
                                                          "Video-Mirai checkout")
    parser.add_argument("--trainer", choices=("dmd", "ode"), default="dmd")
    parser.add_argument("--config", required=True, help="YAML, relative to the cwd or to the checkout")
    parser.add_argument("--overrides", default="{}", help="JSON object merged over the config")
    parser.add_argument("--models", default="{}", help="JSON: tiny model sizes per role (see DEFAULT_MODELS)")
    parser.add_argument("--steps", type=int, default=1, help="training iterations (trainer.step increments)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--weights-seed", type=int, default=0)
    parser.add_argument("--grad-probe", action="store_true", help="record full generator gradients before "
                                                                  "the first generator optimizer step")
    parser.add_argument("--rollout", choices=ROLLOUTS, help="Rolling Forcing: this rollout mode on every "
                                                            "step instead of the trainer's coin")
    parser.add_argument("--rollout-frames", type=int, help="Rolling Forcing: rollouts of this many frames "
                                                               "instead of the trainer's draw")
    parser.add_argument("--split-probe", action="store_true", help="Rolling Forcing: rerun every captured "
                                                                   "generator call without the capture and record "
                                                                   "it next to the glue's per-block split")
    parser.add_argument("--checkpoint", help="inference: model.pt or result.pt holding a 'generator' state dict")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--use-ema", action="store_true", help="inference: the checkpoint's generator_ema "
                                                               "(inference.py --use_ema)")
    args = parser.parse_args(argv)
    overrides, models = json.loads(args.overrides), json.loads(args.models)

    if args.mode == "train":
        result = run_training(args.checkout, trainer=args.trainer, config=args.config, steps=args.steps,
                              out=args.out, overrides=overrides, seed=args.seed, models=models,
                              weights_seed=args.weights_seed, grad_probe=args.grad_probe, rollout=args.rollout,
                              rollout_frames=args.rollout_frames, split_probe=args.split_probe)
        if result is not None:
            extra = result["extra"]
            print(f"[trainer_harness] {extra['final_step']} iteration(s) (asked {args.steps}) on "
                  f"{extra['world_size']} rank(s), timings {extra['timings']}; wrote {Path(args.out) / 'result.pt'}")
        dist.destroy_process_group()
        return
    if not args.checkpoint:
        parser.error("--mode inference needs --checkpoint")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    weights = state["generator_ema"] if args.use_ema else state.get("generator", state)
    video = run_inference(args.checkout, weights, args.noise_seed, config=args.config,
                          overrides=overrides, models=models, weights_seed=args.weights_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = upstream.import_upstream(args.checkout).commit
    torch.save({"video": video, "noise_seed": args.noise_seed, "commit": commit}, out / "inference.pt")
    print(f"[trainer_harness] inference {tuple(video.shape)}; wrote {out / 'inference.pt'}")


# ----------------------------------------------------------------------------- patching helpers


def _checkout_modules(root: Path):
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(root):
            yield module


def _replace_everywhere(stack: contextlib.ExitStack, root: Path, original, replacement) -> None:
    # Modules bind upstream classes with `from utils.wan_wrapper import ...`, so every
    # importing module holds its own reference: replace each of them.
    for module in _checkout_modules(root):
        for name, value in list(vars(module).items()):
            if value is original:
                stack.enter_context(patched(module, name, replacement))


# ----------------------------------------------------------------------------- tiny models and stand-ins


def _model_sizes(models: dict | None) -> dict:
    sizes = {role: dict(spec) if isinstance(spec, dict) else spec for role, spec in DEFAULT_MODELS.items()}
    for role, spec in (models or {}).items():
        if role not in sizes:
            raise ValueError(f"unknown model role {role!r}: expected one of {sorted(sizes)}")
        sizes[role] = {**sizes[role], **spec} if isinstance(spec, dict) else spec
    return sizes


def _role_seed(role: str, weights_seed: int) -> int:
    return zlib.crc32(f"{weights_seed}:{role}".encode())


def _tiny_from_pretrained(sizes: dict, weights_seed: int, *, causal: bool, tokens_per_frame=None):
    """A `from_pretrained` that builds the tiny model of the role being constructed.

    Roles follow from how upstream builds its models (`BaseModel._initialize_models` in all three
    checkouts): a CausalWanModel is the generator (the ODE model builds it twice, identically); the
    first WanModel is the real score (in an ODE run: whatever frozen encoder a patched trainer
    builds), the second the fake score. ``tokens_per_frame(model)``: the tiny video's tokens per frame,
    for attention modules that hard-code Wan's 1560 (Rolling Forcing's).
    """
    built = []

    def from_pretrained(cls, *args, **kwargs):
        if causal:
            role = "generator"
        else:
            role = ("real_score", "fake_score")[min(len(built), 1)]
            built.append(role)
        build = upstream.tiny_causal_wan if causal else upstream.tiny_wan
        extra = dict(gradient_checkpointing=False, **kwargs) if causal else {}  # the config turns it on
        # Weights depend on the role only: a forked RNG seeded from the role, so neither the
        # construction order nor anything else the trainer draws can change them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_role_seed(role, weights_seed))
            model = build(**sizes[role], text_dim=sizes["text_dim"], text_len=TEXT_LEN, **extra)
        if tokens_per_frame is not None:
            upstream.fit_attention_to_frames(model, tokens_per_frame(model))
        return model

    return classmethod(from_pretrained)


class _TinyTextEncoder(torch.nn.Module):
    """Stands in for `WanTextEncoder` (umT5-XXL): a fixed ``[512, text_dim]`` embedding per prompt,
    drawn from a generator seeded by the prompt text, so every trainer sees the same conditioning.

    umT5 returns its weights' dtype: bfloat16 under the trainer's FSDP mixed precision. A frozen
    unit parameter gives FSDP the same thing to cast, so the embeddings come out in that dtype too."""

    def __init__(self, text_dim: int):
        super().__init__()
        self.text_dim = text_dim
        self.unit = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, text_prompts):
        embeds = [torch.randn(TEXT_LEN, self.text_dim, generator=torch.Generator().manual_seed(
            zlib.crc32(prompt.encode()))) for prompt in text_prompts]
        return {"prompt_embeds": torch.stack(embeds).to(self.unit.dtype) * self.unit}  # (b 512 text_dim)


class _TinyVAE(torch.nn.Module):
    """Stands in for `WanVAEWrapper`: 'pixels' are the latents. Inference decodes once at the end;
    training decodes a rollout longer than 21 frames up to its last 20 and re-encodes the last 'pixel'
    frame (``[b, c, t, h, w]``, as the trainer rearranges it) as the first latent frame: encode
    undoes decode, so that frame comes back as it was rolled out."""

    def decode_to_pixel(self, latent, use_cache=False):
        return latent  # (b f c h w)

    def encode_to_latent(self, pixel):
        return pixel.transpose(1, 2)  # (b c f h w) -> (b f c h w)


class _SyntheticODEDataset(torch.utils.data.Dataset):
    """Stands in for `ODERegressionLMDBDataset`: per prompt of ``data_path``, a straight path from
    noise to a random clean latent at noise levels 1, .75, .5, .25, 0 (most noisy first, as the LMDB
    stores it), deterministic in ``(seed, index)``."""

    def __init__(self, data_path, max_pair=int(1e8), *, seed: int, shape=SHAPE):
        self.prompts = Path(data_path).read_text(encoding="utf-8").splitlines()[:max_pair]
        self.seed, self.shape = seed, tuple(shape[1:])

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, idx):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + idx)
        clean, noise = torch.randn(self.shape, generator=gen), torch.randn(self.shape, generator=gen)  # (f c h w)
        sigma = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]).view(-1, 1, 1, 1, 1)
        return {"prompts": self.prompts[idx], "ode_latent": (1 - sigma) * clean + sigma * noise}  # (5 f c h w)


def _write_prompt_file() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mirai-prompts-")) / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- attention


_DENSE_MASKS: dict[int, tuple] = {}


def _dense_flex_attention(query, key, value, block_mask=None, **kwargs):
    """Drop-in for upstream's compiled `flex_attention` (q/k/v [b, n, l, d]), which has no CPU
    backward: SDPA on the dense boolean mask of ``block_mask`` (cached per mask object)."""
    from torch.nn.attention.flex_attention import create_mask

    if kwargs:
        raise NotImplementedError(f"flex_attention options {sorted(kwargs)} are not used upstream")
    lq, lk = query.shape[-2], key.shape[-2]
    cached = _DENSE_MASKS.get(id(block_mask))
    if cached is None or cached[0] is not block_mask or cached[1].shape[-2:] != (lq, lk):
        mask = create_mask(block_mask.mask_mod, None, None, lq, lk, device=query.device)  # (1 1 lq lk)
        _DENSE_MASKS[id(block_mask)] = cached = (block_mask, mask)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=cached[1])  # (b n lq d)


# ----------------------------------------------------------------------------- patches


def _apply_tiny_model_patches(stack: contextlib.ExitStack, up, cfg, sizes: dict, weights_seed: int) -> None:
    """Everything a tiny CPU run of the upstream models and pipelines needs (training and inference)."""
    _, frames, _, height, width = cfg.image_or_video_shape
    def tokens_per_frame(model):
        return (height // model.patch_size[1]) * (width // model.patch_size[2])

    stack.enter_context(patched(up.CausalWanModel, "from_pretrained",
                                 _tiny_from_pretrained(sizes, weights_seed, causal=True,
                                                       tokens_per_frame=tokens_per_frame)))
    stack.enter_context(patched(up.WanModel, "from_pretrained",
                                 _tiny_from_pretrained(sizes, weights_seed, causal=False)))

    # diffusers 0.42 calls `_set_gradient_checkpointing(enable=..., gradient_checkpointing_func=...)`,
    # which upstream's `(module, value)` signature rejects: set the flag the forwards read.
    def set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None):
        self.gradient_checkpointing = enable

    for cls in (up.CausalWanModel, up.WanModel):
        stack.enter_context(patched(cls, "_set_gradient_checkpointing", set_gradient_checkpointing))

    # `seq_len` is hard-coded to 32760 (the full-size 21x60x104 video): the bidirectional model
    # zero-pads every input to it. Use the tiny video's token count, set in `__init__` so that
    # it survives FSDP wrapping.
    wrapper_init = up.WanDiffusionWrapper.__init__

    @functools.wraps(wrapper_init)
    def wrapper_init_tiny(self, *args, **kwargs):
        wrapper_init(self, *args, **kwargs)
        self.seq_len = math.prod(n // p for n, p in zip((frames, height, width), self.model.patch_size, strict=True))

    stack.enter_context(patched(up.WanDiffusionWrapper, "__init__", wrapper_init_tiny))

    # umT5-XXL and the Wan VAE need their checkpoints: small stand-ins.
    _replace_everywhere(stack, up.checkout, up.wan_wrapper.WanTextEncoder,
                        functools.partial(_TinyTextEncoder, sizes["text_dim"]))
    _replace_everywhere(stack, up.checkout, up.wan_wrapper.WanVAEWrapper, _TinyVAE)

    # Pipelines hard-code Wan-1.3B sizes (30 blocks, 1560 tokens per frame, 12x128 caches).
    pipeline_pkg = sys.modules["pipeline"]
    for name in getattr(pipeline_pkg, "__all__", ()):
        cls = getattr(pipeline_pkg, name)
        if isinstance(cls, type) and hasattr(cls, "_initialize_kv_cache"):
            stack.enter_context(patched(cls, "__init__", _fitted_init(cls.__init__, height, width)))

    # The teacher-forcing forward (`_forward_train` with `clean_x`, ODE) calls the compiled
    # `flex_attention`, which has no CPU backward.
    if hasattr(up.causal_model, "flex_attention"):
        stack.enter_context(patched(up.causal_model, "flex_attention", _dense_flex_attention))

    # Rollouts end with `.cuda()` on timestep tensors; the trainer takes its device from
    # `torch.cuda.current_device()` (also `fsdp_wrap(device_id=...)`, which must be the CPU device).
    stack.enter_context(upstream.cuda_is_identity())
    stack.enter_context(patched(torch.cuda, "current_device", lambda: torch.device("cpu")))


def _fitted_init(init, height: int, width: int):
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        upstream.fit_pipeline_to_model(self, self.generator.model, height=height, width=width)
    return wrapped


def _record_rollouts(stack: contextlib.ExitStack, recorder: _Recorder, rollout: str | None) -> None:
    """Rolling Forcing's `_consistency_backward_simulation` draws a coin (rank 0's, broadcast) between
    the training pipeline's two rollouts. Each rollout's mode is recorded (``extra["rollouts"]``, in call
    order); with ``rollout`` set, both methods run that mode's rollout, so every step, the generator's and
    the critic's, runs it while the coin is still drawn as upstream draws it."""
    if rollout is not None and rollout not in ROLLOUTS:
        raise ValueError(f"rollout must be one of {ROLLOUTS}, not {rollout!r}")
    pipeline_cls = getattr(sys.modules.get("pipeline"), "RollingForcingTrainingPipeline", None)
    if pipeline_cls is None:
        if rollout is not None:
            raise ValueError(f"--rollout {rollout}: this checkout has no RollingForcingTrainingPipeline "
                             "(only Rolling Forcing chooses between two rollouts)")
        return
    names = {"rolling": "inference_with_rolling_forcing", "self_forcing": "inference_with_self_forcing"}
    methods = {mode: getattr(pipeline_cls, name) for mode, name in names.items()}

    def recorded(mode):
        method = methods[mode]

        @functools.wraps(method)
        def run(*args, **kwargs):
            recorder.rollouts.append(mode)
            return method(*args, **kwargs)
        return run

    for mode in ROLLOUTS:
        stack.enter_context(patched(pipeline_cls, names[mode], recorded(rollout or mode)))


def _force_rollout_frames(stack: contextlib.ExitStack, frames: int) -> None:
    """Rolling Forcing's `_run_generator` draws the rollout's block count with its first `torch.randint`
    (then broadcasts rank 0's): draw it as upstream does, then answer ``frames`` worth of blocks."""
    model_cls = getattr(sys.modules.get("model.base"), "RollingForcingModel", None)
    if model_cls is None:
        raise ValueError(f"--rollout-frames {frames}: this checkout has no RollingForcingModel "
                         "(only Rolling Forcing draws its rollout length)")
    run_generator = model_cls._run_generator

    @functools.wraps(run_generator)
    def run_generator_of_length(self, *args, **kwargs):
        per_block, longest = self.num_frame_per_block, self.num_training_frames
        if frames % per_block or not 21 <= frames <= longest:
            raise ValueError(f"--rollout-frames {frames}: not a whole number of {per_block}-frame blocks "
                             f"from 21 to num_training_frames = {longest}")
        randint = torch.randint
        drawn = []

        def block_count_then_upstream(*a, **k):
            value = randint(*a, **k)
            if drawn:
                return value
            drawn.append(value)
            return torch.full_like(value, frames // per_block)

        with patched(torch, "randint", block_count_then_upstream):
            return run_generator(self, *args, **kwargs)

    stack.enter_context(patched(model_cls, "_run_generator", run_generator_of_length))


def _import_trainer(kind: str, recorder: _Recorder) -> types.ModuleType:
    # The trainer modules `import wandb`: when it is not installed, the recorder stands in
    # (it is also patched into the module below, installed or not).
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        sys.modules["wandb"] = recorder.wandb
    # Rolling Forcing's imports `torch.utils.tensorboard.SummaryWriter`, which needs tensorboard.
    if "torch.utils.tensorboard" not in sys.modules and importlib.util.find_spec("tensorboard") is None:
        sys.modules["torch.utils.tensorboard"] = recorder.tensorboard
    (module,) = upstream.import_modules({"dmd": "trainer.distillation", "ode": "trainer.ode"}[kind])
    return module


def _apply_trainer_patches(stack: contextlib.ExitStack, up, module, recorder: _Recorder, kind: str,
                           seed: int) -> None:
    """What the upstream Trainer needs beyond the models: process group, state dicts, logging, data."""
    # nccl has no CPU support and `torch.cuda.set_device` needs CUDA: use gloo (torchrun's env://
    # rendezvous, or a one-process file:// group); `run_training` already created it.
    stack.enter_context(patched(module, "launch_distributed_job", upstream.ensure_process_group))
    stack.enter_context(upstream.devices_per_node_as_on_gpus())  # `hybrid_full` as on one GPU node

    # `fsdp_state_dict` gathers with `offload_to_cpu=True`, which segfaults on CPU tensors.
    distributed = sys.modules["utils.distributed"]
    full_config = distributed.FullStateDictConfig

    def no_offload(*args, **kwargs):
        return full_config(*args, **{**kwargs, "offload_to_cpu": False})

    stack.enter_context(patched(distributed, "FullStateDictConfig", no_offload))

    # wandb is a recorder, so `wandb.log(d, step=...)` calls are kept; so is Rolling Forcing's
    # tensorboard `SummaryWriter` (each `add_scalar(name, value, step)` kept as `wandb.log({name: value}, step)`).
    stack.enter_context(patched(module, "wandb", recorder.wandb))
    if hasattr(module, "SummaryWriter"):
        stack.enter_context(patched(module, "SummaryWriter", recorder.tensorboard.SummaryWriter))

    # `DataLoader(num_workers=8)` forks the whole trainer process per worker; on a CPU this only
    # costs time, and the batch order (the sampler's) does not depend on the workers.
    data_loader = torch.utils.data.DataLoader

    def in_process_loader(*args, **kwargs):
        return data_loader(*args, **{**kwargs, "num_workers": 0})

    stack.enter_context(patched(torch.utils.data, "DataLoader", in_process_loader))

    if kind == "ode":
        # The ODE trainer reads ODE trajectories from an LMDB: a synthetic one per prompt instead.
        stack.enter_context(patched(module, "ODERegressionLMDBDataset",
                                     functools.partial(_SyntheticODEDataset, seed=seed)))
        # It gathers per-sample losses into a stacked [world, *shape] tensor, which NCCL accepts
        # and gloo rejects (it wants [world * n, ...]): hand gloo a concatenated view of the
        # same memory.
        stack.enter_context(patched(dist, "all_gather_into_tensor", _gloo_all_gather(dist.all_gather_into_tensor)))


def _gloo_all_gather(all_gather_into_tensor):
    @functools.wraps(all_gather_into_tensor)
    def gather(output_tensor, input_tensor, *args, **kwargs):
        if output_tensor.dim() == input_tensor.dim() + 1 and input_tensor.dim() >= 1:  # stacked layout
            output_tensor = output_tensor.view(-1, *input_tensor.shape[1:])  # (world*n ...)
        return all_gather_into_tensor(output_tensor, input_tensor, *args, **kwargs)
    return gather


# ----------------------------------------------------------------------------- recording


class _Recorder:
    """Collects what a run logs: wandb calls, per-call losses, the generator gradient probe."""

    def __init__(self):
        self.wandb_calls: list[tuple[int | None, dict]] = []
        self.losses: list[dict] = []
        self.grads: dict | None = None
        self.grads_step: int | None = None
        self.head_grads: dict | None = None
        self.ema_events: list[dict] = []
        self.rollouts: list[str] = []  # Rolling Forcing: the mode of each rollout, in call order
        self.split: dict | None = None  # Rolling Forcing's --split-probe: joint calls and the glue's blocks
        self.wandb = self._wandb_module()
        self.tensorboard = self._tensorboard_module()

    def _wandb_module(self) -> types.ModuleType:
        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        stub.login = lambda *args, **kwargs: True
        stub.init = lambda *args, **kwargs: None
        stub.finish = lambda *args, **kwargs: None
        stub.log = self._log
        return stub

    def _tensorboard_module(self) -> types.ModuleType:
        log = self._log

        class SummaryWriter:
            def __init__(self, *args, **kwargs):
                pass

            def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
                log({tag: scalar_value}, step=global_step)

            def flush(self):
                pass

            def close(self):
                pass

        stub = types.ModuleType("torch.utils.tensorboard")
        stub.__spec__ = importlib.machinery.ModuleSpec("torch.utils.tensorboard", None)
        stub.SummaryWriter = SummaryWriter
        return stub

    def _log(self, data: dict, step: int | None = None, **kwargs) -> None:
        self.wandb_calls.append((step, _scalars(data)))

    def record_loss(self, step: int, train_generator: bool, values: dict) -> None:
        # `accum_index` counts calls within one update (gradient accumulation, Video-Mirai).
        accum_index = sum(r["step"] == step and r["train_generator"] == train_generator for r in self.losses)
        self.losses.append({"step": step, "train_generator": train_generator, "accum_index": accum_index, **values})

    def logs(self) -> list[dict]:
        """wandb calls merged per step, wall-clock keys left out."""
        merged: dict = {}
        for step, data in self.wandb_calls:
            entry = merged.setdefault(step, {"step": step})
            entry.update({k: v for k, v in data.items() if k not in WALL_CLOCK_KEYS})
        return [merged[step] for step in sorted(merged, key=lambda s: -1 if s is None else s)]


def _scalars(data: dict) -> dict:
    out = {}
    for key, value in data.items():
        if torch.is_tensor(value) and value.numel() == 1:
            out[key] = value.item()
        elif isinstance(value, (int, float, bool)):
            out[key] = value
    return out


def _instrument(trainer, kind: str, recorder: _Recorder, steps: int, grad_probe: bool) -> None:
    """Stop after ``steps`` iterations and record losses (and optionally gradients) on ``trainer``."""
    if kind == "dmd":
        fwdbwd = trainer.fwdbwd_one_step

        @functools.wraps(fwdbwd)
        def fwdbwd_recorded(batch, train_generator, *args, **kwargs):
            if trainer.step >= steps:
                raise _StopTraining
            log = fwdbwd(batch, train_generator, *args, **kwargs)
            recorder.record_loss(trainer.step, bool(train_generator), _scalars(log))
            return log

        trainer.fwdbwd_one_step = fwdbwd_recorded
    else:
        one_step, generator_loss = trainer.train_one_step, trainer.model.generator_loss

        @functools.wraps(one_step)
        def one_step_bounded(*args, **kwargs):
            if trainer.step >= steps:
                raise _StopTraining
            return one_step(*args, **kwargs)

        @functools.wraps(generator_loss)
        def generator_loss_recorded(*args, **kwargs):
            loss, log = generator_loss(*args, **kwargs)
            recorder.record_loss(trainer.step, True, {"generator_loss": loss.item(), **_scalars(log)})
            return loss, log

        trainer.train_one_step = one_step_bounded
        trainer.model.generator_loss = generator_loss_recorded
    if grad_probe:
        _install_grad_probe(trainer, recorder)


def _install_grad_probe(trainer, recorder: _Recorder) -> None:
    # A step pre-hook runs after the loop's clipping, just before the update; on every rank
    # (gathering full gradients is a collective). Removed after the first generator step.
    handle = None

    def probe(optimizer, args, kwargs):
        handle.remove()
        recorder.grads = _full_grads(trainer.model.generator)
        recorder.grads_step = trainer.step

    handle = trainer.generator_optimizer.register_step_pre_hook(probe)
    _install_head_grad_probe(trainer, recorder)


def _install_head_grad_probe(trainer, recorder: _Recorder) -> None:
    # The head's (or Video-Mirai's projector's) gradients just before its first optimizer step. The patched
    # head makes its optimizer on first use: asking for it here only makes it earlier (same parameters).
    model = trainer.model
    head = getattr(getattr(model, "foresight", None), "head", None)
    if head is not None:
        optimizer = head.optimizer
        modules = {"head": head.optimization.wrapper or head}
    elif getattr(trainer, "projector_optimizer", None) is not None:
        optimizer = trainer.projector_optimizer
        modules = {name: getattr(model, name) for name in ("mirai_projector", "foresight_dim_proj")
                   if getattr(model, name, None) is not None}
    else:
        return
    handle = None

    def probe(optimizer, args, kwargs):
        handle.remove()
        grads = {name: _full_grads(module) for name, module in modules.items()}
        recorder.head_grads = grads.get("head", grads)

    handle = optimizer.register_step_pre_hook(probe)


def _install_split_probe(stack: contextlib.ExitStack, model, recorder: _Recorder) -> None:
    """``--split-probe`` (workaround list, 17): the glue's per-block split and each captured call rerun whole."""
    glue_module = sys.modules.get("mirai_plugin.integrations.rolling_forcing")
    glue = getattr(model, "foresight", None)
    if glue_module is None or not isinstance(glue, glue_module.RollingForcingForesight):
        raise ValueError("--split-probe: the model has no Rolling Forcing glue (patched Rolling Forcing only)")
    from mirai_plugin.capture import block_at

    block, _ = block_at(model.generator, glue.config.student_layer)
    split: dict = {"calls": [], "blocks": []}
    recorder.split = split
    window_blocks = glue_module.window_blocks

    @functools.wraps(window_blocks)
    def blocks_recorded(records, **kwargs):
        blocks = window_blocks(records, **kwargs)
        split["blocks"] += [{"segment": b.segment, "rollout_block": b.rollout_block, "call": b.record.call_index,
                             "hidden": b.record.hidden.detach().clone()} for b in blocks]
        return blocks

    stack.enter_context(patched(glue_module, "window_blocks", blocks_recorded))

    def rerun(module, args, kwargs, output):
        if not torch.is_grad_enabled() or kwargs.get("updating_cache") or glue._captured is None:
            return  # not a captured call (cache update, no-grad window, critic rollout, rerun itself)
        ours = {k: h for k, h in block._forward_hooks.items()
                if getattr(h, "__module__", "").startswith("mirai_plugin")}
        for key in ours:
            del block._forward_hooks[key]
        joint = []
        handle = block.register_forward_hook(lambda m, a, o: joint.append(o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad():
                module(*args, **kwargs)
        finally:
            handle.remove()
            block._forward_hooks.update(ours)
        (hidden,) = joint
        split["calls"].append({"current_start": int(kwargs["current_start"]), "hidden": hidden.detach().clone()})

    handle = model.generator.register_forward_hook(rerun, with_kwargs=True)
    stack.callback(handle.remove)


def _head_state(model) -> dict | None:
    # The foresight head's full training state (a collective under FSDP: every rank calls it).
    head = getattr(getattr(model, "foresight", None), "head", None)
    return None if head is None else head.training_state()


def _full_grads(module) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    context = (FSDP.summon_full_params(module, writeback=False, with_grads=True) if isinstance(module, FSDP)
               else contextlib.nullcontext())
    with context:
        return {_strip_name(n): p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _state_dict(module, fsdp_module) -> dict:
    # The trainer module's own `fsdp_state_dict` (collective; full on rank 0, empty elsewhere).
    return {k: v.detach().clone() for k, v in module.fsdp_state_dict(fsdp_module).items()}


def _initial_state(module, model) -> dict:
    """Weights right after construction: generator, critic and the frozen real score (DMD)."""
    initial = {"generator_init": _state_dict(module, model.generator)}
    if hasattr(model, "fake_score"):
        initial["critic_init"] = _state_dict(module, model.fake_score)
        initial["real_score"] = _state_dict(module, model.real_score)
    for name in ("mirai_projector", "foresight_dim_proj"):  # Video-Mirai's foresight modules
        if getattr(model, name, None) is not None:
            initial[f"{name}_init"] = _state_dict(module, getattr(model, name))
    return initial


def _collect(module, trainer, recorder: _Recorder, initial: dict) -> dict:
    model = trainer.model
    ema = getattr(trainer, "generator_ema", None)
    extra = {**initial, "wandb_calls": recorder.wandb_calls, "grads_step": recorder.grads_step,
             "rollouts": recorder.rollouts, "split": recorder.split,
             "ema": {"shadow": None if ema is None else {k: v.clone() for k, v in ema.state_dict().items()},
                     "events": recorder.ema_events}}
    for name in ("mirai_projector", "foresight_dim_proj"):  # Video-Mirai's foresight modules
        if getattr(model, name, None) is not None:
            extra[name] = _state_dict(module, getattr(model, name))
    return {
        "logs": recorder.logs(),
        "losses": recorder.losses,
        "generator": _state_dict(module, model.generator),
        "critic": _state_dict(module, model.fake_score) if hasattr(model, "fake_score") else None,
        "grads": recorder.grads,
        "head_grads": recorder.head_grads,
        "extra": extra,
    }


# ----------------------------------------------------------------------------- small helpers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _strip_name(name: str) -> str:
    for prefix in _FSDP_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _strip_fsdp_prefixes(state_dict: dict) -> dict:
    return {_strip_name(k): v for k, v in state_dict.items()}


def _to_container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


if __name__ == "__main__":
    main()
