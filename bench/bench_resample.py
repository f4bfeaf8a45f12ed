"""Memory, speed and accuracy of `duotok.audio.resample` (through `load_audio`) per rate pair.

    python bench/bench_resample.py                      # 60 s stereo files, targets 48 and 24 kHz
    python bench/bench_resample.py --seconds 10 --rates 44100 44101

Each case runs in a fresh process (peak RSS = ru_maxrss after loading minus before) under an address-space
cap of 3 GiB above the loaded interpreter, so a resampler that would need more fails instead of
swapping. Accuracy: a sum of 20 tones below 0.4 x the lower rate, resampled, compared with the same
tones evaluated at the output times (max abs error, 10% margins cut). Uses one thread."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASE = r"""
import resource, sys, time, numpy as np, soundfile as sf
rate, target, secs, path = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
from duotok.audio import load_audio, resample, sinc_kernel_size, SINC_KERNEL_LIMIT
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try: x, sr = load_audio(path, sr=target); res = f"ok {x.shape}"
except BaseException as e: res = f"FAILED {type(e).__name__}: {str(e)[:90]}"
dt = time.perf_counter() - t0
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
rng = np.random.default_rng(0); fs, ph = rng.uniform(50, 0.4 * min(rate, target), 20), rng.uniform(0, 6, 20)
sig = lambda t: sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(fs, ph)) / 20
try:
    y = resample(sig(np.arange(2 * rate) / rate).astype(np.float32), rate, target)
    m = target // 5; err = f"{np.abs(y[m:-m] - sig(np.arange(len(y)) / target)[m:-m]).max():.1e}"
except BaseException as e: err = type(e).__name__
path_used = "torchaudio" if sinc_kernel_size(rate, target) <= SINC_KERNEL_LIMIT else "soxr"
print(f"| {rate} -> {target} | {path_used} | {peak:.0f} MiB | {dt:.2f} s | {err} | {res} |")
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rates", type=int, nargs="+", default=[44100, 48000, 22050, 96000, 44101, 47999, 44056])
    ap.add_argument("--targets", type=int, nargs="+", default=[48000, 24000])
    a = ap.parse_args(argv)
    import numpy as np
    import soundfile as sf
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"load_audio(sr=target) of a {a.seconds:g} s stereo 16-bit WAV, one thread\n")
    print("| rate | resampler | peak RSS | time | max error (tones) | result |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for rate in a.rates:
            p = Path(d) / f"x{rate}.wav"
            sf.write(p, (0.1 * np.random.default_rng(0).standard_normal((int(a.seconds * rate), 2))).astype("float32"), rate,
                     subtype="PCM_16")
            for target in a.targets:
                if target == rate: continue
                r = subprocess.run([sys.executable, "-c", CASE, str(rate), str(target), str(a.seconds), str(p)],
                                   capture_output=True, text=True, env=env, timeout=600)
                print(r.stdout.strip() or f"| {rate} -> {target} | crashed: {r.stderr.strip()[-200:]} |", flush=True)


if __name__ == "__main__":
    main()
