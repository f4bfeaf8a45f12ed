"""Decode throughput of the token decoder: seconds of 48 kHz stereo-stem audio (vocals + accompaniment)
produced per wall-clock second, vs the number of sampling steps.

    python bench/bench_decode.py                          # packaged decoder if present, else default-size untrained
    python bench/bench_decode.py --dir outputs/decoder/package/decoder --seconds 20 --steps 1 5 10 20 50
    python bench/bench_decode.py --long 30 300 --steps 2  # long songs: peak RSS and audio s/s per length

`--long`: each length is decoded in a fresh process (`TokenDecoder.decode` with its progress bar, as `duotok decode`
does), which reports its peak RSS (`ru_maxrss`), its RSS before decoding and the size of the decoded arrays: memory
that grows with the song only by the output (the decoder works chunk by chunk) shows as a constant
"peak - before - output" across lengths.

Untrained weights decode at the same speed as trained ones (same shapes), so the default-size run is a
faithful speed measurement before the pipeline has run. Uses torch's current thread count
(set OMP_NUM_THREADS to pin it)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def default_decoder(params_path: str = "params.yaml", profile: str | None = None):
    "An untrained decoder of the params' size (`duotok.bench.default_decoder`)."
    from duotok.bench import default_decoder as build
    from duotok.config import load_params
    return build(load_params(params_path, profile=profile))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
    return float("nan")


def one_long(dir: str, seconds: float, steps: int, profile: str | None) -> dict:
    "Decode `seconds` of random tokens once in this process; peak RSS, RSS before, output size, wall time."
    import resource
    from duotok.diffusion import TokenDecoder
    td = TokenDecoder.from_dir(dir) if Path(dir, "denoiser.json").exists() else default_decoder(profile=profile)
    td.steps = steps
    K = td.model.nets[0].codebook_sizes
    T = int(round(seconds * td.token_rate))
    g = torch.Generator().manual_seed(0)
    iv, ia = torch.randint(0, K[0], (T,), generator=g), torch.randint(0, K[1], (T,), generator=g)
    before = _rss_mb()
    t = time.perf_counter()
    with torch.no_grad():
        wv, wa = td.decode(iv, ia, progress=True)
    wall = time.perf_counter() - t
    out_mb = (wv.numel() + wa.numel()) * 4 / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "wall_s": round(wall, 2), "audio_s_per_s": round(seconds / wall, 3), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak, 1), "output_mb": round(out_mb, 1), "extra_mb": round(peak - before - out_mb, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="outputs/decoder/package/decoder", help="packaged decoder folder")
    ap.add_argument("--profile", default=None, help="params profile for the untrained fallback")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio length to decode (s)")
    ap.add_argument("--batch", type=int, default=1, help="songs decoded at once")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    ap.add_argument("--guidance", type=float, default=None, help="override the guidance scale (1 = no CFG)")
    ap.add_argument("--long", type=float, nargs="+", default=None, metavar="SECONDS",
                    help="decode songs of these lengths, each in a fresh process: peak RSS and audio s/s (first --steps value)")
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one is not None:                                    # the child of --long
        import json
        print("RESULT " + json.dumps(one_long(a.dir, a.one, a.steps[0], a.profile)), flush=True)
        return
    if a.long:
        import json, subprocess, sys
        print(f"{'seconds':>8} {'wall_s':>8} {'audio_s/s':>10} {'rss_before_MB':>14} {'peak_rss_MB':>12} {'output_MB':>10} "
              f"{'peak-before-output_MB':>22}")
        for sec in a.long:
            r = subprocess.run([sys.executable, __file__, "--dir", a.dir, "--one", str(sec), "--steps", str(a.steps[0]),
                                *(["--profile", a.profile] if a.profile else [])], capture_output=True, text=True)
            line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"decoding {sec} s failed:\n{r.stderr[-2000:]}")
            m = json.loads(line[7:])
            print(f"{m['seconds']:>8.0f} {m['wall_s']:>8.1f} {m['audio_s_per_s']:>10.2f} {m['rss_before_mb']:>14.0f} "
                  f"{m['peak_rss_mb']:>12.0f} {m['output_mb']:>10.1f} {m['extra_mb']:>22.0f}", flush=True)
        return
    from duotok.diffusion import TokenDecoder
    if Path(a.dir, "denoiser.json").exists():
        td, what = TokenDecoder.from_dir(a.dir), f"trained ({a.dir})"
    else:
        td, what = default_decoder(profile=a.profile), f"untrained ({a.profile or 'params.yaml'} size)"
    if a.guidance is not None:
        td.guidance_scale = a.guidance
    K = td.model.nets[0].codebook_sizes
    T = int(round(a.seconds * td.token_rate))
    g = torch.Generator().manual_seed(0)
    iv, ia = torch.randint(0, K[0], (a.batch, T), generator=g), torch.randint(0, K[1], (a.batch, T), generator=g)
    n_par = sum(p.numel() for p in td.model.parameters())
    print(f"decoder: {what}; {n_par / 1e6:.2f} M denoiser params; guidance {td.guidance_scale}; "
          f"chunk {td.chunk_tokens} tokens, overlap {td.overlap_tokens}; threads {torch.get_num_threads()}")
    print(f"decoding {a.batch} x {a.seconds:.1f} s (both stems)")
    audio = a.batch * a.seconds
    with torch.no_grad():
        td.steps = 1
        td.decode(iv[:, : min(T, td.chunk_tokens)], ia[:, : min(T, td.chunk_tokens)])  # warm-up
        z = torch.zeros(2 * a.batch, td.model.latent_dim, 2 * T)
        t = time.perf_counter(); td.vae.decode(z); vae_s = time.perf_counter() - t
        print(f"VAE decoding alone (whole latent, both stems): {vae_s:.2f} s = {audio / vae_s:.2f} audio s/s")
        print(f"{'steps':>6} {'wall_s':>8} {'audio_s_per_s':>14}")
        for steps in a.steps:
            td.steps = steps
            t = time.perf_counter()
            td.decode(iv, ia)
            wall = time.perf_counter() - t
            print(f"{steps:>6} {wall:>8.2f} {audio / wall:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
