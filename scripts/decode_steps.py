#!/usr/bin/env python
"""Decode quality and speed against the number of flow-matching sampling steps, on the pipeline's test split.

    python scripts/decode_steps.py                                  # outputs/decoder/package, 8 test segments
    python scripts/decode_steps.py --steps 2 4 8 20 --segments 4 --package path/to/package

For each step count the test segments are encoded once and decoded with that many Euler steps; the table gives
the multi-scale mel L1 (the benchmark's), PESQ / STOI per track, the raw pitch accuracy of decoded vocals against
the original vocals and against the score's F0 (rendered songs), and decode throughput (s of audio per s, both
tracks). Tokens do not depend on the step count, so token stability is the same in every row. The decoder stage's
`decoder.sampling_steps` (the package's default) was chosen from this table (docs/measurements.md)."""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", default="outputs/decoder/package")
    ap.add_argument("--preprocess", default="outputs/preprocess")
    ap.add_argument("--render", default="outputs/render")
    ap.add_argument("--split", default="test")
    ap.add_argument("--segments", type=int, default=8, help="test segments decoded (0 = all)")
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 20, 50])
    a = ap.parse_args(argv)
    from duotok import evaluation as E
    from duotok.tokenizer import DuoTok
    tok = DuoTok.from_pretrained(a.package)
    sr = tok.decoder.sample_rate
    items = E.attach_score_f0(E.load_test_audio(a.preprocess, a.split, a.segments), a.render, sr)
    audio_s = sum(np.asarray(it["wav48_vocals"]).shape[-1] for it in items) / sr
    print(f"{len(items)} {a.split} segments, {audio_s:.1f} s of audio per track, package {a.package}")
    cols = ["vocals/mel_l1", "acc/mel_l1", "vocals/pesq", "acc/pesq", "vocals/stoi", "acc/stoi", "vocals/rpa",
            "vocals/rpa_score"]
    print("| steps | " + " | ".join(cols) + " | decode s | audio s/s |")
    print("|" + "---|" * (len(cols) + 3))
    for n in a.steps:
        tok.decoder.steps = int(n)
        t0 = time.time()
        m, _, _ = E.reconstruction_part(tok, items, sr, pitch_segments=len(items), n_examples=0)
        dec = m["recon/decode_s"]
        vals = [m.get(f"recon/{c}", float("nan")) for c in cols]
        print(f"| {n} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {dec:.1f} | {audio_s / max(dec, 1e-9):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
