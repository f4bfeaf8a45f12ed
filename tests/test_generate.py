"""The product around the tokenizer on a toy package: mixes in (encode --mix with the package's separator, an external
separator hook, corpus validate), duotok lm train = the LMs evaluate trains (same PPL@1024), duotok generate writes
three 48 kHz files, the generate stage's conditioning metric."""
import json
import math
import sys

import numpy as np
import pytest
import soundfile as sf

from _helpers import ROOT
from _toy_package import full_toy_package, write_song
from duotok import lm as L
from duotok.cli import main
from duotok.config import load_params
from duotok.tokenizer import DualTokens, DuoTok
from duotok.tracking import NullTracker

pytestmark = pytest.mark.timeout(900)
LM_SMALL = ["evaluate.lm.layers=1", "evaluate.lm.hidden=32", "evaluate.lm.ffn=64", "evaluate.lm.heads=2",
            "evaluate.lm.kv_heads=1"]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    return d, full_toy_package(d)


def _set(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_encode_mix_builtin_and_external_separator(pkg, tmp_path, capsys):
    d, p = pkg
    song = write_song(tmp_path / "song", 2.0, 3, roles=("mixture",))
    assert main(["encode", "--model", str(p), "--mix", str(song / "mixture.wav"), "-o", str(tmp_path / "m.npz"), "-q"]) == 0
    assert "mix separated by builtin" in capsys.readouterr().err
    tok = DuoTok.from_pretrained(p)
    x, sr = sf.read(song / "mixture.wav", dtype="float32")
    v, a, sr2 = tok.separator(x, sr)
    assert np.array_equal(DualTokens.load(tmp_path / "m.npz").vocals, tok.encode(v, a, sr2).vocals)
    (tmp_path / "sep.py").write_text("def split(mix, sr):\n    return mix, 0.5 * mix, sr\n")
    assert main(["encode", "--model", str(p), "--song", str(song), "--separator", f"{tmp_path}/sep.py:split",
                 "-o", str(tmp_path / "out"), "-q"]) == 0
    assert np.array_equal(DualTokens.load(tmp_path / "out/song.npz").accompaniment, tok.encode(x, 0.5 * x, sr).accompaniment)
    assert main(["encode", "--model", str(p), "--mix", str(tmp_path / "nope.wav"), "-o", str(tmp_path / "n.npz")]) == 2
    assert "nope.wav" in capsys.readouterr().err and not (tmp_path / "n.npz").exists()


def test_corpus_validate_accepts_mixtures_with_a_separator(pkg, tmp_path, capsys):
    d, p = pkg
    write_song(tmp_path / "songs" / "live", 1.0, 1, roles=("mixture",))
    write_song(tmp_path / "songs" / "ok", 1.0, 2)
    assert main(["corpus", "validate", str(tmp_path / "songs")]) == 1
    assert "2 song folders, 1 usable, 1 rejected" in capsys.readouterr().out
    assert main(["corpus", "validate", str(tmp_path / "songs"), "--model", str(p)]) == 0
    out = capsys.readouterr().out
    assert "2 song folders, 2 usable, 0 rejected" in out and "[warning] live:" in out and "separator builtin" in out


def test_lm_train_reaches_the_ppl_evaluate_reports(tmp_path):
    from duotok.stages import evaluate as E
    from duotok.synthetic import EchoTokenizer, audio_items
    from duotok.tokenizer import Decoded

    class Tok(EchoTokenizer):                    # the echo stand-in, decoding the generated example as silence
        def decode(self, toks):
            if toks.model_id != "generated": return super().decode(toks)
            z = np.zeros(toks.n_tokens * 1920, np.float32)
            return Decoded(z, z, z, 48000)
    v, a = L.synthetic_streams(96, 24, 32, seed=0)
    pre = tmp_path / "pre"
    DualTokens(v[:80], a[:80], 25, (32, 32), "toy", [f"s{i}" for i in range(80)]).save(pre / "tokens_train.npz")
    DualTokens(v[80:], a[80:], 25, (32, 32), "toy", [f"t{i}" for i in range(16)]).save(pre / "tokens_test.npz")
    over = LM_SMALL + ["evaluate.lm_train.steps=30", "evaluate.lm_train.lr=0.003", "evaluate.lm_train.batch_size=16",
                       "evaluate.prompt_s=0.25", "evaluate.pitch_segments=0", "evaluate.asr_segments=0"]
    ev = E.run(load_params(ROOT / "params.yaml", over), NullTracker(), pre, out_dir=tmp_path / "ev", eval_dir=tmp_path / "eval",
               tokenizer=Tok(), test_items=audio_items(1))
    assert main(["lm", "train", str(pre / "tokens_train.npz"), "--val", str(pre / "tokens_test.npz"), "-o", str(tmp_path / "lm"),
                 "--params", str(ROOT / "params.yaml"), "--no-track", "-q", *_set(over)]) == 0
    got = json.loads((tmp_path / "lm/metrics.json").read_text())
    assert got["dual"]["overall/ppl_1024"] == pytest.approx(ev["lm/dual/overall/ppl_1024"], rel=1e-6)
    assert got["v2a"]["acc/ppl_1024"] == pytest.approx(ev["lm/v2a/acc/ppl_1024"], rel=1e-6)
    back, cfg = L.load_lm(tmp_path / "lm", "v2a")
    saved, _ = L.load_lm(tmp_path / "ev/lm", "v2a")                        # evaluate's saved LM: the same weights
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(back.state_dict().values(), saved.state_dict().values()))
    assert cfg["context"] == 1024 and cfg["prompt"] == 6


@pytest.fixture(scope="module")
def lmdir(pkg, tmp_path_factory):
    d, p = pkg
    t = tmp_path_factory.mktemp("lmdata")
    for i in range(4): write_song(t / "songs" / f"s{i}", 2.0 + i, i)
    assert main(["tokenize", str(t / "songs"), "-o", str(t / "ds"), "--model", str(p), "-q"]) == 0
    assert main(["lm", "train", str(t / "ds"), "-o", str(t / "lm"), "--params", str(ROOT / "params.yaml"), "--no-track", "-q",
                 *_set(LM_SMALL + ["evaluate.lm_train.steps=4", "evaluate.lm.context=120", "evaluate.lm.max_len=244"])]) == 0
    return t


def test_lm_train_refuses_a_state_of_another_configuration(lmdir, tmp_path, capsys):
    "An interrupted run's state made with other params is refused (exit 2, the key, --restart); --restart trains anew."
    out = tmp_path / "lm"
    folder = out / ".resume" / "dual"
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "step.json").write_text(json.dumps({"step": 2}))
    (folder / "config.json").write_text(json.dumps({"params": {"evaluate": {"lm_train": {"lr": 123.0}}}, "code": {}}))
    argv = ["lm", "train", str(lmdir / "ds"), "-o", str(out), "--params", str(ROOT / "params.yaml"), "--no-track", "-q",
            *_set(LM_SMALL + ["evaluate.lm_train.steps=2", "evaluate.lm.context=120", "evaluate.lm.max_len=244"])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    head = next(i for i, line in enumerate(err) if line.startswith("duotok lm: error: "))
    assert str(folder) in err[head] and "another configuration" in err[head], err
    assert any("evaluate.lm_train.lr: 123.0 -> " in line for line in err[head:]) and "--restart" in err[-1], err
    assert (folder / "state" / "step.json").exists() and not (out / "dual.safetensors").exists()
    assert main(argv + ["--restart"]) == 0
    assert (out / "dual.safetensors").exists() and not (out / ".resume").exists()


def test_generate_writes_three_48k_files(pkg, lmdir, tmp_path, capsys):
    d, p = pkg
    voc = lmdir / "songs" / "s1" / "vocals.wav"                                   # 3 s at 24 kHz
    argv = ["generate", "--vocals", str(voc), "--model", str(p), "--lm", str(lmdir / "lm"), "--top-p", "0.9", "--seed", "3", "-q"]
    assert main(argv + ["-o", str(tmp_path / "g")]) == 0
    files = {k: sf.info(str(tmp_path / "g" / f"{k}.wav")) for k in ("vocals", "accompaniment", "mix")}
    assert {k: (i.samplerate, i.frames) for k, i in files.items()} == {k: (48000, 3 * 48000) for k in files}
    t = DualTokens.load(tmp_path / "g/tokens.npz")
    assert t.n_tokens == 75
    assert main(argv + ["-o", str(tmp_path / "g2")]) == 0
    assert np.array_equal(DualTokens.load(tmp_path / "g2/tokens.npz").accompaniment, t.accompaniment)   # seeded
    assert main(["generate", "--vocals", str(voc), "--model", str(p), "--lm", str(tmp_path / "nolm"), "-o", str(tmp_path / "g3")]) == 2
    assert "no 'v2a' token LM" in capsys.readouterr().err and not (tmp_path / "g3").exists()


def test_generate_stage_on_the_toy(pkg, lmdir, tmp_path):
    from duotok.stages.generate import run
    from duotok.tokenize import folder_source
    d, p = pkg
    params = load_params(ROOT / "params.yaml", [f"generate.package={p}", f"generate.lm={lmdir / 'lm'}", "generate.max_s=2.0",
                                                "generate.n_examples=1", "generate.sampling_steps=2", "generate.bootstrap=100"])
    m = run(params, NullTracker(), out_dir=tmp_path / "out",
            songs=[folder_source(lmdir / "songs" / f"s{i}", lmdir / "songs") for i in range(3)])
    assert m["gen/n_songs"] == 3 and all(math.isfinite(v) for v in m.values())
    assert {"gen/local/own", "gen/local/other", "gen/local/uncond", "gen/key/own_minus_other/lo"} <= set(m)
    assert sf.info(str(tmp_path / "out/examples/s0/mix.wav")).samplerate == 48000
