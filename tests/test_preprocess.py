"""Preprocess (the song index) + the grid dataset: contract fields/shapes, no copy of the audio, song-level split
without leakage, silence handling, rejections (listed, counted, optionally fatal), MUSDB-shaped corpus end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from duotok.audio import LOG_MEL_EPS, log_mel
from duotok.corpus import STEMS, UNK_ID, VOCAB, char_ids
from duotok.data import FIELDS, SegmentDataset, collate
from duotok.preprocess import PreprocessError, SegmentSpec, assign_splits, preprocess_corpus
from duotok.render import render_corpus

SPEC = SegmentSpec(segment_s=2.0, hop_s=2.0)       # toy segments: 200 frames, 50 tokens
Q = lambda *_: None


def make_stems(d: Path, secs=4.5, sr=44100, silent=(), seed=0, meta=None):
    d.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(seed)
    t = np.arange(int(secs * sr)) / sr
    for k, s in enumerate(STEMS):
        x = 0.0 * t if s in silent else 0.2 * np.sin(2 * np.pi * 110 * (k + 1) * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(d / f"{s}.wav", np.stack([x, x], 1).astype("float32"), sr, subtype="FLOAT")
    if meta: (d / "song.json").write_text(json.dumps(meta, ensure_ascii=False))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("c"); songs = root / "musdb"
    for i in range(6): make_stems(songs / "train" / f"song{i}", seed=i)
    make_stems(songs / "test" / "t0", seed=9, silent=("vocals",))          # instrumental
    make_stems(songs / "train" / "tiny", secs=0.6)                          # shorter than half a segment
    make_stems(songs / "train" / "broken"); sf.write(songs / "train" / "broken" / "bass.wav", np.zeros(10, "float32"), 8000)
    lyr = [dict(text="При", start=0.1, end=0.5, word=0), dict(text="вет", start=0.5, end=0.9, word=0),
           dict(text="桜", start=2.2, end=2.8, word=1)]
    make_stems(songs / "train" / "lyr", seed=3, meta=dict(language="ru", lyrics=lyr, split="train"))
    render_corpus(songs, root / "render", workers=1, log=Q)
    return root


def test_contract_fields_and_shapes(corpus):
    out = corpus / "pre"
    summ = preprocess_corpus(corpus / "render", out, SPEC, workers=2, log=Q)
    man = json.loads((out / "manifest.json").read_text())
    assert man["vocab"] == list(VOCAB) and len(man["mel_mean"]) == 128 and len(man["mel_std"]) == 128
    assert summ["songs"] == 8 and summ["rejected"] == 2
    rej = json.loads((out / "rejected.json").read_text())
    assert "length mismatch" in rej["train__broken"][0] and "shorter than half a segment" in rej["train__tiny"][0]
    assert set(summ["hours_per_stem"]) == set(STEMS) and summ["languages"]["ru"] == 1
    assert man["version"] == 2 and set(man["songs"]) == set(man["song_split"]) and summ["bytes"] < 100_000
    assert not [p for p in out.rglob("*") if p.suffix in (".npy", ".flac", ".wav")]          # no copy of the audio
    rec = man["songs"]["train__lyr"]
    assert (out / rec["stems"]["vocals"]).resolve() == (corpus / "render" / "songs" / "train__lyr" / "vocals.flac").resolve()
    assert rec["sample_rate"] == 48000 and abs(rec["duration_s"] - 4.5) < 0.06 and len(rec["grid"]) == 2
    ds = SegmentDataset(out, "train")
    it = ds[0]
    F, T, L24, L48 = 200, 50, 48000, 96000
    shapes = {"mel_mix": (128, F), "mel_vocals": (128, F), "mel_acc": (128, F), "chroma_mix": (12, F),
              "chroma_vocals": (12, F), "chroma_acc": (12, F), "wav24_mix": (L24,), "wav24_stems": (4, L24),
              "wav48_vocals": (L48,), "wav48_acc": (L48,), "lyric_len": (), "lyric_frames": (T,),
              "silent_vocals": (), "silent_acc": ()}
    assert set(it) == set(FIELDS)
    for k, shp in shapes.items(): assert tuple(it[k].shape) == shp, k
    assert it["mel_mix"].dtype == torch.float32 and it["lyric_ids"].dtype == torch.int64 and it["silent_acc"].dtype == torch.bool
    assert it["lyric_ids"].shape == (int(it["lyric_len"]),)                  # its own length; `collate` pads a batch
    assert torch.allclose(it["wav24_mix"], it["wav24_stems"].sum(0), atol=1e-6)
    ref = log_mel(it["wav24_mix"], 24000)[:, :F]
    assert torch.allclose(ref, it["mel_mix"], atol=1e-4) and it["mel_mix"].min() >= np.log(LOG_MEL_EPS) - 1e-6
    assert 0 <= it["chroma_acc"].min() and it["chroma_acc"].max() <= 1 + 1e-6
    b = collate([ds[i] for i in range(3)])
    assert b["mel_acc"].shape == (3, 128, F) and b["lyric_len"].shape == (3,) and len(b["song"]) == 3
    sub = SegmentDataset(out, "train", fields=("mel_mix", "song"))
    assert set(sub[1]) == {"mel_mix", "song"}
    with pytest.raises(KeyError): SegmentDataset(out, "train", fields=("nope",))


def test_split_is_song_level(corpus):
    out = corpus / "pre"
    if not (out / "manifest.json").exists(): preprocess_corpus(corpus / "render", out, SPEC, workers=1, log=Q)
    seen = {}
    for split in ("train", "val", "test"):
        ds = SegmentDataset(out, split, fields=("song",))
        songs = {ds[i]["song"] for i in range(len(ds))}
        for s in songs: assert s not in seen, f"{s} in {seen[s]} and {split}"
        seen.update({s: split for s in songs})
    assert seen["test__t0"] == "test" and seen["train__lyr"] == "train"                   # given splits respected
    assert "val" in seen.values()                                                          # carved from MUSDB train
    assert assign_splits({f"s{i}": None for i in range(50)}, 0.2, 0.2, seed=1) == \
        assign_splits({f"s{i}": None for i in range(50)}, 0.2, 0.2, seed=1)


def test_lyrics_and_silence_labels(corpus):
    out = corpus / "pre"
    if not (out / "manifest.json").exists(): preprocess_corpus(corpus / "render", out, SPEC, workers=1, log=Q)
    ds = SegmentDataset(out, "train")
    items = [ds[i] for i in range(len(ds)) if ds[i]["song"] == "train__lyr"]
    first, second = items[0], items[1]
    assert first["lyric_ids"][: first["lyric_len"]].tolist() == char_ids("привет")
    assert (first["lyric_frames"][3:12] > 0).all() and first["lyric_frames"][30:].eq(0).all()
    assert second["lyric_ids"][: second["lyric_len"]].tolist() == [UNK_ID]                 # CJK -> explicit <unk>
    test = SegmentDataset(out, "test")
    assert all(test[i]["silent_vocals"] and not test[i]["silent_acc"] for i in range(len(test)))
    assert all(not ds[i]["silent_vocals"] for i in range(len(ds)))


def test_drop_silent_and_fatal(corpus, tmp_path):
    spec = SegmentSpec(segment_s=2.0, hop_s=2.0, silent="drop")
    s = preprocess_corpus(corpus / "render", tmp_path / "drop", spec, workers=1, log=Q)
    rej = json.loads((tmp_path / "drop" / "rejected.json").read_text())
    assert s["songs"] == 7 and s["dropped_silent_segments"] == 2 and "all 2 segments silent" in rej["test__t0"][0]
    man = json.loads((tmp_path / "drop" / "manifest.json").read_text())
    assert "test__t0" not in man["song_split"] and man["splits"]["test"]["songs"]          # test refilled from train
    with pytest.raises(PreprocessError, match="rejected"):
        preprocess_corpus(corpus / "render", tmp_path / "fatal", SPEC, fatal_rejections=True, workers=1, log=Q)


def test_bad_segment_length():
    with pytest.raises(PreprocessError, match="not an integer"): SegmentSpec(segment_s=2.005).check()


def test_nothing_usable_is_a_clear_error(tmp_path):
    songs = tmp_path / "songs"; make_stems(songs / "only", secs=0.5)
    render_corpus(songs, tmp_path / "render", workers=1, log=Q)
    with pytest.raises(PreprocessError, match="no usable song"):
        preprocess_corpus(tmp_path / "render", tmp_path / "pre", SPEC, workers=1, log=Q)
    with pytest.raises(PreprocessError, match="run the render stage"):
        preprocess_corpus(tmp_path / "nowhere", tmp_path / "pre", SPEC, workers=1, log=Q)
