"""Log the MFU of a finished stage run to MLflow: `duotok.perf.log_mfu` with the stage's FLOPs per item counted on its
objective at the profile's sizes (`duotok.perf.count_stage`, batch 1 on the CPU, ~1 min at paper scale) and the
global batch of the run.

    python scripts/mfu.py ssl --profile params/paper.yaml --devices 8          # peak from the GPU's name
    python scripts/mfu.py finetune --profile params/paper.yaml --devices 8 --peak 989.4 --set data.crop_s=30"""
from __future__ import annotations

import argparse
import json

from duotok.config import load_params
from duotok.perf import count_stage, log_mfu, peak_tflops, stage_batch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage"); ap.add_argument("--profile", default=None); ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[]); ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--peak", type=float, default=None, help="TFLOPS per device (default: from the GPU's name)")
    a = ap.parse_args()
    P = load_params(a.params, a.overrides, a.profile)
    c = count_stage(P, a.stage, 1)
    m = log_mfu(a.stage, c.flops, stage_batch(P, a.stage) * a.devices, a.devices, a.peak or peak_tflops())
    print(json.dumps({"stage": a.stage, "gflop_per_item": c.flops / 1e9, "devices": a.devices, **m}))


if __name__ == "__main__":
    main()
