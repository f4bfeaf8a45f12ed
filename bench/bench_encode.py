"""Encode throughput and peak memory of `DuoTok.encode` on a long song, before and after the issue-16 encoder.

    python bench/bench_encode.py                       # both variants, random weights at the params.yaml size, 10 min
    python bench/bench_encode.py --variant current     # only the current front end + banded lower half
    python bench/bench_encode.py --model outputs/decoder/package --minutes 10 --chunk-s 4

Variants: `legacy` = the first release (per-bin standardised raw log-mel, full attention in the lower half, 4 s
windows without context); `current` = params.yaml's encoder (level-invariant front end, lower blocks attending
+-`lower_attention_window` tokens) with DuoTok's defaults (windows of `ENCODE_CHUNK_S` plus the receptive field as
context, which makes windowed tokens equal to whole-song tokens). With `--variant both` each runs in its own process,
so peak memory is measured from a fresh process each time.

Tokens depend only on the frozen lower encoder + the two codebooks, so a random-weight encoder of the same size
costs the same as a trained one. Prints seconds of audio encoded per second of wall time, and the peak resident
memory during `encode` above the memory held before it (the two 48 kHz stereo inputs are allocated before).
Set OMP_NUM_THREADS to the number of cores you want to use."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import psutil

from duotok.bench import PeakRSS
import torch


LEGACY = {"level": "none", "lower_attention_window": 0}
"The first release's encoder front end and attention (the `legacy` variant)."


def default_encoder(params_path: str = "params.yaml", legacy: bool = False):
    "A random-weight token encoder of the params' size (`duotok.bench.default_encoder`); `legacy`: the first release's."
    from duotok.bench import default_encoder as build
    from duotok.config import load_params
    return build(load_params(params_path), LEGACY if legacy else None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="packaged tokenizer folder (default: random encoder, params.yaml size)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sr", type=int, default=48000)
    ap.add_argument("--variant", choices=["both", "current", "legacy"], default="both",
                    help="legacy = the first release's encoder and windows; current = params.yaml's (default: both)")
    ap.add_argument("--chunk-s", type=float, default=None, help="window (s); default: 4 (legacy) / DuoTok's default (current)")
    ap.add_argument("--context-s", type=float, default=None, help="context (s); default: 0 (legacy) / the receptive field (current)")
    ap.add_argument("--batch-windows", type=int, default=None)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)      # one variant, result as JSON (for --variant both)
    args = ap.parse_args(argv)
    if args.variant == "both":
        res = {}
        for v in ("legacy", "current"):
            cmd = [sys.executable, __file__, "--variant", v, "--json", "--minutes", str(args.minutes), "--sr", str(args.sr)]
            for k in ("model", "chunk_s", "context_s", "batch_windows"):
                if getattr(args, k) is not None: cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            print(out[: out.rindex("{")].rstrip())
            res[v] = json.loads(out[out.rindex("{"):])
        a, b = res["legacy"], res["current"]
        print(f"before -> after: {a['audio_s_per_s']:.1f} -> {b['audio_s_per_s']:.1f} s of audio per second; peak "
              f"{a['peak_above_inputs_mb']:.0f} -> {b['peak_above_inputs_mb']:.0f} MB above the inputs")
        return res
    from duotok.tokenizer import ENCODE_CHUNK_S, DuoTok
    torch.set_grad_enabled(False)
    legacy = args.variant == "legacy"
    kw = {"chunk_s": args.chunk_s if args.chunk_s is not None else (4.0 if legacy else ENCODE_CHUNK_S),
          "context_s": args.context_s if args.context_s is not None else (0.0 if legacy else None)}
    if args.batch_windows is not None: kw["batch_windows"] = args.batch_windows
    if args.model:
        tok = DuoTok.from_pretrained(args.model, **kw)
    else:
        tok = DuoTok(default_encoder(legacy=legacy), **kw)
    print(f"[{args.variant}] {tok.describe()}")
    # warm-up on 5 s (first-call allocations, mel filterbank cache)
    g = np.random.default_rng(0)
    tok.encode(0.1 * g.standard_normal((2, args.sr * 5)).astype("float32"),
               0.1 * g.standard_normal((2, args.sr * 5)).astype("float32"), args.sr)
    L = int(args.minutes * 60 * args.sr)
    t = np.arange(L, dtype=np.float32) / args.sr
    voc = np.stack([0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.01 * np.sin(t))), 0.3 * np.sin(2 * np.pi * 330 * t)]).astype("float32")
    acc = (0.05 * g.standard_normal((2, L))).astype("float32")
    del t
    rss0 = psutil.Process().memory_info().rss
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        tokens = tok.encode(voc, acc, args.sr)
        dt = time.perf_counter() - t0
    audio_s = L / args.sr
    res = {"audio_s": audio_s, "wall_s": dt, "audio_s_per_s": audio_s / dt, "tokens_per_track": tokens.n_tokens,
           "input_bytes": voc.nbytes + acc.nbytes, "rss_before_mb": rss0 / 2**20,
           "peak_rss_mb": mem.peak / 2**20, "peak_above_inputs_mb": (mem.peak - rss0) / 2**20,
           "threads": torch.get_num_threads(), "chunk_s": tok.chunk_s, "context_s": tok.context_tokens / tok.token_rate,
           "variant": args.variant}
    print(f"[{args.variant}] encoded {audio_s / 60:.1f} min of 48 kHz stereo stems (x2) in {dt:.1f} s: "
          f"{res['audio_s_per_s']:.1f} s of audio per second ({res['threads']} thread(s), window {tok.chunk_s:g} s "
          f"+ {res['context_s']:g} s context)")
    print(f"[{args.variant}] memory: inputs {res['input_bytes'] / 2**20:.0f} MB; process RSS before encode {res['rss_before_mb']:.0f} MB, "
          f"peak {res['peak_rss_mb']:.0f} MB, i.e. {res['peak_above_inputs_mb']:.0f} MB above the inputs")
    print(f"[{args.variant}] {tokens!r}")
    if args.json: print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
