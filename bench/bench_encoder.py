"""Encoder throughput on this machine (CPU): seconds of audio encoded per second and 25 Hz tokens per second, for the
embedded default (params.yaml) and the paper scale (params/paper.yaml), in fp32 (and bf16 with --bf16).
`python -m duotok.bench` prints the same with the roofline and the nn.TransformerEncoder reference.

    OMP_NUM_THREADS=1 python bench/bench_encoder.py [--seconds 30] [--repeats 2] [--skip-paper] [--bf16]

The paper-scale encoder (24 = 12 + 12 blocks, width 1024) is also instantiated on the meta device
first (parameter count without memory); its 30 s forward must give 750 frames."""
from __future__ import annotations

import argparse

import torch

from duotok.bench import encoder_speed
from duotok.config import load_params
from duotok.core import count_parameters
from duotok.models.encoder import MusicEncoder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-paper", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also in bfloat16")
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    configs = {"default": load_params("params.yaml"), "paper": load_params("params.yaml", profile="params/paper.yaml")}
    for name, p in configs.items():
        cfg, au = p.ssl.encoder, p.audio
        with torch.device("meta"):
            meta = MusicEncoder(cfg, au)
            t = meta(torch.empty(1, au.n_mels, int(a.seconds * au.frame_rate))).last.shape[1]
        print(f"[{name}] layers {cfg.layers} = {cfg.lower_layers} + {cfg.upper_layers}, width {cfg.width}: "
              f"{count_parameters(meta):,} parameters (meta device); {a.seconds:g} s -> {t} frames")
        if name == "paper" and a.skip_paper: continue
        for dt in (torch.float32, torch.bfloat16) if a.bf16 else (torch.float32,):
            r = encoder_speed(cfg, au, dt, a.seconds, a.repeats)
            assert r["tokens"] == int(a.seconds * au.token_rate), r
            print(f"[{name}] {str(dt).split('.')[-1]} forward {a.seconds:g} s: {r['s_per_forward']:.2f} s -> "
                  f"{r['audio_s_per_s']:.1f} s of audio/s, {r['tokens'] / r['s_per_forward']:.0f} tokens/s ({r['tokens']} frames)")


if __name__ == "__main__":
    main()
