"""The pretrained package and the demo (duotok.demo, `make pretrained`, `make demo` / `duotok demo`) on a toy package of
random weights: one toy project is packaged once (module fixture) and shared by the asserts."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from _toy_package import full_toy_package, tree, write_song


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    "A folder laid out like the repository after `make repro`: package, one test song, song index, metrics, dvc.lock."
    d = tmp_path_factory.mktemp("demo")
    pkg = full_toy_package(d)
    p = d / "proj"
    shutil.copytree(pkg, p / "outputs/decoder/package")
    write_song(p / "outputs/render/songs/song-b", 3.0, seed=2, sr=44100)
    write_song(p / "outputs/render/songs/song-a", 3.0, seed=1, sr=44100)
    (p / "outputs/preprocess").mkdir(parents=True)
    (p / "outputs/preprocess/manifest.json").write_text(json.dumps({"splits": {"test": {"songs": ["song-b", "song-a"]}}}))
    (p / "outputs/preprocess/metrics.json").write_text(json.dumps({"songs": 2, "hours": 0.01, "languages/en": 2}))
    (p / "outputs/.runs").mkdir()                         # durations: the run record, not the stage's metrics.json
    (p / "outputs/.runs/vae.json").write_text(json.dumps({"stage": "vae", "timings": {"train_s": 12.5, "wall_s": 20.0}}))
    (p / "eval").mkdir()
    (p / "eval/metrics.json").write_text(json.dumps({"kbps": 0.2, "recon/vocals/rpa": 0.07, "pitch/vae/rpa": 0.7}))
    (p / "dvc.lock").write_text("schema: '2.0'\nstages:\n  vae:\n    params:\n      params.yaml:\n        vae.train:\n"
                                "          steps: 7\n          batch_size: 2\n          lr: 0.01\n"
                                "    outs:\n    - path: outputs/vae\n      md5: feed.dir\n")
    return p


@pytest.fixture(scope="module")
def pretrained(proj, tmp_path_factory):
    "`python -m duotok.demo pretrained` run in the toy project (as `make pretrained` does), into pretrained/default."
    import os
    from duotok.demo import main
    cwd = os.getcwd()
    os.chdir(proj)
    try: assert main(["pretrained", "--example-s", "2"]) == 0
    finally: os.chdir(cwd)
    return proj / "pretrained/default"


def test_pretrained_folder(pretrained, proj):
    from duotok import DuoTok
    from duotok.demo import make_pretrained
    files = tree(pretrained)
    assert {"tokenizer.json", "MODEL_CARD.md", "encoder/model.json", "decoder/denoiser.json", "separator/model.json",
            "example/song-a/vocals.flac", "example/song-a/accompaniment.flac"} <= set(files)   # first test song, sorted
    assert sf.info(pretrained / "example/song-a/vocals.flac").duration == pytest.approx(2.0, abs=1e-3)
    card = files["MODEL_CARD.md"].decode()
    assert "| vae | 7 | 2 | 0.01 | 12 | 20 | `feed.dir` |" in card                # budget from dvc.lock + the run record
    assert "| decoder | " in card and "| n/a | n/a | `n/a` |" in card              # no run record, no lock entry: n/a
    assert "raw pitch accuracy of decoded vocals 0.07 while the VAE alone keeps 0.70" in card
    assert (pretrained.parent / "default.md").read_bytes() == files["MODEL_CARD.md"]
    assert DuoTok.from_pretrained(pretrained).codebook_sizes == DuoTok.from_pretrained(
        proj / "outputs/decoder/package").codebook_sizes                           # the card does not disturb loading
    make_pretrained(pretrained, root=proj, example_s=2.0)                         # idempotent: the same bytes again
    assert tree(pretrained) == files
    assert not list(pretrained.parent.glob(".*tmp"))


def test_pretrained_refuses_incomplete(proj, tmp_path):
    from duotok.demo import make_pretrained
    with pytest.raises(FileNotFoundError, match="not a complete package"):
        make_pretrained(tmp_path / "x", package="outputs/nothing", root=proj)
    with pytest.raises(FileNotFoundError, match="no test song"):
        make_pretrained(tmp_path / "x", root=proj, manifest="outputs/none.json")
    assert not (tmp_path / "x").exists()


def test_demo_cli(pretrained, tmp_path, capsys):
    from duotok.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(pretrained), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out.split()
    names = ["tokens.npz", "spectrograms.png"] + [f"{w}_{k}.wav" for w in ("original", "decoded")
                                                  for k in ("vocals", "accompaniment", "mix")]
    assert sorted(Path(p).name for p in printed) == sorted(names)                 # it prints what it wrote
    sr = json.loads((pretrained / "tokenizer.json").read_text())["sample_rate"]
    for k in ("vocals", "accompaniment", "mix"):
        o, d = sf.info(out / f"original_{k}.wav"), sf.info(out / f"decoded_{k}.wav")
        assert (o.samplerate, d.samplerate, o.channels, d.channels) == (sr, sr, 1, 1)
        assert o.frames == d.frames and o.duration == pytest.approx(2.0, abs=0.05)
    v = sf.read(out / "original_vocals.wav")[0]; a = sf.read(out / "original_accompaniment.wav")[0]
    np.testing.assert_allclose(sf.read(out / "original_mix.wav")[0], v + a, atol=1e-6)   # float WAV: not clipped
    import matplotlib.image
    assert matplotlib.image.imread(out / "spectrograms.png").shape[:2] > (300, 600)
