"""Render: exact-sum stems, pass-through of audio songs (MUSDB-shaped), sung recipe with F0 check and
lyric timing against the vocal's onsets, caching, rejection of bad songs; render-time variety (every
parameter in the cache key, held-out pools only for the shift split), accompaniment-only songs."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from _helpers import PARAMS, ROOT
from duotok.config import ConfigError, load_params
from duotok.corpus import STEMS, Part, read_song, write_midi
from duotok.render import (SR, RenderSettings, draw_variation, f0_check, lyric_timing, midi_notes, render_corpus,
                           render_song, song_hash, write_stems)


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
                recipe=dict(kind="pop", voice="en-us+f3", voice_gender="female", vocal_gain_db=0.0, duration_s=6 * spb, tempo_bpm=tempo))
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
    assert "f0_pass_rate" not in m and all(math.isfinite(v) for v in m.values() if isinstance(v, float))  # no recipe: no rate, no NaN
    rej = json.loads((out / "rejected.json").read_text())
    assert "6 channels" in rej["train__bad"][0]
    for sid in ("train__A", "test__B"):
        for k in list(STEMS) + ["mix"]:
            i = sf.info(out / "songs" / sid / f"{k}.flac")
            assert i.samplerate == SR and i.channels == 1 and abs(i.frames - 3 * SR) <= 1
    idx = json.loads((out / "index.json").read_text())
    assert {s["id"]: s["split"] for s in idx["songs"]} == {"test__B": "test", "train__A": "train"}
    first = {f: (out / f).read_bytes() for f in ("index.json", "songs/train__A/render.json", "songs/test__B/render.json")}
    import shutil; shutil.rmtree(out)                                           # as DVC does before a run
    old = tmp_path / ".render_cache/songs/train__A/render.json"                # a cached record of an older version,
    old.write_text(json.dumps({**json.loads(old.read_text()), "render_s": 1.5}))   # with its render time
    m2 = render_corpus(root, out, workers=1, log=lambda *_: None)               # nothing changed
    assert m2["rendered"] == 0 and m2["cached"] == 2 and (out / "songs" / "train__A" / "mix.flac").exists()
    assert {f: (out / f).read_bytes() for f in first} == first                 # no run metadata: the same bytes
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


VARIETY = PARAMS.render.variety
CHANGES = dict(soundfonts=("/usr/share/sounds/sf2/TimGM6mb.sf2",), voices={"female": ("f1",), "male": ("m7",)},
               dialects={"en": ("en-029",)}, tempo_factor=(1.2, 1.25), transpose=0, mix_dbfs=(-40.0, -39.0), stem_gain_db=9.0,
               effects_p=0.0, eq_db=0.5, compress_ratio=(8.0, 9.0), reverb=(90.0, 95.0), lowpass_hz=(2000.0, 2500.0))


def test_every_variety_parameter_is_in_the_cache_key(tmp_path):
    "Changing any `render.variety` value (or the seed) changes the drawn variation of some song, hence its hash."
    songs = []
    for k in range(6):
        song, _ = read_song(make_recipe(tmp_path / f"r{k}"), tmp_path)
        songs.append(song)
    base = dataclasses.replace(VARIETY, effects_p=1.0, transpose=2)
    key = lambda v, seed=0: [song_hash(s, RenderSettings(draw_variation(s, v, seed, "train"))) for s in songs]
    ref = key(base)
    assert len(set(ref)) == len(songs) and key(base) == ref                            # per song, deterministic
    assert set(CHANGES) == {f.name for f in dataclasses.fields(VARIETY)}               # a case for every parameter
    for name, value in CHANGES.items():
        changed = key(dataclasses.replace(base, **{name: value}))
        assert any(a != b for a, b in zip(ref, changed)), f"render.variety.{name} is not in the cache key"
    assert key(base, seed=1) != ref
    plain = [song_hash(s, RenderSettings()) for s in songs]
    assert not set(plain) & set(ref)


def test_heldout_pools_only_for_shift_songs(tmp_path):
    "Validation keeps the pools disjoint; the pool a song draws from is chosen by its split, never by chance."
    with pytest.raises(ConfigError, match="held out"):
        load_params(ROOT / "params.yaml", [f"render.shift.variety.soundfonts=[{VARIETY.soundfonts[0]}]"])
    with pytest.raises(ConfigError, match="voices.female must be held out"):
        load_params(ROOT / "params.yaml", [f"render.shift.variety.voices.female=[{VARIETY.voices['female'][0]}]"])
    root = tmp_path / "songs"
    for k in range(4): make_recipe(root / f"song{k}")
    meta = json.loads((root / "song3" / "song.json").read_text()); meta["split"] = "shift"      # a song of the user's
    (root / "song3" / "song.json").write_text(json.dumps(meta))
    shift = dataclasses.replace(PARAMS.render.shift, recipes=0, music=(), excerpts=0)         # (the built set: test_corpus)
    out = tmp_path / "render"
    m = render_corpus(root, out, workers=2, f0_check_songs=1, variety=VARIETY, shift=shift, log=lambda *_: None)
    idx = {s["id"]: s for s in json.loads((out / "index.json").read_text())["songs"]}
    held = shift.variety
    assert m["songs"] == 3 and m["shift_songs"] == 1 and m["f0_pass_rate"] >= 0.9 and m["shift_f0_pass_rate"] >= 0.9, m
    for sid, r in idx.items():
        v = r["variation"]; variant = v["voice"].split("+")[1]
        if r["split"] == "shift":
            assert v["pool"] == "shift" and v["soundfont"] in held.soundfonts and variant in held.voices["female"]
            assert held.mix_dbfs[0] - 0.1 <= r["mix_dbfs"] <= held.mix_dbfs[1] + 0.1 and v["effects"]["reverb"] >= held.reverb[0]
        else:
            assert v["pool"] == "train" and v["soundfont"] in VARIETY.soundfonts and variant in VARIETY.voices["female"]
            assert v["soundfont"] not in held.soundfonts and VARIETY.mix_dbfs[0] - 0.1 <= r["mix_dbfs"] <= VARIETY.mix_dbfs[1] + 0.1
    # what the variation promises is in the audio: length from the tempo, level from mix_dbfs, notes from the key
    r = idx["song0"]; v = r["variation"]
    assert abs(r["duration_s"] - (3.6 / v["tempo_factor"] + 1.0)) < 1e-3
    lyr = json.loads((out / "songs" / "song0" / "lyrics.json").read_text())
    assert [n[2] for n in lyr["notes"]] == [p + v["transpose"] for p in (67, 69, 71, 72, 71, 67)]
    # a re-run renders nothing; a changed range re-renders exactly the songs whose draw it changes
    assert render_corpus(root, out, workers=1, f0_check_songs=1, variety=VARIETY, shift=shift, log=lambda *_: None)["rendered"] == 0
    v2 = dataclasses.replace(VARIETY, reverb=(41.0, 60.0))
    expect = sum(r["variation"]["effects"] is not None and r["split"] != "shift" for r in idx.values())
    assert 1 <= expect < len(idx)
    assert render_corpus(root, out, workers=2, f0_check_songs=1, variety=v2, shift=shift, log=lambda *_: None)["rendered"] == expect


def test_accompaniment_only_song_renders_and_is_marked(tmp_path):
    d = tmp_path / "songs" / "inst"; d.mkdir(parents=True)
    acc = 0.2 * np.random.default_rng(0).standard_normal((3 * 44100, 2)).astype("float32")
    sf.write(d / "accompaniment.wav", acc, 44100)
    (d / "song.json").write_text(json.dumps(dict(title="x", instrumental=True, split="shift", licence="CC0", tags=["shift"])))
    for k in range(3): make_stems(tmp_path / "songs" / ("full" if k == 0 else f"full{k}"), seed=k)
    out = tmp_path / "render"
    m = render_corpus(tmp_path / "songs", out, workers=1, variety=VARIETY, log=lambda *_: None)
    assert m["songs"] == 3 and m["shift_songs"] == 1 and m["rejected"] == 0
    idx = {s["id"]: s for s in json.loads((out / "index.json").read_text())["songs"]}
    r = idx["inst"]
    assert r["instrumental"] and not r["acc_separated"] and r["split"] == "shift" and r["licence"] == "CC0"
    assert not idx["full"]["instrumental"] and idx["full"]["acc_separated"]
    x = {k: sf.read(out / "songs" / "inst" / f"{k}.flac", dtype="float64")[0] for k in list(STEMS) + ["mix"]}
    assert np.abs(x["vocals"]).max() == 0 == np.abs(x["drums"]).max() == np.abs(x["bass"]).max()
    assert np.array_equal(x["mix"], x["other"]) and np.std(x["other"]) > 0.01 and len(x["mix"]) == 3 * SR
    assert json.loads((out / "songs" / "inst" / "lyrics.json").read_text())["chars"] == []
    # without a shift config the song is rendered with the train pool (no held-out pool to draw from)
    assert r["variation"]["pool"] == "train"
    # preprocess keeps it in its own split, every segment labelled silent vocals
    from duotok.data import SegmentDataset
    from duotok.preprocess import preprocess_corpus
    preprocess_corpus(out, tmp_path / "pre", workers=1, log=lambda *_: None)
    ds = SegmentDataset(tmp_path / "pre", "shift", fields=["silent_vocals", "silent_acc", "song"])
    assert len(ds) >= 1 and all(ds[i]["song"] == "inst" and ds[i]["silent_vocals"] and not ds[i]["silent_acc"] for i in range(len(ds)))
