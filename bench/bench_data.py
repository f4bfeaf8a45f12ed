"""What the on-the-fly data path costs per training batch, stage by stage, against reading the old precomputed shards.

    python bench/bench_data.py                                  # outputs/preprocess (the song index), batch 8, 10 batches
    python bench/bench_data.py --old /path/to/old/outputs/preprocess   # + the fixed-segment shards of the old preprocess

Per stage field set (ssl: mel_mix; finetune / codebook: their FIELDS; vae: 0.5 s single-track crops at 48 kHz), one
thread, loader workers 0, CPU ms of this process per batch (not wall time: robust to a busy machine): to read the crops (FLAC seek + soxr 48 -> 24 kHz + labels), to augment them
(`data.augment` as in params.yaml, and with EQ, reverb, compression and remixing all at p = 1), and to compute the
features of the batch (`duotok.features.Features`, CPU); for scale, one forward + backward of the stage's default model
on that batch (`duotok.perf.stage_objective`, no optimizer step). The old path read the same fields (features
included) from memory-mapped .npy shards (page cache warm after the first pass)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from duotok.config import load_params
from duotok.data import CropDataset, TrackCrops, collate, load_splits, make_loader
from duotok.models.codebook import FIELDS as CODEBOOK_FIELDS
from duotok.models.finetune import FIELDS as FINETUNE_FIELDS

STAGES = {"ssl": ["mel_mix"], "finetune": FINETUNE_FIELDS, "codebook": CODEBOOK_FIELDS}


def timed(fn, n):
    "CPU milliseconds of this process per call (robust to other load on the machine; everything runs in-process)."
    fn(); t = time.process_time()
    for _ in range(n): fn()
    return (time.process_time() - t) / n * 1000


def old_reader(root: Path, fields):
    "Read items of the old `shards/train-0000/<field>.npy` layout (the removed SegmentDataset's access pattern)."
    d = root / "shards" / "train-0000"
    arrs = {f: np.load(d / f"{f}.npy", mmap_mode="r") for f in fields if (d / f"{f}.npy").exists()}
    arrs = {f: x for f, x in arrs.items() if x.dtype.kind in "fiub"}                     # strings stay lists
    n = len(next(iter(arrs.values())))
    g = np.random.default_rng(0)
    return lambda bs: collate([{f: torch.from_numpy(np.array(a[i])) for f, a in arrs.items()} for i in g.integers(0, n, bs)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="outputs/preprocess"); ap.add_argument("--old", default=None)
    ap.add_argument("--batch", type=int, default=8); ap.add_argument("--batches", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    P = load_params("params.yaml")
    aug = P.data.augment
    full = dataclasses.replace(aug, enabled=True, eq_p=1.0, reverb_p=1.0, compress_p=1.0, remix_p=1.0)
    print(f"| stage | read (no aug) | read + default aug | read + every aug at p=1 | features | model fwd+bwd | old shards |")
    print("|---|---|---|---|---|---|---|")
    for stage, fields in list(STAGES.items()) + [("vae", None)]:
        row = []
        for cfg in (None, aug, full):
            if stage == "vae":
                ds = TrackCrops(a.root, "train", P.vae.segment_s, 0, cfg)
                dl = make_loader(ds, a.batch, True, 0)
            else:
                ds = CropDataset(a.root, "train", fields, P.data.crop_s, 0, cfg, remix=stage != "codebook")
                dl = make_loader(ds, a.batch, True, 0, collate_fn=collate)
            it = iter(dl); next(it)
            row.append(timed(lambda: next(it), a.batches))
        if stage != "vae":
            feats = load_splits(fields, a.root, splits=())["features"]
            b = next(iter(make_loader(CropDataset(a.root, "train", fields, P.data.crop_s), a.batch, True, 0, collate_fn=collate)))
            row.append(timed(lambda: feats(b), a.batches))
        else: row.append(float("nan"))
        from duotok.perf import stage_objective, _wrap_vae
        P8 = dataclasses.replace(P, vae=dataclasses.replace(P.vae, segment_s=P.vae.segment_s))
        obj, bb, lam = stage_objective(P8, stage, a.batch)
        if not isinstance(bb, dict): obj, bb = _wrap_vae(obj, bb)
        def step():
            out = obj(bb); sum(w * out[k] for k, w in lam.items() if w and k in out and out[k].requires_grad).backward()
            obj.zero_grad(set_to_none=True)
        row.append(timed(step, max(2, a.batches // 3)))
        old = float("nan")
        if a.old and stage != "vae":
            rd = old_reader(Path(a.old), fields)
            old = timed(lambda: rd(a.batch), a.batches)
        print(f"| {stage} | " + " | ".join(f"{x:.0f} ms" if x == x else "-" for x in row + [old]) + " |", flush=True)


if __name__ == "__main__":
    main()
