"""Compare VAE designs on the same val/test stems (issue 24: a round trip that keeps pitch and phase).

Each option trains with the vae stage's loop (`duotok.train.fit`, the default `vae.train` settings unless the
option says otherwise) on random crops of the train stems, then encodes -> decodes (posterior mean) the first
`--n` non-silent val and test segments per stem and scores the round trip against the original:
raw pitch accuracy (RPA, 50 cents, torchcrepe via `duotok.metrics.pitch_track`) of vocals against the
original's F0, and `duotok.metrics.reconstruction_metrics` (mel L1, PESQ, STOI, SI-SDR).

    OMP_NUM_THREADS=1 python scripts/vae_options.py --options base if --steps 500 --out outputs/vae_options

prints the comparison table (markdown) and writes `table.json` and spectrogram PNGs (`<option>_spec.png`:
original / round trip of one test vocal) to `--out`.
"""
from __future__ import annotations

import argparse
import warnings
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from duotok.config import load_params
from duotok.metrics import pitch_track
from duotok.tracking import NullTracker
from duotok.data import SegmentDataset, make_loader
from duotok.distributed import objective_loss
from duotok.train import fit
from duotok.vae import STEMS, StemCrops, VAEObjective, build_vae, round_trip_metrics


def _load_split(root, split):
    return SegmentDataset(root, split, fields=["wav48_vocals", "wav48_acc", "silent_vocals", "silent_acc"])

# name -> (vae config overrides, lambdas overrides, vae_loss keyword arguments)
OPTIONS: dict[str, tuple[dict, dict, dict]] = {
    # the old default (STFTVAE): free phase learned through the mel loss only (phase set: params.yaml's is `noise`)
    "base": ({"arch": "stft", "phase": "free"}, {"mel/l1": 1.0, "wave/l1": 0.1, "kl": 1e-4}, {}),
    # the same head with direct STFT losses: log-magnitude, instantaneous frequency, group delay
    "free+spec": ({"arch": "stft", "phase": "free"}, {"mel/l1": 1.0, "stft/mag": 1.0, "stft/if": 1.0, "stft/gd": 1.0, "kl": 1e-4}, {}),
    # phase = running sum of a predicted instantaneous frequency per bin
    "if": ({"arch": "stft", "phase": "if"}, {"mel/l1": 1.0, "stft/mag": 1.0, "stft/if": 1.0, "kl": 1e-4}, {}),
    "if+gd": ({"arch": "stft", "phase": "if"}, {"mel/l1": 1.0, "stft/mag": 1.0, "stft/if": 1.0, "stft/gd": 1.0,
                                                "kl": 1e-4}, {}),
    # pitch in the latent (YIN F0 + voicing channels), harmonic partials + filtered noise (random phase) (noise_bands 0: per-bin noise, as these rows were measured)
    "harm": ({"arch": "harmonic", "phase": "noise", "harmonics": 64, "noise_bands": 0}, {"mel/l1": 1.0, "kl": 1e-4}, {}),
    # the same with the native-resolution log-magnitude loss on the summed spectrum
    "harm+mag": ({"arch": "harmonic", "phase": "noise", "harmonics": 64, "noise_bands": 0}, {"mel/l1": 1.0, "stft/mag": 1.0, "kl": 1e-4},
                 {"mag_floor": 1e-5}),
    # ... with the log-magnitude loss floored at 0.1 (|STFT| of a full-scale sine: 480): the audible part only
    "harm+mag0.1": ({"arch": "harmonic", "phase": "noise", "harmonics": 64, "noise_bands": 0}, {"mel/l1": 1.0, "stft/mag": 1.0, "kl": 1e-4},
                    {"mag_floor": 0.1}),
    # harm+mag0.1 with the noise branch's magnitude as N linear bands (DDSP's filtered noise; bands64 is the default): it
    # can no longer draw a narrow peak at the corpus's usual singing pitch (issue 24: a 475 Hz lump under high notes)
    **{f"harm+mag0.1+bands{n}": ({"arch": "harmonic", "phase": "noise", "harmonics": 64, "noise_bands": n},
                                 {"mel/l1": 1.0, "stft/mag": 1.0, "kl": 1e-4}, {"mag_floor": 0.1}) for n in (16, 32, 64, 128)},
    # the default (harm+mag0.1+bands64) plus the multi-resolution STFT loss (spectral convergence + log-magnitude)
    "harm+mag0.1+bands64+mr": ({"arch": "harmonic", "phase": "noise", "harmonics": 64, "noise_bands": 64},
                               {"mel/l1": 1.0, "stft/mag": 1.0, "stft/mr": 1.0, "kl": 1e-4}, {"mag_floor": 0.1}),
    # the default plus the WaveDiscriminator's hinge losses: generator 0.1, feature matching 1.0, discriminator 0.1
    "harm+mag0.1+bands64+adv": ({"arch": "harmonic", "phase": "noise", "harmonics": 64, "noise_bands": 64},
                                {"mel/l1": 1.0, "stft/mag": 1.0, "kl": 1e-4, "adv/gen": 0.1, "adv/feat": 1.0,
                                 "adv/disc": 0.1}, {"mag_floor": 0.1}),
    # harmonic partials + the free-phase STFT branch of `base`, with the floored log-magnitude loss
    "harm+free+mag0.1": ({"arch": "harmonic", "phase": "free", "harmonics": 64, "noise_bands": 0},
                         {"mel/l1": 1.0, "stft/mag": 1.0, "kl": 1e-4}, {"mag_floor": 0.1}),
    # harmonic partials + the free-phase STFT branch of `base`
    "harm+free": ({"arch": "harmonic", "phase": "free", "harmonics": 64, "noise_bands": 0}, {"mel/l1": 1.0, "kl": 1e-4}, {}),
}


def _crepe(wav: torch.Tensor, sr: int) -> np.ndarray:
    return pitch_track(wav, sr, method="crepe")


def _items(ds, stem: str, n: int) -> list[torch.Tensor]:
    out = []
    for i in range(len(ds)):
        it = ds[i]
        if bool(it.get(f"silent_{stem}", False)):
            continue
        out.append(torch.as_tensor(np.asarray(it[STEMS[stem]]), dtype=torch.float32))
        if len(out) >= n:
            break
    return out


def score(vae, refs: dict[str, list[torch.Tensor]], f0s: dict[str, list[np.ndarray]], sr: int) -> dict[str, float]:
    """`duotok.vae.round_trip_metrics` per split/stem (`<split>/<stem>/<metric>`); RPA for vocals."""
    res = {}
    for key, wavs in refs.items():
        m = round_trip_metrics(vae, wavs, sr, pitch=key.endswith("vocals"), ref_f0=f0s.get(key))
        res.update({f"{key}/{k}": v for k, v in m.items() if k != "mel_l1_dac"})
    return res


def spectrogram_png(path: Path, ref: torch.Tensor, est: torch.Tensor, sr: int, title: str) -> None:
    import librosa
    import librosa.display
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, w, t in zip(axes, (ref, est), ("original", title)):
        S = librosa.amplitude_to_db(np.abs(librosa.stft(w.numpy(), n_fft=4096, hop_length=480)), ref=1.0, top_db=80)
        librosa.display.specshow(S, sr=sr, hop_length=480, x_axis="time", y_axis="log", ax=ax, cmap="magma")
        ax.set_ylim(50, 8000)
        ax.set_title(t)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train(name: str, params, train_ds, steps: int, out: Path):
    conf_over, lam_over, loss_kw = OPTIONS[name.split("@")[0]]
    import dataclasses
    vae = build_vae(dataclasses.replace(params.vae, **conf_over), params.audio)
    lambdas = {"mel/l1": 0.0, "stft/mr": 0.0, "wave/l1": 0.0, "kl": 0.0, **lam_over}
    model = VAEObjective(vae, lambdas)
    model.terms.update(loss_kw)                    # e.g. the log-magnitude floor `mag_floor`
    cfg = dataclasses.replace(params.vae.train, steps=steps)
    crops = StemCrops(train_ds, crop=int(round(params.vae.segment_s * params.audio.sample_rate)), seed=cfg.seed)
    loader = make_loader(crops, cfg.batch_size, True, cfg.seed, name="vae train crops")
    t0 = time.time()
    ckpt = out / f"ckpt_{name}"
    import shutil
    from duotok.train import resume_dir
    shutil.rmtree(resume_dir(ckpt), ignore_errors=True)
    res = fit(model, objective_loss, loader, cfg, ckpt, NullTracker(), lambdas, desc=name, progress=False)
    return res.model.vae.eval(), time.time() - t0, res.train_metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--options", nargs="+", default=list(OPTIONS),
                    help="option names; name@N trains N steps instead of --steps")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--n", type=int, default=12, help="segments per split and stem")
    ap.add_argument("--root", default="outputs/preprocess")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="outputs/vae_options")
    ap.add_argument("--vae-dir", default=None,
                    help="score the VAE a stage wrote there (e.g. outputs/vae) as row `stage:<dir>` instead of training")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="pesq_wb undefined")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = load_params(args.params)
    sr = params.audio.sample_rate
    train_ds = _load_split(args.root, "train")
    refs = {f"{split}/{stem}": _items(_load_split(args.root, split), stem, args.n)
            for split in ("val", "test") for stem in STEMS}
    f0_cache = out / f"f0_n{args.n}.pt"
    if f0_cache.exists():
        f0s = torch.load(f0_cache, weights_only=False)
    else:
        f0s = {k: [_crepe(w, sr) for w in v] for k, v in refs.items() if k.endswith("vocals")}
        torch.save(f0s, f0_cache)
    table_path = out / "table.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    for name in ([f"stage:{args.vae_dir}"] if args.vae_dir else args.options):
        torch.manual_seed(0)
        steps = int(name.split("@")[1]) if "@" in name else args.steps
        if args.vae_dir:
            from duotok.vae import load_vae
            vae = load_vae(args.vae_dir)
            run = Path(args.vae_dir).parent / ".runs" / "vae.json"       # the stage's run record (durations live there)
            secs = json.loads(run.read_text()).get("timings", {}).get("train_s", float("nan")) if run.exists() else float("nan")
            steps = params.vae.train.steps
        else:
            vae, secs, tm = train(name, params, train_ds, steps, out)
        decode = (lambda x, v=vae: v.decode(v.encode(x)))
        t0 = time.time()
        row = {"train_s": round(secs, 1), "steps": steps, **score(vae, refs, f0s, sr)}
        row["eval_s"] = round(time.time() - t0, 1)
        table[name] = row
        ref = refs["test/vocals"][0]
        with torch.no_grad():
            spectrogram_png(out / f"{name.replace('/', '_').replace(':', '_')}_spec.png", ref,
                            decode(ref[None])[0, : ref.shape[-1]], sr, name)
        table_path.write_text(json.dumps(table, indent=1))
        print(name, json.dumps(row), flush=True)
    cols = ["train_s", "val/vocals/rpa", "test/vocals/rpa", "val/vocals/mel_l1", "val/acc/mel_l1", "test/vocals/pesq",
            "test/vocals/stoi", "test/acc/pesq", "test/acc/stoi", "test/vocals/si_sdr"]
    print("| option | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row.get(c, float('nan')):.3g}" for c in cols) + " |")


if __name__ == "__main__":
    main()
