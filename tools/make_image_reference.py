"""Write reference tensors computed by the OFFICIAL image Mirai code on tiny random models.

Run from the repository root (CPU, float32, deterministic; a few seconds):

    eval "$(../shared/upstreams/unpack /tmp/up)" && python tools/make_image_reference.py

A fresh copy of the checkout named by ``MIRAI_MIRAI_CODE_DIR`` (``y0urOy/Mirai-Code``)
at the pinned commit (``integration_tests/checkouts.py``) is imported at run time
from its own directory; nothing from it is copied here. What runs for real: the official
``Transformer`` / ``ModelArgs`` (``autoregressive/models/Mirai.py``) and the two
official ``calculate_foresight_loss`` functions (``autoregressive/train/
train_c2i_Mirai_E.py`` and ``train_c2i_Mirai_I.py``). Importing the training
scripts needs timm, wandb and torchvision, which nothing here calls: when they
are not installed they are stubbed for the import only (``sys.modules`` entries
with a real ``__spec__``; any use raises) and removed afterwards.

Per variant and head count K:

1. a tiny official ``Transformer`` (the student), every parameter redrawn from a
   seeded generator (the official init zeroes the output layer and the biases),
   runs ``model(cond_idx=y, idx=z[:, :-1], targets=z)`` in train mode (all
   dropouts 0, ``class_dropout_prob=0``); a forward hook on
   ``model.layers[encoder_depth - 1]`` captures the hidden state the official
   forward feeds to its ``projectors``;
2. the target: Mirai-E, a second tiny ``Transformer`` with other weights (the EMA
   teacher) through the official ``forward_ema`` under ``no_grad`` in eval mode,
   as the official trainer calls it; Mirai-I, random features standing in for
   DINOv2 ``x_norm_patchtokens``;
3. the official ``calculate_foresight_loss(zs_teacher_list, zs_tilde)`` and the
   total ``sum_i proj_coeffs[i] * head_loss[i]`` (the trainer's loop, with the
   official ``get_piecewise_coeff_multiplier(0)``);
4. gradients of the total w.r.t. the captured hidden (fed again, as a leaf,
   through the projectors exactly as the official forward does) and w.r.t. every
   projector parameter; checked against ``total.backward()`` through the official
   forward itself.

Output: ``tests/data/official_image_ema.safetensors`` (cases ``k3``, ``k5``) and
``tests/data/official_image_encoder.safetensors`` (cases ``k1``, ``k3``); keys and
metadata in tests/data/README.md.

Legend: b batch, t sequence positions (1 class token + 255 code tokens = 256),
d model width, z target width, K heads.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
from make_reference import save_canonical  # noqa: E402  (fixed header order -> byte-identical files)

from integration_tests.checkouts import CheckoutMissing, checkout  # noqa: E402

# The official head -> raster offset table (both training scripts, heads 0..8;
# head i >= 9 falls back to offset i). Used only to check the official outputs.
OFFICIAL_OFFSETS = (0, 1, 16, 17, 2, 18, 34, 33, 32)

SETUP = {
    "batch": 2, "grid": 16, "block_size": 256, "cls_token_num": 1,
    "model": {"dim": 32, "n_layer": 4, "n_head": 2, "vocab_size": 64, "num_classes": 10,
              "encoder_depth": 2, "projector_dim": 24,
              "token_dropout_p": 0.0, "attn_dropout_p": 0.0, "resid_dropout_p": 0.0,
              "ffn_dropout_p": 0.0, "drop_path_rate": 0.0, "class_dropout_prob": 0.0},
    # every parameter redrawn: Linear weight N(0, 1/fan_in), Linear bias N(0, 0.1^2),
    # Embedding N(0, 1), RMSNorm weight 1 + N(0, 0.1^2)
    "init": {"linear_bias_std": 0.1, "embedding_std": 1.0, "norm_std": 0.1},
    "seeds": {"data": 0, "student": 1, "teacher": 2, "encoder_features": 3, "projectors": 100},
    "encoder_features": "N(0, 1) + a per-channel mean N(0, 1) (stand-in for DINOv2 x_norm_patchtokens)",
    "epoch": 0,  # official get_piecewise_coeff_multiplier(epoch)
    "dtype": "float32", "device": "cpu", "torch_threads": 1,
}

# z: projector output width. Mirai-E compares it with the teacher's hidden (width
# d), so z = d; Mirai-I with the encoder features (768 for DINOv2-B), here 48.
VARIANTS = {
    "ema": {"file": "official_image_ema", "script": "train_c2i_Mirai_E.py", "z_dim": 32,
            "cases": {"k3": [0.5, 0.25, 0.125], "k5": [0.5, 0.375, 0.25, 0.125, 0.0625]}},
    "encoder": {"file": "official_image_encoder", "script": "train_c2i_Mirai_I.py", "z_dim": 48,
                "cases": {"k1": [0.5], "k3": [0.5, 0.25, 0.125]}},
}

_CHECKOUT_PACKAGES = ("autoregressive", "utils", "dataset")
_STUBBED = ("timm", "timm.data", "timm.layers", "wandb", "torchvision", "torchvision.transforms",
            "torchvision.transforms.functional", "torchvision.datasets")


# ----------------------------------------------------------------------------- import


def _placeholder(qualname: str) -> type:
    """A class standing in for a name of a package that is not installed.

    A class (not an instance) so that the checkout can subclass it at import
    time (``class ImageFolderWithPaths(ImageFolder)`` in dataset/build.py).
    """
    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{qualname} is a stub: install the real package to use it")
    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": unavailable, "__module__": "stub"})


def _stub_attr(module: str, attr: str) -> type:
    if attr.startswith("__"):  # keep dunder lookups (__file__, __all__, ...) honest
        raise AttributeError(attr)
    return _placeholder(f"{module}.{attr}")


def _stub_missing() -> list[str]:
    """Register stubs for the missing packages the training scripts import; return their names."""
    added = []
    for name in _STUBBED:
        top = name.split(".")[0]
        if top not in added and (top in sys.modules or importlib.util.find_spec(top) is not None):
            continue  # installed: the real package is used
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__path__ = []
        mod.__spec__.submodule_search_locations = mod.__path__
        mod.__getattr__ = lambda attr, _name=name: _stub_attr(_name, attr)
        sys.modules[name] = mod
        added.append(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
    return added


def import_official(checkout: str | os.PathLike) -> types.SimpleNamespace:
    """Import ``Mirai.py`` and the two training scripts from ``checkout``."""
    root = Path(checkout).resolve()
    model_path = root / "autoregressive" / "models" / "Mirai.py"
    scripts = {v: root / "autoregressive" / "train" / VARIANTS[v]["script"] for v in VARIANTS}
    for path in (model_path, *scripts.values()):
        if not path.is_file():
            raise FileNotFoundError(f"{root} is not a Mirai-Code checkout (no {path.relative_to(root)})")
    for name in _CHECKOUT_PACKAGES:  # generic names: they must come from the checkout
        mod = sys.modules.get(name)
        if mod is not None:
            raise RuntimeError(f"a module named {name!r} is already imported ({mod!r})")
    sys.path.insert(0, str(root))
    added = _stub_missing()
    # The training scripts set the TF32 flags at import (CUDA only); restore them.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        mirai = importlib.import_module("autoregressive.models.Mirai")
        train = {}
        for variant, path in scripts.items():
            name = f"_mirai_official_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            train[variant] = module
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for name in reversed(added):
            sys.modules.pop(name, None)
    for mod in (mirai, sys.modules["utils"], sys.modules["dataset.build"], *train.values()):
        assert Path(mod.__file__).resolve().is_relative_to(root), f"{mod.__name__} not from the checkout"
    for variant, module in train.items():
        fn = module.calculate_foresight_loss  # @allow_in_graph returns the function itself
        assert Path(fn.__code__.co_filename).resolve() == scripts[variant], fn
        assert module.GPT_models is mirai.GPT_models
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return types.SimpleNamespace(root=root, commit=commit, mirai=mirai, train=train, stubbed=added)


# ----------------------------------------------------------------------------- models


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int, prefix: str = "") -> None:
    """Redraw every parameter of ``module`` (in ``named_modules`` order) from ``seed``."""
    init = SETUP["init"]
    gen = torch.Generator().manual_seed(seed)
    done = set()
    for _name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, torch.nn.Linear):
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) / sub.in_features ** 0.5)
            if sub.bias is not None:
                sub.bias.copy_(torch.randn(sub.bias.shape, generator=gen) * init["linear_bias_std"])
        elif isinstance(sub, torch.nn.Embedding):
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * init["embedding_std"])
        elif type(sub).__name__ == "RMSNorm":
            sub.weight.copy_(1 + torch.randn(sub.weight.shape, generator=gen) * init["norm_std"])
        else:
            continue
        done.update(id(p) for p in sub.parameters(recurse=False))
    missed = [n for n, p in module.named_parameters() if id(p) not in done]
    assert not missed, f"parameters not redrawn: {missed}"


def build(up, z_dim: int, num_heads: int, trunk_seed: int, projector_seed: int):
    """A tiny official Transformer: trunk from ``trunk_seed``, projectors from ``projector_seed``."""
    S = SETUP
    args = up.mirai.ModelArgs(**S["model"], block_size=S["block_size"], cls_token_num=S["cls_token_num"],
                              z_dims=[z_dim], num_heads=num_heads, model_type="c2i")
    model = up.mirai.Transformer(args)
    # trunk (embeddings, layers, final norm, output layer) and projectors drawn
    # separately: the trunk, hence the hidden state, does not depend on K
    with torch.no_grad():
        projectors = model.projectors
        model.projectors = torch.nn.ModuleList()
        randomize(model, trunk_seed)
        model.projectors = projectors
    randomize(model.projectors, projector_seed)
    return model


def projector_params(model) -> dict[str, torch.nn.Parameter]:
    return {f"projectors.{name}": p for name, p in model.projectors.named_parameters()}


# ----------------------------------------------------------------------------- one case


def expected_head_loss(variant: str, student_full: torch.Tensor, target: torch.Tensor, offset: int) -> torch.Tensor:
    """Our reading of the official pairing, to check the official outputs (not used to make them).

    student_full: projector output [b, t, z] (t = 1 class token + 255 code tokens);
    target: Mirai-E teacher hidden [b, t, d] / Mirai-I encoder patches [b, 256, z].
    """
    if variant == "ema":  # class token with class token; code positions shifted by offset, truncated
        n = target.shape[1] - 1 - offset
        s = torch.cat([student_full[:, :1], student_full[:, 1:1 + n]], 1)
        t = torch.cat([target[:, :1], target[:, 1 + offset:]], 1)
    else:  # student class token dropped; student code position j+1 with encoder patch j + offset
        n = min(student_full.shape[1] - 1, target.shape[1] - offset)
        s, t = student_full[:, 1:1 + n], target[:, offset:offset + n]
    return -F.cosine_similarity(s, t, dim=-1, eps=1e-12).mean()  # F.normalize clamps the norm at 1e-12


def run_case(up, variant: str, case: str, coeffs: list[float], case_index: int):
    S, V = SETUP, VARIANTS[variant]
    b, t_len, grid = S["batch"], S["block_size"], S["grid"]
    K, z_dim, depth = len(coeffs), V["z_dim"], S["model"]["encoder_depth"]
    official_loss = up.train[variant].calculate_foresight_loss

    gen = torch.Generator().manual_seed(S["seeds"]["data"])
    codes = torch.randint(0, S["model"]["vocab_size"], (b, t_len), generator=gen)       # (b 256)
    labels = torch.randint(0, S["model"]["num_classes"], (b,), generator=gen)           # (b)

    student = build(up, z_dim, K, S["seeds"]["student"], S["seeds"]["projectors"] + case_index)
    student.train()
    captured = []
    hook = student.layers[depth - 1].register_forward_hook(lambda m, i, out: captured.append(out))
    try:  # the official trainer's call
        _, zs_tilde, primary_loss = student(cond_idx=labels, idx=codes[:, :-1], targets=codes)
    finally:
        hook.remove()
    assert len(captured) == 1 and len(zs_tilde) == K
    hidden = captured[0]                                                                  # (b t d)
    assert hidden.shape == (b, t_len, S["model"]["dim"]) and torch.isfinite(primary_loss)

    if variant == "ema":
        teacher = build(up, z_dim, K, S["seeds"]["teacher"], S["seeds"]["projectors"] + 50 + case_index)
        teacher.eval()  # official: ema_teacher.eval(), requires_grad False, no_grad
        teacher.requires_grad_(False)
        with torch.no_grad():
            target = teacher.forward_ema(cond_idx=labels, idx=codes[:, :-1], targets=None)  # (b t d)
        target_key = "teacher_hidden"
    else:
        g = torch.Generator().manual_seed(S["seeds"]["encoder_features"])
        mean = torch.randn(z_dim, generator=g)
        target = torch.randn(b, grid * grid, z_dim, generator=g) + mean                   # (b 256 z)
        target_key = "encoder_hidden"

    coeff_mult = up.train[variant].get_piecewise_coeff_multiplier(S["epoch"])
    current = [c * coeff_mult for c in coeffs]

    def total_of(head_losses):  # the official trainer's loop
        total = 0
        for i in range(K):
            total += head_losses[i] * current[i]
        return total

    # ---- (a) through the official forward: gradient reaching the captured hidden
    hidden.retain_grad()
    head_losses_a = official_loss([target], zs_tilde)
    total_a = total_of(head_losses_a)
    total_a.backward()
    grads_a = {n: p.grad.clone() for n, p in projector_params(student).items()}
    grad_hidden_a = hidden.grad.clone()
    student.zero_grad(set_to_none=True)

    # ---- (b) the captured hidden as a leaf, through the projectors as the official forward does
    leaf = hidden.detach().clone().requires_grad_(True)
    N, T, D = leaf.shape
    zs = [projector(leaf.reshape(-1, D)).reshape(N, T, -1) for projector in student.projectors]
    for i in range(K):
        assert torch.equal(zs[i], zs_tilde[i]), f"head {i}: hooked hidden does not reproduce zs_tilde"
    head_losses = official_loss([target], zs)
    total = total_of(head_losses)
    total.backward()
    grads = {n: p.grad.clone() for n, p in projector_params(student).items()}

    # ---- checks
    head_loss = torch.stack([h.detach() for h in head_losses])
    assert torch.equal(head_loss, torch.stack([h.detach() for h in head_losses_a]))
    assert torch.equal(total.detach(), total_a.detach())
    assert torch.equal(leaf.grad, grad_hidden_a), (leaf.grad - grad_hidden_a).abs().max()
    for n in grads:
        assert torch.equal(grads[n], grads_a[n]), n
    offsets = [OFFICIAL_OFFSETS[i] if i < len(OFFICIAL_OFFSETS) else i for i in range(K)]
    with torch.no_grad():
        ours = torch.stack([expected_head_loss(variant, zs[i], target, offsets[i]) for i in range(K)])
        torch.testing.assert_close(ours, head_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sum(c * h for c, h in zip(current, head_loss)), total.detach(),
                                   rtol=1e-6, atol=1e-7)
    # positions that enter some head: ema all (class token + offset-0 head);
    # encoder all but the class token, whose projector output is dropped
    used = leaf.grad.abs().sum((0, 2)) != 0
    assert used.tolist() == [variant == "ema"] + [True] * (t_len - 1), used
    if variant == "ema":
        tokens = [t_len - o for o in offsets]                       # class token + 255 - o code tokens
    else:
        tokens = [min(t_len - 1, grid * grid - o) for o in offsets]  # 255 for offset 0, 256 - o otherwise
    assert abs(total.item()) > 1e-3 and all(abs(h) > 1e-4 for h in head_loss.tolist()), head_loss

    p = f"{case}."
    t = {p + "student_hidden": leaf.detach(), p + target_key: target,
         **{p + n: w.detach() for n, w in projector_params(student).items()},
         p + "proj_coeffs": torch.tensor(current, dtype=torch.float64).float(),
         p + "head_losses": head_loss, p + "loss": total.detach(),
         p + "grad.student_hidden": leaf.grad,
         **{p + "grad." + n: g for n, g in grads.items()}}
    t = {k: v.detach().float().contiguous().clone() for k, v in t.items()}
    assert torch.equal(t[p + "proj_coeffs"].double(), torch.tensor(current, dtype=torch.float64)), \
        "coefficients must be exact in float32"
    for k, v in t.items():
        assert torch.isfinite(v).all(), k
    info = {"K": K, "offsets": offsets, "proj_coeffs": coeffs, "coeff_multiplier": coeff_mult,
            "tokens_per_head": tokens, "projector_seed": S["seeds"]["projectors"] + case_index,
            "primary_loss": primary_loss.item()}
    return t, info, codes, labels


def make_variant(up, variant: str) -> tuple[dict, dict]:
    V = VARIANTS[variant]
    tensors, cases = {}, {}
    first = None
    for index, (case, coeffs) in enumerate(V["cases"].items()):
        t, info, codes, labels = run_case(up, variant, case, coeffs, index)
        if first is None:
            first = case
            tensors["codes"], tensors["labels"] = codes, labels
        else:  # the trunk does not depend on K: same hidden, same target
            for key in ("student_hidden", "teacher_hidden" if variant == "ema" else "encoder_hidden"):
                assert torch.equal(t[f"{case}.{key}"], tensors[f"{first}.{key}"]), key
        tensors.update(t)
        cases[case] = info
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    config = {**SETUP, "variant": variant, "z_dim": V["z_dim"], "official_script": V["script"],
              "official_offset_table": list(OFFICIAL_OFFSETS)}  # nothing environment-dependent: same bytes everywhere
    meta = {"commit": up.commit, "variant": variant, "config": json.dumps(config, sort_keys=True),
            "cases": json.dumps(cases, sort_keys=True), "shapes": json.dumps(shapes, sort_keys=True)}
    return tensors, meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    try:
        repo = checkout("mirai-code", Path(tempfile.mkdtemp(prefix="mirai-reference-")) / "mirai-code")
    except CheckoutMissing as missing:
        sys.exit(str(missing))
    torch.set_num_threads(SETUP["torch_threads"])
    up = import_official(repo)
    if up.stubbed:
        print(f"stubbed for the import (not installed, never called): {', '.join(up.stubbed)}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        tensors, meta = make_variant(up, variant)
        path = args.out / f"{VARIANTS[variant]['file']}.safetensors"
        save_canonical(tensors, path, meta)
        cases = json.loads(meta["cases"])
        losses = {c: round(tensors[f"{c}.loss"].item(), 6) for c in cases}
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size} bytes, "
              f"{len(tensors)} tensors, loss {losses}")
        assert path.stat().st_size < 1_000_000, "keep reference files under 1 MB"


if __name__ == "__main__":
    main()
