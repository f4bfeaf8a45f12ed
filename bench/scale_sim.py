"""Scale simulation: the data path on a corpus ~20x the embedded default, against the default itself.

    python bench/scale_sim.py                        # builds /tmp/duotok-scale/x20 (cached), runs both corpora, prints the table
    python bench/scale_sim.py --factor 20 --scratch /data/scale --skip-build

The 20x corpus is built from the rendered default (`outputs/render`): every song in `factor` varispeed copies
(soxr resampling, playback rate 0.85-1.15: tempo and pitch together, lyric timings scaled) with a random gain per stem
(+-3 dB), written as 16-bit FLAC stems under the scratch folder (never in data/ or outputs/); each copy keeps the split
of its original (no leakage). Each corpus then goes through `preprocess` and one epoch (one pass over the random-crop
slots of the train songs, or over the pre-encoded grid) of every training stage, each as its own
`python -m duotok.stages.<name>` process in a scratch project: ssl, finetune, codebook (4 s crops, batch 8), vae
(2 s single-track crops: the default's 0.5 s would need 4x the steps for the same audio), pre_encode (every grid
segment of every split) and decoder (batch 16); `--fraction vae=0.2` (the default) runs a fifth of the scaled
corpus's VAE epoch (the toy VAE's step is its losses at 48 kHz, ~1 s, so the whole 20x epoch would take ~80 min on
one core): still 4x the audio of the default's whole epoch, and per-hour figures count the audio that fraction
stands for. Models are toy-sized (encoder width 32, 2 layers; VAE width 16; DiT width 32) so the loop measures the
data path, not the models; `data.augment` is as in params.yaml.

Printed per corpus and stage: CPU seconds per audio hour of the epoch loop (each training stage runs twice, for 1
step and for the epoch; the difference of their CPU times (GNU time, user + sys) is the loop, robust to other load
on the machine), wall seconds per audio hour of the loop (steps / the final `train/steps_per_s` logged to MLflow),
and peak RSS of the epoch run (the stage process and its children); pre_encode and preprocess: the whole stage; for
preprocess also the index size per audio hour. Then (`--eval-cap 48`) finetune and codebook run 1 step on each
corpus with `data.max_eval_segments=48`: both hold their evaluation sets in memory, which grow with the corpus up to
`data.max_eval_segments` (512) and then stop; with equal caps, what is left is what grows with the corpus itself
(`--cap-only` runs just this in projects already simulated). Results are also written to `<scratch>/results.json`."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEMS = ("vocals", "drums", "bass", "other")
TOY = ["ssl.encoder.width=32", "ssl.encoder.layers=2", "ssl.encoder.lower_layers=1", "ssl.encoder.heads=2",
       "ssl.encoder.conv_channels=32", "ssl.rpq_codebook_size=16", "ssl.probe.enabled=false", "finetune.bottleneck_dim=8",
       "audio.codebook_size=16", "vae.width=16", "vae.layers=1", "vae.latent_dim=8", "vae.segment_s=2.0",
       "vae.val_segments=8", "decoder.width=32", "decoder.layers=1", "decoder.heads=2", "decoder.val_segments=2",
       "decoder.sampling_steps=2", "preprocess.workers=2"]
TRAIN = {"ssl": 8, "finetune": 8, "codebook": 8, "vae": 8, "decoder": 16}


# ------------------------------------------------------------------------------------------- building the corpus
def _variant(args):
    src, dst, sid, vid, rate, seed = args
    import soundfile as sf
    import soxr
    rng = np.random.default_rng(seed)
    (dst / "songs" / vid).mkdir(parents=True, exist_ok=True)
    n = None
    for s in STEMS:
        x, sr = sf.read(src / "songs" / sid / f"{s}.flac", dtype="float32")
        y = soxr.resample(x, sr, int(round(sr / rate)), quality="HQ") * np.float32(10 ** (rng.uniform(-3, 3) / 20))
        sf.write(dst / "songs" / vid / f"{s}.flac", np.clip(y, -1, 1), sr, subtype="PCM_16")
        n = len(y)
    lp = src / "songs" / sid / "lyrics.json"
    if lp.exists():
        lyr = json.loads(lp.read_text())
        for key in ("syllables", "words", "chars"):
            for c in lyr.get(key, []): c["start"], c["end"] = c["start"] / rate, c["end"] / rate
        (dst / "songs" / vid / "lyrics.json").write_text(json.dumps(lyr))
    return vid, n / sr


def build_corpus(src: Path, dst: Path, factor: int, workers: int, val_fraction: float, test_fraction: float, seed: int = 0):
    "`factor` varispeed copies of every song of render output `src` as a render output at `dst` (see the top)."
    from duotok.preprocess import assign_splits
    idx = json.loads((src / "index.json").read_text())
    split = assign_splits({r["id"]: r.get("split") for r in idx["songs"]}, val_fraction, test_fraction, seed)
    rates = np.linspace(0.85, 1.15, factor) if factor > 1 else np.ones(1)
    jobs, recs = [], {}
    for r in idx["songs"]:
        for k, rate in enumerate(rates):
            vid = f"{r['id']}-v{k:02d}"
            jobs.append((src, dst, r["id"], vid, float(rate), zlib.crc32(vid.encode())))
            recs[vid] = {**r, "id": vid, "split": split[r["id"]], "f0": None, "title": f"{r.get('title', r['id'])} x{rate:.3f}"}
    with get_context("fork").Pool(workers) as pool:
        for i, (vid, dur) in enumerate(pool.imap_unordered(_variant, jobs), 1):
            recs[vid]["duration_s"] = dur
            if i % 200 == 0: print(f"[scale] {i}/{len(jobs)} copies", flush=True)
    (dst / "index.json").write_text(json.dumps({**idx, "songs": [recs[v] for v in sorted(recs)]}))
    (dst / "rejected.json").write_text("{}")


# ------------------------------------------------------------------------------------------- running the stages
def run_stage(proj: Path, stage: str, sets: list[str], log) -> dict:
    tfile = proj / f"time_{stage}.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlruns.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(tfile), sys.executable, "-m", f"duotok.stages.{stage}"]
    for s in sets: cmd += ["--set", s]
    t0 = time.time()
    with open(proj / f"{stage}.log", "w") as f:
        r = subprocess.run(cmd, cwd=proj, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode: raise RuntimeError(f"{stage} failed in {proj} (see {proj / f'{stage}.log'})")
    wall, user, sys_, rss = tfile.read_text().split()[-4:]
    out = {"wall_s": float(wall), "cpu_s": float(user) + float(sys_), "peak_rss_mb": int(rss) / 1024}
    log(f"[scale] {proj.name} {stage}: {out} ({time.time() - t0:.0f} s)")
    return out


def steps_per_s(proj: Path, stage: str) -> float | None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{proj / 'mlruns.db'}"
    from duotok.tracking import read_history
    h = read_history(stage, keys=["train/steps_per_s"])
    return float(h.sort_values("step")["value"].iloc[-1]) if len(h) else None


def train_sets(stage: str, steps: int) -> list[str]:
    "`--set` overrides of a training stage for `steps` steps at the simulation's batch size, no validation or checkpoints."
    return [f"{stage}.train.{k}={v}" for k, v in dict(steps=steps, batch_size=TRAIN[stage], val_every=0, ckpt_every=0,
                                                      log_every=max(1, min(50, steps)), warmup_steps=min(10, steps)).items()]


def simulate(name: str, render: Path, scratch: Path, log=print, fraction: dict | None = None) -> dict:
    "Preprocess + one epoch per training stage on render output `render`; `fraction` {stage: f} runs f of that epoch."
    fraction = fraction or {}
    proj = scratch / name
    if (proj / "outputs").exists(): shutil.rmtree(proj / "outputs")
    (proj / "outputs").mkdir(parents=True, exist_ok=True)
    (proj / "mlruns.db").unlink(missing_ok=True)
    for f in ("params.yaml",): shutil.copy(ROOT / f, proj / f)
    os.symlink(render.resolve(), proj / "outputs" / "render")
    res = {"preprocess": run_stage(proj, "preprocess", ["preprocess.workers=2"], log)}
    summ = json.loads((proj / "outputs/preprocess/summary.json").read_text())
    hours = summ["hours"]; res["hours"] = hours; res["songs"] = summ["songs"]
    res["preprocess"].update(mb_per_audio_hour=summ["mb_per_audio_hour"], index_mb=summ["bytes"] / 1e6)
    from duotok.config import load_params
    from duotok.data import CropDataset, SegmentDataset, TrackCrops
    P = load_params(ROOT / "params.yaml")
    pre = proj / "outputs/preprocess"
    n_crops = len(CropDataset(pre, "train", ["wav24_mix"], P.data.crop_s))
    n_vae = len(TrackCrops(pre, "train", 2.0))
    n_grid = len(SegmentDataset(pre, "train", ["song"]))
    epochs = {"ssl": n_crops, "finetune": n_crops, "codebook": n_crops, "vae": n_vae, "decoder": 2 * n_grid}
    for stage in ("ssl", "finetune", "codebook", "vae", "pre_encode", "decoder"):
        if stage not in TRAIN:
            r = run_stage(proj, stage, list(TOY), log)
            r["s_per_audio_hour"], r["cpu_s_per_audio_hour"] = r["wall_s"] / hours, r["cpu_s"] / hours
            res[stage] = r; continue
        b = TRAIN[stage]; frac = fraction.get(stage, 1.0); steps = max(2, math.ceil(epochs[stage] * frac / b))
        runs = {}
        for n in (1, steps):                       # the same stage for 1 step and for the epoch: the difference is the loop
            runs[n] = run_stage(proj, stage, list(TOY) + train_sets(stage, n), log)
        r = runs[steps]; sps = steps_per_s(proj, stage)
        loop_cpu = (r["cpu_s"] - runs[1]["cpu_s"]) * steps / (steps - 1)
        seen = hours * frac                        # the audio hours of the corpus the (partial) epoch stands for
        r.update(steps=steps, items=epochs[stage], fraction=frac, epoch_s=steps / sps if sps else None, epoch_cpu_s=loop_cpu,
                 fixed_cpu_s=runs[1]["cpu_s"], s_per_audio_hour=steps / sps / seen if sps else None,
                 cpu_s_per_audio_hour=loop_cpu / seen)
        res[stage] = r
    res["preprocess"]["s_per_audio_hour"] = res["preprocess"]["wall_s"] / hours
    res["preprocess"]["cpu_s_per_audio_hour"] = res["preprocess"]["cpu_s"] / hours
    return res


def capped_rss(proj: Path, cap: int, log=print) -> dict:
    """Peak RSS (MB) of finetune and codebook for 1 step with `data.max_eval_segments=cap` in a simulated project.
    Both stages keep their evaluation sets in memory (finetune: features for k-means and the lyric bias; codebook:
    the cached lower-layer features); those sets grow with the corpus up to `data.max_eval_segments` (512) and then
    stop. With the same cap on both corpora, what is left is what grows with the corpus itself."""
    out = {"cap": cap}
    for stage in ("finetune", "codebook"):
        out[stage] = run_stage(proj, stage, list(TOY) + [f"data.max_eval_segments={cap}"] + train_sets(stage, 1),
                               log)["peak_rss_mb"]
    return out


def table(results: dict) -> str:
    "Markdown table: per stage and corpus, CPU and wall seconds per audio hour of the epoch loop, peak RSS; ratios."
    names = list(results)
    two = len(names) == 2
    head = "| stage | " + " | ".join(f"{n}: CPU s / audio h | {n}: wall s / audio h | {n}: peak RSS (MB)" for n in names)
    head += " | CPU / h ratio | RSS ratio |" if two else " |"
    lines = ["Audio: " + ", ".join(f"{n} {results[n]['hours'] * 60:.1f} min ({results[n]['songs']} songs)" for n in names),
             "", head, "|" + "---|" * (1 + 3 * len(names) + (2 if two else 0))]
    f = lambda v, p=0: f"{v:.{p}f}" if isinstance(v, (int, float)) else "-"
    for st in ("preprocess", "ssl", "finetune", "codebook", "vae", "pre_encode", "decoder"):
        cells = []
        for n in names:
            r = results[n][st]
            cells += [f(r.get("cpu_s_per_audio_hour")), f(r.get("s_per_audio_hour")), f(r["peak_rss_mb"])]
        fr = sorted({results[n][st].get("fraction", 1.0) for n in names} - {1.0})
        row = f"| {st}{' (' + ', '.join(f'{x:g}' for x in fr) + ' of the epoch)' if fr else ''} | " + " | ".join(cells)
        if two:
            a, b = (results[n][st] for n in names)
            row += f" | {f(b['cpu_s_per_audio_hour'] / a['cpu_s_per_audio_hour'], 2)} | {f(b['peak_rss_mb'] / a['peak_rss_mb'], 2)}"
        lines.append(row + " |")
    lines.append("")
    caps = [results[n].get("capped") for n in names]
    if all(caps):
        lines.append(f"Peak RSS with the evaluation sets capped at {caps[0]['cap']} segments (1 step): " + "; ".join(
            f"{st} " + " / ".join(f"{c[st]:.0f}" for c in caps) + " MB" + (f" (ratio {caps[1][st] / caps[0][st]:.2f})" if two else "")
            for st in ("finetune", "codebook")))
        lines.append("")
    lines.append("Index size: " + ", ".join(f"{n} {results[n]['preprocess']['index_mb']:.2f} MB "
                                             f"({results[n]['preprocess']['mb_per_audio_hour']:.2f} MB per audio hour)" for n in names))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=int, default=20)
    ap.add_argument("--scratch", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "duotok-scale"))
    ap.add_argument("--render", default=str(ROOT / "outputs/render"))
    ap.add_argument("--skip-build", action="store_true", help="reuse <scratch>/x<factor>/render")
    ap.add_argument("--only", choices=["default", "scaled", "build"], default=None, help="one corpus, or only build the scaled one")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-cap", type=int, default=48,
                    help="after the epochs, finetune and codebook for 1 step with data.max_eval_segments=N (0: skip)")
    ap.add_argument("--cap-only", action="store_true", help="only the --eval-cap runs, in the projects already simulated")
    ap.add_argument("--fraction", nargs="*", default=["vae=0.2"], metavar="STAGE=F",
                    help="run F of the epoch of STAGE on the scaled corpus (per-hour figures count the audio F stands "
                         "for); default vae=0.2: the VAE's full 20x epoch is ~80 min on one core")
    a = ap.parse_args()
    scratch = Path(a.scratch); scratch.mkdir(parents=True, exist_ok=True)
    big = scratch / f"x{a.factor}" / "render"
    if not a.skip_build and not (big / "index.json").exists():
        from duotok.config import load_params
        p = load_params(ROOT / "params.yaml").preprocess
        t0 = time.time(); big.mkdir(parents=True, exist_ok=True)
        build_corpus(Path(a.render), big, a.factor, a.workers, p.val_fraction, p.test_fraction, p.seed)
        print(f"[scale] built {big} in {time.time() - t0:.0f} s", flush=True)
    if a.only == "build": return
    out = scratch / "results.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    runs = {"default": Path(a.render), f"x{a.factor}": big}
    for name, render in runs.items():
        if a.only == "default" and name != "default" or a.only == "scaled" and name == "default": continue
        frac = {k: float(v) for k, v in (f.split("=") for f in a.fraction)} if name != "default" else {}
        log = lambda m: print(m, flush=True)
        if a.cap_only and name not in results:
            raise SystemExit(f"--cap-only: no simulation of {name} in {out}; run without --cap-only first")
        if not a.cap_only:
            results[name] = simulate(name, render, scratch, log=log, fraction=frac)
            results[name]["source_gb"] = sum(f.stat().st_size for f in render.rglob("*.flac")) / 1e9
        if a.eval_cap: results[name]["capped"] = capped_rss(scratch / name, a.eval_cap, log)
        out.write_text(json.dumps(results, indent=1))
    print(table({k: results[k] for k in runs if k in results}))


if __name__ == "__main__":
    main()
