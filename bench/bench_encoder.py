"""Encoder throughput on this machine (CPU by default): seconds of audio encoded per second and 25 Hz
tokens per second, for the embedded default (params.yaml) and the paper scale (params/paper.yaml).

    OMP_NUM_THREADS=1 python bench/bench_encoder.py [--seconds 30] [--repeats 2] [--skip-paper] [--device cpu]

The paper-scale encoder (24 = 12 + 12 blocks, width 1024) is also instantiated on the meta device
first (parameter count without memory); its 30 s forward must give 750 frames."""
from __future__ import annotations

import argparse
import time

import torch

from duotok.config import load_params
from duotok.core import count_parameters
from duotok.config import AudioConfig, EncoderConfig
from duotok.models.encoder import MusicEncoder


def bench(cfg: EncoderConfig, audio: AudioConfig, seconds: float, repeats: int, device: str, batch: int = 1) -> dict:
    torch.manual_seed(0)
    enc = MusicEncoder(cfg, audio).to(device).eval()
    frames = int(round(seconds * audio.frame_rate))
    mel = torch.randn(batch, audio.n_mels, frames, device=device)
    with torch.inference_mode():
        out = enc(mel)                                     # warm-up
        if device == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats): out = enc(mel)
        if device == "cuda": torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / repeats
    n_tok = out.last.shape[1]
    return {"params_M": count_parameters(enc) / 1e6, "frames_out": n_tok, "s_per_forward": dt,
            "audio_s_per_s": batch * seconds / dt, "tokens_per_s": batch * n_tok / dt}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-paper", action="store_true")
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {a.device}")
    configs = {"default": load_params("params.yaml"), "paper": load_params("params.yaml", profile="params/paper.yaml")}
    for name, p in configs.items():
        cfg, au = p.ssl.encoder, p.audio
        with torch.device("meta"):
            meta = MusicEncoder(cfg, au)
            t = meta(torch.empty(1, au.n_mels, int(a.seconds * au.frame_rate))).last.shape[1]
        print(f"[{name}] layers {cfg.layers} = {cfg.lower_layers} + {cfg.upper_layers}, width {cfg.width}: "
              f"{count_parameters(meta):,} parameters (meta device); {a.seconds:g} s -> {t} frames")
        if name == "paper" and a.skip_paper: continue
        r = bench(cfg, au, a.seconds, a.repeats, a.device)
        assert r["frames_out"] == int(a.seconds * au.token_rate), r
        print(f"[{name}] forward {a.seconds:g} s: {r['s_per_forward']:.2f} s -> {r['audio_s_per_s']:.1f} s of audio/s, "
              f"{r['tokens_per_s']:.0f} tokens/s ({r['frames_out']} frames)")


if __name__ == "__main__":
    main()
