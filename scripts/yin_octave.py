#!/usr/bin/env python
"""How well the HarmonicVAE's pitch analysis (`duotok.vae.f0_features`, YIN) follows torchcrepe on sung vocals,
for several settings of its octave check.

    python scripts/yin_octave.py                               # val and test, 24 non-silent vocal segments each
    python scripts/yin_octave.py --splits val --segments 0 --checks 0 0.9

For each segment the reference is torchcrepe's F0 (`duotok.metrics.pitch_track`, 10 ms) read at the latent frames'
centres (20 ms); the score is the share of crepe-voiced frames where `f0_features` is within 50 cents (pooled over
segments). `--checks 0` is plain YIN + the 5-frame median; the default `octave_check` (0.9) was picked on val from
this table (docs/measurements.md)."""
from __future__ import annotations

import argparse
import math

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preprocess", default="outputs/preprocess")
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--segments", type=int, default=24, help="non-silent vocal segments per split (0 = all)")
    ap.add_argument("--checks", type=float, nargs="+", default=[0.0, 0.85, 0.9, 0.95])
    a = ap.parse_args(argv)
    import torch
    from duotok import evaluation as E
    from duotok.metrics import pitch_track
    from duotok.vae import f0_features
    sr, hop = 48000, 960
    print("| split | segments | crepe-voiced frames | " + " | ".join(f"octave_check {c:g}" for c in a.checks) + " |")
    print("|---|---|---|" + "---|" * len(a.checks))
    for split in a.splits:
        items = [it for it in E.load_test_audio(a.preprocess, split, 0) if not bool(it.get("silent_vocals", False))]
        items = items[: a.segments] if a.segments else items
        hits, total = np.zeros(len(a.checks)), 0
        for it in items:
            x = np.asarray(it["wav48_vocals"], np.float32)
            crepe = pitch_track(x, sr)
            T = math.ceil(len(x) / hop)
            ref = crepe[np.minimum(2 * np.arange(T) + 1, len(crepe) - 1)]   # 10 ms frames at the 20 ms latent centres
            on = ref > 0
            total += int(on.sum())
            for i, c in enumerate(a.checks):
                f0 = 220.0 * 2 ** f0_features(torch.from_numpy(x)[None], sr, hop, octave_check=c)[0, 0].numpy()
                hits[i] += int((np.abs(1200 * np.log2(f0[on] / ref[on])) < 50).sum())
        print(f"| {split} | {len(items)} | {total} | " + " | ".join(f"{h / max(total, 1):.3f}" for h in hits) + " |", flush=True)


if __name__ == "__main__":
    main()
