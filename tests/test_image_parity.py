"""The image term against the official Mirai code (y0urOy/Mirai-Code, commit 4e8611e):
tensors in tests/data/official_image_*.safetensors were computed by the official
`calculate_foresight_loss` of train_c2i_Mirai_E.py / _I.py on a tiny official GPT
(tools/make_image_reference.py). Float32; losses to 1e-6, gradients to 1e-4 relative."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mirai_plugin.image import ImageForesightConfig, TokenForesightHead

DATA = Path(__file__).parent / "data"
GRID = 16


def load(name):
    with safe_open(DATA / name, framework="pt") as f:
        meta = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return json.loads(meta["cases"]), tensors


CASES = [("official_image_ema.safetensors", "ema", case) for case in ("k3", "k5")] + [
    ("official_image_encoder.safetensors", "encoder", case) for case in ("k1", "k3")
]


@pytest.mark.parametrize("file, source, case", CASES)
def test_losses_and_gradients_equal_the_official_code(file, source, case):
    cases, t = load(file)
    spec = cases[case]
    flat_offsets = [dy * GRID + dx for dy, dx in ImageForesightConfig(neighbours=spec["K"]).offsets]
    assert flat_offsets == spec["offsets"]  # our grid order is the official head order for K <= 5

    target = t[f"{case}.teacher_hidden"] if source == "ema" else t[f"{case}.encoder_hidden"]
    cfg = ImageForesightConfig(
        source=source,
        neighbours=spec["K"],
        projector_dim=t[f"{case}.projectors.0.0.weight"].shape[0],
        head_weights=tuple(spec["proj_coeffs"]),
        weight=spec["coeff_multiplier"],
    )
    head = TokenForesightHead(cfg, student_dim=32, encoder_dim=target.shape[-1], grid=(GRID, GRID))
    prefix = f"{case}.projectors."
    head.projectors.load_state_dict({k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}, strict=True)

    hidden = t[f"{case}.student_hidden"].clone().requires_grad_(True)
    term, parts = head(hidden, target, return_breakdown=True)
    torch.testing.assert_close(parts["head_losses"], t[f"{case}.head_losses"], rtol=0, atol=1e-6)
    torch.testing.assert_close(term, t[f"{case}.loss"], rtol=0, atol=1e-6)

    term.backward()
    scale = t[f"{case}.grad.student_hidden"].abs().max()
    torch.testing.assert_close(hidden.grad, t[f"{case}.grad.student_hidden"], rtol=1e-4, atol=1e-4 * scale)
    for name, param in head.projectors.named_parameters():
        expected = t[f"{case}.grad.projectors.{name}"]
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_an_off_by_one_pairing_breaks_parity():
    """The check can fail: aligning each token with the next patch (offset (0, 1) for
    Mirai-I's K=1) moves the loss far beyond the tolerance."""
    _cases, t = load("official_image_encoder.safetensors")
    cfg = ImageForesightConfig(source="encoder", offsets=((0, 1),), projector_dim=24, head_weights=(0.5,))
    head = TokenForesightHead(cfg, student_dim=32, encoder_dim=48, grid=(GRID, GRID))
    prefix = "k1.projectors."
    head.projectors.load_state_dict({k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)})
    shifted = head(t["k1.student_hidden"], t["k1.encoder_hidden"])
    assert (shifted - t["k1.loss"]).abs() > 100 * 1e-6
