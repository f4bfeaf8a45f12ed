"""Render: exact-sum stems, pass-through of audio songs (MUSDB-shaped), sung recipe with F0 check and
lyric timing against the vocal's onsets, caching, rejection of bad songs."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from duotok.corpus import STEMS, Part, read_song, write_midi
from duotok.render import (SR, RenderSettings, f0_check, lyric_timing, midi_notes, render_corpus, render_song,
                           write_stems)


def make_stems(d: Path, sr=44100, secs=3.0, channels=2, seed=0):
    d.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(seed)
    for s in STEMS:
        sf.write(d / f"{s}.wav", (0.2 * rng.standard_normal((int(secs * sr), channels))).astype("float32"), sr, subtype="FLOAT")


def make_recipe(d: Path, tempo=100.0):
    "6 notes / syllables over 3.6 s (2 words), simple bass, chords and drums."
    d.mkdir(parents=True, exist_ok=True)
    mel = [(0, 1, 67), (1, 1, 69), (2, 1, 71), (3, 1, 72), (4, 1, 71), (5, 1, 67)]
    texts = [("Sun", 0), ("shine", 0), ("is", 1), ("sing", 2), ("ing", 2), ("now", 3)]
    spb = 60 / tempo
    write_midi(d / "vocals.mid", [Part(0, 0, [(s, du, p, 100) for s, du, p in mel])], tempo, 6)
    write_midi(d / "bass.mid", [Part(33, 1, [(0, 2, 43, 90), (2, 2, 48, 90), (4, 2, 43, 90)])], tempo, 6)
    write_midi(d / "other.mid", [Part(0, 2, [(0, 6, 59, 60), (0, 6, 62, 60)])], tempo, 6)
    write_midi(d / "drums.mid", [Part(0, 9, [(k * 0.5, 0.25, 42, 60) for k in range(12)])], tempo, 6)
    lyr = [dict(text=t, start=round(s * spb, 4), end=round((s + du) * spb, 4), word=w) for (s, du, _), (t, w) in zip(mel, texts)]
    meta = dict(title="test", language="en", lyrics=lyr,
                recipe=dict(kind="pop", voice="en-us+f3", vocal_gain_db=0.0, duration_s=6 * spb, tempo_bpm=tempo))
    (d / "song.json").write_text(json.dumps(meta))
    return d


def test_mix_is_exact_sum(tmp_path):
    rng = np.random.default_rng(1)
    write_stems(tmp_path, {s: rng.normal(0, 0.5, 9600) for s in STEMS})     # loud: scaled to avoid clipping
    x = {k: sf.read(tmp_path / f"{k}.flac", dtype="float64")[0] for k in list(STEMS) + ["mix"]}
    assert np.array_equal(x["mix"], x["vocals"] + x["drums"] + x["bass"] + x["other"])
    assert np.abs(x["mix"]).max() <= 0.8913 and sf.info(tmp_path / "mix.flac").samplerate == SR


def test_musdb_folder_passes_through_and_caches(tmp_path):
    root = tmp_path / "musdb"
    make_stems(root / "train" / "A", sr=44100); make_stems(root / "test" / "B", sr=8000, channels=1)
    make_stems(root / "train" / "bad", sr=44100); sf.write(root / "train" / "bad" / "vocals.wav", np.zeros((100, 6), "float32"), 44100)
    out = tmp_path / "render"
    m = render_corpus(root, out, workers=1, log=lambda *_: None)
    assert m["songs"] == 2 and m["rendered"] == 2 and m["rejected"] == 1
    rej = json.loads((out / "rejected.json").read_text())
    assert "6 channels" in rej["train__bad"][0]
    for sid in ("train__A", "test__B"):
        for k in list(STEMS) + ["mix"]:
            i = sf.info(out / "songs" / sid / f"{k}.flac")
            assert i.samplerate == SR and i.channels == 1 and abs(i.frames - 3 * SR) <= 1
    idx = json.loads((out / "index.json").read_text())
    assert {s["id"]: s["split"] for s in idx["songs"]} == {"test__B": "test", "train__A": "train"}
    import shutil; shutil.rmtree(out)                                           # as DVC does before a run
    m2 = render_corpus(root, out, workers=1, log=lambda *_: None)               # nothing changed
    assert m2["rendered"] == 0 and m2["cached"] == 2 and (out / "songs" / "train__A" / "mix.flac").exists()
    make_stems(root / "train" / "A", sr=44100, seed=5)                          # changed stems -> re-render
    assert render_corpus(root, out, workers=1, log=lambda *_: None)["rendered"] == 1


def test_sung_recipe_pitch_and_timing(tmp_path):
    d = make_recipe(tmp_path / "songs" / "r")
    song, probs = read_song(d, tmp_path / "songs")
    assert song is not None and not probs
    rec = render_song(song, tmp_path / "out", RenderSettings(check_f0=True))
    f0 = rec["f0"]
    assert f0["n_voiced"] >= 5 and f0["n_pass"] / f0["n_voiced"] >= 0.9, f0          # within 50 cents
    voc, sr = sf.read(tmp_path / "out" / "vocals.flac")
    assert sr == SR and len(voc) == pytest.approx((3.6 + 1.0) * SR, abs=2)
    acc = sum(sf.read(tmp_path / "out" / f"{s}.flac")[0] for s in ("drums", "bass", "other"))
    assert np.std(acc) > 1e-3                                                       # FluidSynth made sound
    # lyric timing vs the vocal's onsets: energy rises within 60 ms after each syllable start
    lyr = json.loads((tmp_path / "out" / "lyrics.json").read_text())
    assert lyr["text"] == "sunshine is singing now" and lyr["timed"]
    env = np.sqrt(np.convolve(voc ** 2, np.ones(480) / 480, "same"))             # 10 ms RMS

    def onset_ok(t):
        a = int(t * SR)
        before = env[max(a - int(0.03 * SR), 0):a].max() if a > 0 else 0.0
        after = env[a:a + int(0.06 * SR)].max()
        return after > 0.01 and (after > 1.5 * before or before < 0.3 * env.max())
    starts = [s["start"] for s in lyr["words"]]
    assert all(onset_ok(t) for t in starts), starts
    assert sum(onset_ok(t + 0.15) for t in starts[1:]) <= 1                        # the check can fail
    # silence where nothing is sung
    assert env[int(3.75 * SR):].max() < 0.01 * env.max()


def test_f0_check_detects_wrong_pitch():
    t = np.arange(int(1.0 * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * 466.16 * t)                   # A#4 sung where the score says A4
    c = f0_check(x, SR, [(0.0, 1.0, 69)])
    assert c.n_voiced == 1 and c.n_pass == 0 and 90 < abs(c.errors_cents[0]) < 110
    assert f0_check(x, SR, [(0.0, 1.0, 70)]).n_pass == 1
