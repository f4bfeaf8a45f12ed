"""The GPU plan of the paper profile (docs/scale.md): per training stage, parameters, optimizer state, activations
at the planned per-GPU batch, FLOPs per step counted on the real objective (`duotok.perf.count_stage`, batch 1, CPU),
the step time on one H100 at a stated MFU, and the hours of a paper-like step budget on N GPUs.

    python scripts/paper_plan.py                  # params.yaml + params/paper.yaml, 8 GPUs; prints markdown, writes JSON
    python scripts/paper_plan.py --gpus 64 --out docs/paper_plan.json

Budgets (optimizer steps; [U]: not stated by the paper) and MFU assumptions are the table's inputs, printed with it."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET = {"ssl": 400_000, "finetune": 100_000, "codebook": 100_000, "vae": 200_000, "decoder": 200_000, "lm": 100_000}
"Steps: ssl as the open BEST-RQ music encoders (400k updates); vae / decoder as params/paper.yaml; lm: the protocol's 100k."
MFU = {"ssl": 0.40, "finetune": 0.35, "codebook": 0.35, "vae": 0.25, "decoder": 0.40, "lm": 0.35}
"""Assumed model-FLOPs utilisation on H100 in bf16: 0.35-0.40 for the transformers (SDPA / FlashAttention), 0.25 for the
convolutional VAE-GAN (small channel counts at 48 kHz resolution are memory-bound)."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8); ap.add_argument("--peak", type=float, default=989.4, help="TFLOPS (H100 SXM bf16 dense)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "paper_plan.json")); ap.add_argument("--stages", nargs="*", default=list(BUDGET))
    a = ap.parse_args()
    from duotok.config import load_params
    from duotok.perf import count_stage, plan_row, stage_batch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    P = load_params(ROOT / "params.yaml", profile=ROOT / "params/paper.yaml")
    rows = {}
    for s in a.stages:
        t0 = time.time()
        c = count_stage(P, s, 1)
        rows[s] = {**plan_row(c, stage_batch(P, s), MFU[s], a.peak, BUDGET[s], a.gpus), "mfu": MFU[s],
                   "count_s": round(time.time() - t0, 1), "saved_bytes_item_fp32": c.saved_bytes, "flops_item": c.flops}
        if s == "codebook": rows[s]["note"] = "batch = segments; each gives a vocal and an accompaniment item"
        print(f"[plan] {s}: {rows[s]}", flush=True)
    Path(a.out).write_text(json.dumps({"gpus": a.gpus, "peak_tflops": a.peak, "crop_s": P.data.crop_s, "rows": rows}, indent=1))
    print("\n| stage | params (M) | trainable (M) | GFLOP / item | per-GPU batch | TFLOP / step | weights + AdamW (GB) | "
          "activations (GB, bf16) | MFU | step (s, 1 H100) | steps | hours on", a.gpus, "GPUs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s, r in rows.items():
        print(f"| {s} | {r['params_m']:.1f} | {r['trainable_m']:.1f} | {r['gflop_per_item']:.0f} | {r['batch']} | "
              f"{r['tflop_per_step']:.1f} | {r['weights_optimizer_gb']:.1f} | {r['activations_gb']:.1f} | {r['mfu']:.2f} | "
              f"{r['step_s']:.3f} | {r['steps']:,} | {r['hours']:.1f} |")


if __name__ == "__main__":
    main()
