"""The FLOP estimator's arithmetic against FlopCounterMode on tiny modules."""

import torch
import torch.nn.functional as F
from docs_tables import block_after
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mirai_plugin import ForesightConfig, ForesightHead
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.flops import CycleShape, TransformerShape, block_flops, dmd_cycle, forward_flops


class WanShapedBlock(nn.Module):
    """The matmuls of a Wan block: self-attention, cross-attention to text, FFN."""

    def __init__(self, dim, ffn, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.cq, self.ck, self.cv, self.co = (nn.Linear(dim, dim) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))

    def attend(self, q, k, v):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)

    def forward(self, x, cache_k, cache_v, text):
        k = torch.cat([cache_k, self.k(x)], dim=1)
        v = torch.cat([cache_v, self.v(x)], dim=1)
        x = x + self.o(self.attend(self.q(x), k, v))
        x = x + self.co(self.attend(self.cq(x), self.ck(text), self.cv(text)))
        return x + self.ffn(x)


def counted(fn):
    # The math backend decomposes attention into matmuls the counter sees (fused CPU kernels it does not count).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_block_formula_matches_flop_counter():
    dim, ffn, queries, cached, text = 32, 80, 12, 24, 7
    block = WanShapedBlock(dim, ffn)
    x, ck, cv, t = (
        torch.randn(1, queries, dim),
        torch.randn(1, cached, dim),
        torch.randn(1, cached, dim),
        torch.randn(1, text, dim),
    )
    shape = TransformerShape(dim=dim, depth=1, ffn_dim=ffn, text_tokens=text)
    assert counted(lambda: block(x, ck, cv, t)) == block_flops(shape, queries, queries + cached)


def test_predictor_formula_matches_flop_counter():
    cfg = ForesightConfig(num_heads=2, segment_frames=1)
    head = ForesightHead(cfg, student_dim=16, encoder_dim=24)
    rows, tokens = 3, 10
    measured = counted(lambda: head.predict(torch.randn(rows, tokens, 16)))
    predictor = TransformerShape(dim=16, depth=cfg.predictor_depth, ffn_dim=64, cross_attention=False)
    assert measured == rows * forward_flops(predictor, tokens, tokens) + 2 * rows * tokens * 16 * 24


def test_cycle_terms_and_overhead():
    result = dmd_cycle(CycleShape(), ForesightConfig())
    documented = next(line for line in block_after("performance.md", "`mirai-plugin flops`:")
                      if line.startswith("foresight overhead per cycle  "))
    assert documented.split()[-1] == f"{100 * result['overhead']:.1f}%"  # 7.6 %, as docs/performance.md prints it
    assert result["foresight_terms"]["projector replay (critic steps)"] == 4 * result["foresight_terms"][
        "predictor + projection forward and backward"]
    no_replay = dmd_cycle(CycleShape(), ForesightConfig(replay=False))
    assert no_replay["foresight_terms"]["projector replay (critic steps)"] == 0
    deeper = dmd_cycle(CycleShape(), ForesightConfig(encoder_layer=39))
    assert deeper["foresight"] > result["foresight"]  # the early exit matters
    assert dmd_cycle(CycleShape(), None)["foresight"] == 0


def test_flops_command(tmp_path, capsys):
    assert main(["flops"]) == 0
    assert "foresight overhead per cycle" in capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("image_or_video_shape: [1, 21, 16, 60, 104]\nnum_frame_per_block: 1\nreal_name: Wan2.1-T2V-14B\n"
                      "foresight_weight: 0.2\nforesight_delta: 1\n")
    assert main(["flops", str(config), "--json"]) == 0
    assert '"overhead"' in capsys.readouterr().out


def test_time_overhead_weighs_each_term_by_its_precision():
    """Time at tensor-core rates: a float32 term (TF32) costs 1 / TF32_RATE its FLOPs in bfloat16 time. Under a bf16
    trainer a bfloat16 head's time share is its FLOP share; a float32 head's head terms (not the encoder, which
    the trainer runs) count double; with everything in float32 the shares are equal again."""
    half = dmd_cycle(CycleShape(), ForesightConfig(compute_dtype="bfloat16"))
    full = dmd_cycle(CycleShape(), ForesightConfig())
    assert half["precision"] == {"trainer": "bfloat16", "head_compute": "bfloat16", "tf32_rate": 0.5}
    assert half["time_overhead"] == half["overhead"] and full["overhead"] == half["overhead"]
    encoder = full["foresight_terms"]["encoder forward to block l (one pass, t = 0)"]
    head = full["foresight"] - encoder
    assert full["time_overhead"] == (encoder + 2 * head) / full["baseline"]
    everything_float32 = dmd_cycle(CycleShape(mixed_precision=False), ForesightConfig())
    assert everything_float32["time_overhead"] == everything_float32["overhead"]


def test_flops_and_memory_say_which_precision_they_assume(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    base = ("image_or_video_shape: [1, 21, 16, 60, 104]\nnum_frame_per_block: 3\nreal_name: Wan2.1-T2V-14B\n"
            "trainer: score_distillation\nforesight_weight: 0.2\nmixed_precision: true\n")
    config.write_text(base + "foresight_compute_dtype: bfloat16\n")
    assert main(["flops", str(config), "--no-defaults"]) == 0
    out = capsys.readouterr().out
    assert ("precision: generator, scores and encoder in bfloat16 (mixed_precision: true); head computes in bfloat16 "
            "over float32 weights (foresight_compute_dtype)") in out
    assert main(["memory", str(config), "--no-defaults"]) == 0
    assert ("precision: generator states, encoder output and replay cache bfloat16; head parameters, gradients and "
            "AdamW moments float32; head activations bfloat16") in capsys.readouterr().out
    config.write_text(base)  # float32 head (the key's default) ...
    assert main(["flops", str(config), "--no-defaults"]) == 0
    assert "head computes in float32 (TF32 matmuls)" in capsys.readouterr().out
    config.write_text(base + "foresight_head_sharding: fsdp\n")  # ... unless FSDP casts it
    assert main(["flops", str(config), "--no-defaults"]) == 0
    assert "head computes in bfloat16 over float32 weights (an FSDP head: FSDP's bfloat16 param dtype)" in (
        capsys.readouterr().out)
    assert main(["memory", str(config), "--no-defaults"]) == 0
    assert "head activations bfloat16" in capsys.readouterr().out
