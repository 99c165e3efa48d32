"""``mirai-plugin demo --image``: Mirai on a tiny raster-order token AR model, three arms.

Legend: b batch, N = 64 image tokens (an 8x8 grid), d width.

Per seed, three runs from the same initial weights and the same data order:

* ``baseline``: next-token cross-entropy only;
* ``mirai-e``: + the term with an EMA copy of the model as the target source
  (K = 3 grid neighbours, the term off for a warm-up, then lambda 2 -> 1);
* ``mirai-i``: + the term with a frozen bidirectional masked-token encoder as the
  target source (K = 1, lambda 2 -> 1 from the start).

The Mirai runs add the three lines of an integration: ``capture_hidden`` around the
training forward, ``head(captured, target)`` added to the loss, ``head.step()``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from mirai_plugin import capture_hidden
from mirai_plugin.errors import MiraiError
from mirai_plugin.image import EMASource, FrozenImageEncoder, ImageForesightConfig, TokenForesightHead
from mirai_plugin.tooling.demo.image_models import MaskedTokenEncoder, TinyGPT
from mirai_plugin.tooling.demo.image_report import figure, summarise, table
from mirai_plugin.tooling.demo.image_world import FAMILIES, ImageWorld, nll_per_token, satisfies
from mirai_plugin.tooling.demo.progress import Progress

ARMS = ("baseline", "mirai-e", "mirai-i")


@dataclass
class ImageDemoConfig:
    steps: int = 1000
    encoder_steps: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)
    layer: int = 1  # 0-based: the output of 2 of the 4 blocks (internal-layer injection)
    depth: int = 4
    dim: int = 64
    heads: int = 4
    batch: int = 32
    lr: float = 3e-3  # constant, as LlamaGen (a cosine decay slowed this toy's learning)
    ema_decay: float = 0.99  # official 0.9999 averages over ~10k steps; this run has ~1k
    warmup_fraction: float = 0.1  # Mirai-E: steps before the EMA targets are used
    projector_dim: int = 128
    eval_every: int = 50
    val_images: int = 256
    samples_per_class: int = 64
    temperature: float = 1.0

    @property
    def warmup_steps(self) -> int:
        return int(self.steps * self.warmup_fraction)

    def foresight(self, arm: str) -> ImageForesightConfig | None:
        """The arm's term: the paper's lambda 2 -> 1 at half training, internal layer; the
        heads' lr equals the model's (the toy's lr is 10x LlamaGen's 1e-4)."""
        if arm == "baseline":
            return None
        common = dict(student_layer=self.layer, projector_dim=self.projector_dim, lr=self.lr)
        if arm == "mirai-e":
            return ImageForesightConfig.mirai(
                "ema", self.steps, neighbours=3, weight_start=self.warmup_steps, ema_decay=self.ema_decay, **common
            )
        return ImageForesightConfig.mirai("encoder", self.steps, neighbours=1, **common)


QUICK = dict(steps=80, encoder_steps=60, seeds=(0, 1), eval_every=20, val_images=96, samples_per_class=8)


def make_image_config(*, quick: bool = False, **options) -> ImageDemoConfig:
    """The image demo's settings: defaults, the ``--quick`` preset, then explicit options."""
    cfg = ImageDemoConfig(**QUICK) if quick else ImageDemoConfig()
    cfg = replace(cfg, **{k: v for k, v in options.items() if v is not None})
    if not 0 <= cfg.layer < cfg.depth:
        raise MiraiError(
            f"layer {cfg.layer} out of range: the image demo model has {cfg.depth} blocks (0..{cfg.depth - 1})"
        )
    if cfg.steps < 2 * cfg.eval_every:
        raise MiraiError(
            f"steps={cfg.steps} is too few: need at least 2 validation points ({2 * cfg.eval_every} steps)"
        )
    if len(cfg.seeds) < 1:
        raise MiraiError("give at least one seed (--seeds N, N >= 1)")
    if cfg.samples_per_class < 1 or cfg.val_images < 1:
        raise MiraiError("samples_per_class and val_images must be >= 1")
    for arm in ARMS:
        cfg.foresight(arm)  # validates the term's settings
    return cfg


# ------------------------------------------------------------------ encoder


def train_encoder(cfg: ImageDemoConfig, world: ImageWorld, progress: Progress) -> MaskedTokenEncoder:
    """Mirai-I's frozen encoder: masked-token pretraining on the same kind of images
    (class labels unused), once, shared by every seed, as a pretrained DINO would be."""
    torch.manual_seed(10_000)
    encoder = MaskedTokenEncoder(vocab=world.vocab, tokens=world.tokens, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(10_001)
    for step in progress.range(cfg.encoder_steps, "encoder (masked tokens)"):
        images, _ = world.sample(cfg.batch, seed=500_000_000 + step)
        loss = encoder.masked_loss(images.flatten(1), g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return encoder.eval().requires_grad_(False)


# ------------------------------------------------------------------ one arm


@dataclass
class ArmRun:
    model: TinyGPT
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    foresight_terms: list[float] = field(default_factory=list)


def new_model(cfg: ImageDemoConfig, world: ImageWorld, seed: int) -> TinyGPT:
    torch.manual_seed(seed)  # the same initial weights for the three arms of a seed
    return TinyGPT(vocab=world.vocab, classes=world.classes, tokens=world.tokens, dim=cfg.dim, depth=cfg.depth,
                   heads=cfg.heads)


def validation_loss(model: TinyGPT, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return model.loss(images, labels).item()


def train_arm(cfg: ImageDemoConfig, world: ImageWorld, arm: str, seed: int, encoder: MaskedTokenEncoder | None,
              validation: tuple[torch.Tensor, torch.Tensor], progress: Progress) -> ArmRun:
    model = new_model(cfg, world, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.05)
    fcfg = cfg.foresight(arm)
    grid = (world.size, world.size)
    ema = EMASource(model, cfg.layer, decay=cfg.ema_decay, blocks="layers") if arm == "mirai-e" else None
    image_encoder = (FrozenImageEncoder(encoder, grid=grid, features=lambda m, x: m.features(x))
                     if arm == "mirai-i" else None)

    def target_of(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if ema is not None:
            return ema(images[:, :-1], labels)  # the EMA copy on the model's own (causal) inputs
        return image_encoder(images)  # the encoder sees the whole image, future included

    if fcfg is not None:
        # both targets are cfg.dim wide: the EMA copy is the model, the encoder has the model's width
        head = TokenForesightHead(fcfg, student_dim=cfg.dim, encoder_dim=cfg.dim, grid=grid)
    run = ArmRun(model)
    for step in progress.range(cfg.steps, f"seed {seed} {arm}"):
        if step % cfg.eval_every == 0:
            run.val_steps.append(step)
            run.val_losses.append(validation_loss(model, *validation))
        start = time.perf_counter()
        images, labels = world.sample(cfg.batch, seed=1_000_000 * (seed + 1) + step)  # same order for every arm
        images = images.flatten(1)
        if fcfg is None:
            loss = total = model.loss(images, labels)
        else:
            with capture_hidden(model, fcfg.student_layer, blocks="layers") as captured:  # mirai: 1/3
                loss = model.loss(images, labels)
            total = loss
            if head.active:  # off during Mirai-E's warm-up: no target needed
                term = head(captured, target_of(images, labels))  # mirai: 2/3
                total = loss + term
                run.foresight_terms.append(term.item())
            captured.clear()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if fcfg is not None:
            head.step()  # mirai: 3/3 (also advances the lambda schedule)
            if ema is not None:
                ema.update(model)
        run.step_seconds.append(time.perf_counter() - start)
        run.train_losses.append(loss.item())
    run.val_steps.append(cfg.steps)
    run.val_losses.append(validation_loss(model, *validation))
    model.eval().requires_grad_(False)
    return run


# ---------------------------------------------------------------- evaluation


def encoder_accuracy(encoder: MaskedTokenEncoder, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How much structure the frozen encoder has learnt: its accuracy on 30 % masked tokens,
    per family (chance on mirror tokens is about 1/3; on recurrence images at most about
    0.3 is reachable, the noise rows being unpredictable)."""
    masked = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    with torch.no_grad():
        right = encoder(images.masked_fill(masked, encoder.mask_token)).argmax(-1) == images
    return {name: right[masked & (labels == i)[:, None]].float().mean().item() for i, name in enumerate(FAMILIES)}


def sample_images(
    cfg: ImageDemoConfig, world: ImageWorld, model: TinyGPT, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(world.classes).repeat_interleave(cfg.samples_per_class)
    g = torch.Generator().manual_seed(70_000_000 + seed)  # the same sampling noise for every arm
    samples = model.sample(labels, generator=g, temperature=cfg.temperature)
    return samples.view(-1, world.size, world.size), labels


def evaluate(
    cfg: ImageDemoConfig, world: ImageWorld, run: ArmRun, seed: int
) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    samples, labels = sample_images(cfg, world, run.model, seed)
    ok = satisfies(samples, labels).float()
    by_family = {name: ok[labels == i].mean().item() for i, name in enumerate(FAMILIES)}
    tail = max(1, cfg.steps // 10)
    result = {
        "coherence": ok.mean().item(),
        "coherence_by_family": by_family,
        "val_steps": run.val_steps,
        "val_loss": run.val_losses,
        "final_val_loss": run.val_losses[-1],
        "final_train_loss": statistics.fmean(run.train_losses[-tail:]),
        "final_foresight_term": statistics.fmean(run.foresight_terms[-tail:]) if run.foresight_terms else None,
        "train_step_seconds": statistics.median(run.step_seconds[min(5, len(run.step_seconds) - 1):]),
    }
    return result, (samples, labels)


# ---------------------------------------------------------------- the demo


def run_image_demo(cfg: ImageDemoConfig, out: Path, *, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world = ImageWorld()
    encoder = train_encoder(cfg, world, progress)
    per_seed: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    first_samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    floors = []
    for seed in cfg.seeds:
        validation = world.sample(cfg.val_images, seed=90_000_000 + seed)
        floors.append(nll_per_token(*validation))
        validation = (validation[0].flatten(1), validation[1])
        if seed == cfg.seeds[0]:
            accuracy = encoder_accuracy(encoder, *validation)
        for arm in ARMS:
            run = train_arm(cfg, world, arm, seed, encoder, validation, progress)
            progress.note(f"sampling seed {seed} {arm} ...")
            result, samples = evaluate(cfg, world, run, seed)
            per_seed[arm].append(result)
            first_samples.setdefault(arm, samples)

    summary = summarise(per_seed, eval_every=cfg.eval_every, steps=cfg.steps)
    results = {
        "config": asdict(cfg),
        "foresight": {arm: json.loads(cfg.foresight(arm).to_json()) for arm in ARMS if arm != "baseline"},
        "families": list(FAMILIES),
        "data_nll_per_token": statistics.fmean(floors),
        "encoder_masked_token_accuracy": accuracy,
        "per_seed": per_seed,
        "summary": summary,
        "verdict": summary["verdict"],
        "wall_seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figure(per_seed, first_samples, out / "figure.png", per_row=min(8, cfg.samples_per_class))
    print(table(summary))
    print(f"\nthe data's own entropy: {results['data_nll_per_token']:.3f} nats/token "
          "(the best possible validation loss)")
    print("frozen encoder (Mirai-I), accuracy on 30% masked tokens: "
          + ", ".join(f"{name} {value:.2f}" for name, value in accuracy.items()))
    for arm, verdict in summary["verdict"].items():
        print(f"verdict {arm}: {verdict}")
    print(f"wrote {out / 'results.json'} and {out / 'figure.png'} in {results['wall_seconds']:.0f}s")
    return results
