"""The paper profile trains (`make test-slow`; excluded from `make test`): every stage of `params/paper.yaml` (303.8 M
parameter encoder, 2 x 32768 codes, 16-layer 1024-wide DiT, Oobleck VAE-GAN, the 10 x 768 token LM) runs for 2 steps on
CPU at batch 1 as `python -m duotok.stages.<name> --profile params/paper.yaml`, on a 4-song corpus of 32 s stems with
timed lyrics (30 s crops, the paper's 30 s grid), end to end to a packaged tokenizer that encodes and decodes a clip.
Only budgets are overridden (steps, batch 1, no intermediate validation or checkpoints, 2 diffusion sampling steps,
one test segment, no Whisper / ViSQOL), never sizes. Measured once (README, docs/scale.md): wall time and peak RSS."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

from _corpus import write_song
from _helpers import ROOT

TRAINED = ("ssl", "finetune", "codebook", "vae", "decoder")
BUDGET = [f"{s}.train.{k}={v}" for s in TRAINED for k, v in
          dict(steps=2, batch_size=1, val_every=0, ckpt_every=0, log_every=1, warmup_steps=1).items()] + [
    "evaluate.lm_train.steps=2", "evaluate.lm_train.batch_size=1", "evaluate.lm_train.log_every=1",
    "evaluate.lm_train.ckpt_every=0", "evaluate.lm_train.warmup_steps=1", "pre_encode.batch_size=1",
    "decoder.sampling_steps=2", "decoder.val_segments=1", "evaluate.sampling_steps=2", "evaluate.max_test_segments=1",
    "evaluate.pitch_segments=1", "evaluate.asr_segments=0", "evaluate.visqol_segments=0", "vae.val_segments=1",
    "preprocess.val_fraction=0.25", "preprocess.test_fraction=0.25", "render.f0_check_songs=0",
    # 4 of the 36 shift-set songs (pre_encode of all 36 with the paper VAE took over an hour on one CPU core), and
    # stability on 60 s of audio: budgets, not sizes
    "render.max_songs=4", "evaluate.stability_s=60"]
STAGES = ("render", "preprocess", "ssl", "finetune", "codebook", "vae", "pre_encode", "decoder", "evaluate")


def _corpus(songs, n=4, secs=32.0, sr=48000):
    words = ["la", "lo", "li", "na", "no", "mi"]
    for i in range(n):
        lyr, t = [], 0.5
        while t + 0.6 < secs:
            lyr.append(dict(text=words[len(lyr) % len(words)], start=round(t, 3), end=round(t + 0.5, 3), word=len(lyr)))
            t += 0.8
        split = ["train", "train", "val", "test"][i]
        write_song(songs / f"s{i}", secs=secs, sr=sr, seed=i, meta={"language": "en", "lyrics": lyr, "split": split,
                                                                    "tags": ["pop", "female"]})


@pytest.mark.slow
def test_paper_profile_runs_every_stage_and_packages(tmp_path):
    free = shutil.disk_usage(tmp_path).free                 # paper-size checkpoints and resume states: ~10 GB
    if free < 12e9: pytest.fail(f"the paper profile needs about 12 GB of free disk under {tmp_path}; {free / 1e9:.1f} GB free "
                                "(set TMPDIR or pytest's --basetemp to a larger disk)")
    d = tmp_path / "paper"
    (d / "params").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", d / "params.yaml"); shutil.copy(ROOT / "params/paper.yaml", d / "params/paper.yaml")
    _corpus(d / "data" / "songs")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlruns.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    times, peak = {}, {}
    for name in STAGES:
        t0 = time.time()
        cmd = ["/usr/bin/time", "-f", "%M", "-o", str(d / f"rss_{name}"), sys.executable, "-m", f"duotok.stages.{name}",
               "--profile", "params/paper.yaml"] + [a for s in BUDGET for a in ("--set", s)]
        r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, f"stage {name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        times[name], peak[name] = round(time.time() - t0, 1), int((d / f"rss_{name}").read_text().split()[-1]) // 1024
        m = json.loads((d / "outputs" / name / "metrics.json").read_text())
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), (name, m)
        if name in TRAINED: assert (m.get("steps") == 2 or "train/loss" in m) and not (d / "outputs/.resume" / name).exists(), m
    cfg = json.loads((d / "outputs/codebook/model.json").read_text())["config"]
    assert cfg["encoder"]["width"] == 1024 and cfg["encoder"]["layers"] == 24 and cfg["audio"]["codebook_size"] == 32768
    dec = json.loads((d / "outputs/decoder/denoiser.json").read_text())["config"]
    assert dec["decoder"]["width"] == 1024 and dec["decoder"]["layers"] == 16
    assert json.loads((d / "outputs/vae/vae.json").read_text())["config"]["vae"]["arch"] == "oobleck"
    # the package encodes and decodes a clip
    code = ("import numpy as np; from duotok.tokenizer import DuoTok; tok = DuoTok.from_pretrained('outputs/decoder/package');"
            "t = np.arange(96000) / 48000; v = 0.1 * np.sin(2 * np.pi * 220 * t); a = 0.1 * np.sin(2 * np.pi * 110 * t);"
            "ids = tok.encode(v, a, 48000); out = tok.decode(ids);"
            "print(len(ids.vocals), ids.codebook_sizes, out.sample_rate, out.vocals.shape, bool(np.isfinite(out.mix).all()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=d, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.split()[0] == "50" and "32768" in r.stdout and "48000" in r.stdout and r.stdout.strip().endswith("True")
    print({"wall_s": times, "peak_rss_mb": peak, "total_s": round(sum(times.values()), 1)})
