"""Decoded-from-tokens quality of a packaged decoder on test segments (issue 24, the decode side of the VAE).

    OMP_NUM_THREADS=1 python scripts/decoder_pitch.py --decoder outputs/decoder/package/decoder \
        --pre outputs/pre_encode --n 8

decodes the ground-truth tokens (`pre_encode`'s `tokens_test.npz`) of the first `--n` test segments with
`duotok.diffusion.TokenDecoder` and scores them against the original stems: vocals raw pitch accuracy (torchcrepe,
50 cents, against the original's F0), `duotok.metrics.reconstruction_metrics` per track, and the same for the VAE
round trip of the stored latents (the ceiling). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch

from duotok.diffusion import TokenDecoder
from duotok.metrics import pitch_track, raw_pitch_accuracy, reconstruction_metrics, summarize
from duotok.stages.pre_encode import load_split
from duotok.stages.vae import STEMS, _load_split


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decoder", required=True, help="a packaged decoder folder (denoiser.* + vae.*)")
    ap.add_argument("--pre", required=True, help="the pre_encode outputs the tokens come from")
    ap.add_argument("--root", default="outputs/preprocess")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="pesq_wb undefined")
    td = TokenDecoder.from_dir(args.decoder)
    toks, lat = load_split(args.pre, args.split)
    ds = _load_split(args.root, args.split)
    n = min(args.n, len(ds))
    sr = td.sample_rate
    rows = {"decoded": {"vocals": [], "acc": []}, "vae": {"vocals": [], "acc": []}}
    for i in range(n):
        item = ds[i]
        wv, wa = td.decode(torch.as_tensor(toks["vocals"][i]), torch.as_tensor(toks["acc"][i]), seed=i)
        with torch.no_grad():
            ceil = td.vae.decode(torch.from_numpy(np.array(lat[i], dtype=np.float32)))  # (2, L)
        for k, (track, field) in enumerate(STEMS.items()):
            if bool(item.get(f"silent_{track}", False)):
                continue
            ref = torch.as_tensor(np.asarray(item[field]), dtype=torch.float32)
            f0 = pitch_track(ref, sr) if track == "vocals" else None
            for name, est in (("decoded", (wv, wa)[k]), ("vae", ceil[k])):
                est = est[: ref.shape[-1]]
                row = reconstruction_metrics(ref, est, sr)
                if f0 is not None:
                    row["rpa"] = raw_pitch_accuracy(f0, pitch_track(est, sr))
                rows[name][track].append(row)
    out = {f"{args.split}/{name}/{track}/{k}": v for name, tr in rows.items() for track, r in tr.items()
           for k, v in summarize(r).items() if k != "mel_l1_dac"}
    out["n"] = n
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
