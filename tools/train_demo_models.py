"""Train the video demo's teacher, base and student with the pre-registered settings and ship them.

    python tools/train_demo_models.py [--workers 2] [--out mirai_plugin/tooling/demo/weights]

Writes ``teacher.safetensors``, ``base.safetensors`` and ``student.safetensors`` (each recording
the key of the settings and the code that produced them, ``models_key``), then prints the encoder
gate on the new teacher. The teacher trains for its fixed, pre-registered number of steps; if it
does not pass the gate, the demo stops there (the weights are still written, for inspection).
``tests/test_demo.py`` checks that the shipped files carry the current key and that the teacher
passes the gate.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mirai_plugin.tooling.demo.evaluation import encoder_gate
from mirai_plugin.tooling.demo.experiment import load_config
from mirai_plugin.tooling.demo.pretrained import SHIPPED, models_key, save_models, train_models
from mirai_plugin.tooling.demo.progress import Progress
from mirai_plugin.tooling.demo.run import gate_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(3, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=SHIPPED)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the weights the demo's cache would produce (it trains single-threaded too)
    cfg = load_config()
    start = time.perf_counter()
    models = train_models(cfg.models, Progress(), workers=args.workers)
    trained = time.perf_counter() - start
    save_models(args.out, cfg.models, models)
    print(f"wrote {args.out} (key {models_key(cfg.models)}) after {trained:.0f}s of training")

    g, fcfg = cfg.gate, cfg.foresight_config()
    scene = cfg.world.render(g.videos, cfg.models.train_frames, seed=80_000_000 + g.seed)
    gate = encoder_gate(models.teacher, scene, layer=fcfg.encoder_layer, offsets=fcfg.offsets,
                        segment_frames=cfg.segment_frames, test_videos=g.test_videos, hidden=g.probe_hidden,
                        steps=g.probe_steps, lr=g.probe_lr, batch=g.probe_batch, seed=g.seed)
    gate["passed"] = gate["hidden"]["margin"] >= g.margin_db
    print(gate_line(gate, g.margin_db, encoder_layer=fcfg.encoder_layer, offsets=fcfg.offsets))


if __name__ == "__main__":
    main()
