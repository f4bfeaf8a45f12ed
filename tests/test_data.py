"""The data path (duotok.data, duotok.features, duotok.augment): random crops read from the song index are a function
of (seed, epoch, item) whatever the number of loader workers; a grid segment is the crop at its start; crops read
from the file equal the whole song resampled; augmentation levels crops and stays off on the grid; remixing puts
another song's accompaniment under the vocal; only `train` songs are cropped; single-track crops avoid silence; the
features computed in the training step equal the front end; a short `fit` on crops runs with loader workers."""
import dataclasses
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from _corpus import index_corpus, write_song
from _helpers import PARAMS
from duotok.audio import log_mel
from duotok.data import CropDataset, SegmentDataset, SongIndex, TrackCrops, collate, load_splits, make_loader
from duotok.features import FeatureLoader, Featurized, Features

AUG = PARAMS.data.augment


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    root = tmp_path_factory.mktemp("data"); songs = root / "songs"
    for i in range(5): write_song(songs / "train" / f"song{i}", secs=5.0 + i, seed=i)
    write_song(songs / "train" / "inst", secs=6.0, silent=("vocals",), seed=7, meta={"split": "train"})
    write_song(songs / "train" / "held", secs=5.0, seed=8)
    lyr = [dict(text="la", start=0.2, end=0.8, word=0), dict(text="lo", start=2.5, end=3.1, word=1)]
    write_song(songs / "train" / "lyr", secs=5.0, seed=9, meta={"language": "en", "lyrics": lyr, "split": "train"})
    write_song(songs / "test" / "t0", secs=5.0, seed=10)
    return index_corpus(songs, root, splits={"train__held": "shift"})                        # a held-out set


def _epochs(ds, workers, n=2, bs=3):
    dl = make_loader(ds, bs, True, seed=11, num_workers=workers, collate_fn=collate)
    return [[(b["segment"], float(b["wav24_mix"].sum())) for b in dl] for _ in range(n)]


def test_crops_depend_on_seed_epoch_item_not_on_workers(pre):
    ds = CropDataset(pre, "train", ("wav24_mix", "mel_mix", "segment", "song"), crop_s=2.0, seed=3, augment=AUG)
    w0, w2 = _epochs(ds, 0), _epochs(ds, 2)
    assert w0 == w2                                              # 0 or 2 worker processes: the same batches
    assert w0[0] != w0[1]                                        # the next epoch draws new crops (and a new order)
    other = _epochs(CropDataset(pre, "train", ("wav24_mix", "segment"), crop_s=2.0, seed=4, augment=AUG), 0, n=1)
    assert other[0] != w0[0]
    man = SongIndex(pre).manifest
    assert {s for s in ds.songs} == set(man["splits"]["train"]["songs"]) and "train__held" not in ds.songs
    assert man["song_split"]["train__held"] == "shift" and man["splits"]["shift"]["n_segments"] == 3
    dur = {s: man["songs"][s]["duration_s"] for s in ds.songs}
    assert len(ds) == sum(max(1, round(d / 2.0)) for d in dur.values())    # slots in proportion to the duration
    it = ds[0]
    assert ds.deferred == ("mel_mix",) and "mel_mix" not in it and it["wav24_mix"].shape == (48000,)


def test_crop_reads_match_the_whole_song_and_the_grid(pre):
    import soxr
    idx = SongIndex(pre)
    full = sf.read(idx.path("train__song1", "other"), dtype="float32")[0]
    whole = soxr.resample(full, 48000, 24000, quality="VHQ")
    for t0 in (0.0, 1.37, 4.0):
        crop = idx.read("train__song1", ("other",), t0, 2.0, 24000)[0]
        ref = whole[int(round(t0 * 24000)):int(round(t0 * 24000)) + 48000]
        assert np.abs(crop[:len(ref)] - ref).max() < 1e-6 and not crop[len(ref):].any()
    grid = SegmentDataset(pre, "train")
    crops = CropDataset(pre, "train", grid.fields, crop_s=2.0)                # no augmentation
    sid, t0, sv, sa = grid.items[3]
    g, c = grid[3], Features.from_manifest(idx.manifest, grid.fields).item(crops._make(sid, t0, 2.0))
    for k in grid.fields:
        if isinstance(g[k], torch.Tensor): assert torch.allclose(g[k], c[k]) if g[k].is_floating_point() else torch.equal(g[k], c[k]), k
    assert torch.allclose(g["mel_mix"], log_mel(g["wav24_mix"], 24000)[:, :200]) and g["mel_mix"].shape == (128, 200)
    assert g["segment"] == f"{sid}@{t0:.2f}" and (bool(g["silent_vocals"]), bool(g["silent_acc"])) == (sv, sa)


def test_augmentation_levels_train_crops_only_and_remix_swaps_the_accompaniment(pre):
    fields = ("wav24_stems", "wav24_mix", "lyric_ids", "song")
    ds = CropDataset(pre, "train", fields, crop_s=2.0, seed=0, augment=AUG)
    lv = [10 * math.log10(float(ds[k]["wav24_mix"].pow(2).mean()) + 1e-20) for k in range(len(ds))]
    assert AUG.level_db[0] - 0.01 <= min(lv) and max(lv) <= AUG.level_db[1] + 0.01 and max(lv) - min(lv) > 5
    plain = CropDataset(pre, "train", fields, crop_s=2.0, seed=0)
    k = next(k for k in range(len(plain)) if plain.locate(k)[0].startswith("train__song"))   # a song with a vocal
    sid, t0, _ = plain.locate(k)
    ref = torch.from_numpy(plain.index.read(sid, ("vocals", "drums", "bass", "other"), t0, 2.0, 24000))
    assert torch.equal(plain[k]["wav24_stems"], ref)                        # no augmentation: the recorded stems
    rem = CropDataset(pre, "train", fields, crop_s=2.0, seed=0, remix=True,
                      augment=dataclasses.replace(AUG, enabled=True, level_db=(-20.0, -20.0), stem_gain_db=0.0, remix_p=1.0))
    it, own = rem[k], rem.index.read(sid, ("vocals", "drums", "bass", "other"), t0, 2.0, 24000)
    g = float(it["wav24_stems"][0].norm() / torch.from_numpy(own[0]).norm())          # the level gain
    assert torch.allclose(it["wav24_stems"][0], g * torch.from_numpy(own[0]), atol=1e-5)  # this song's vocal ...
    assert not torch.allclose(it["wav24_stems"][1:], g * torch.from_numpy(own[1:]), atol=1e-3)   # ... another's accompaniment
    assert it["song"] == sid and torch.allclose(it["wav24_mix"], it["wav24_stems"].sum(0), atol=1e-5)
    val = load_splits(fields, pre, splits=("train", "val"), crop_s=2.0, augment=AUG)
    assert isinstance(val["val"], SegmentDataset) and isinstance(val["train_grid"], SegmentDataset)


def test_lyrics_of_a_crop_and_padded_batches(pre):
    ds = CropDataset(pre, "train", ("lyric_ids", "lyric_len", "lyric_frames", "segment"), crop_s=2.0)
    it = ds._make("train__lyr", 0.0, 2.0)
    assert it["lyric_len"] == 2 and it["lyric_frames"][5:20].gt(0).all() and it["lyric_frames"][25:].eq(0).all()
    late = ds._make("train__lyr", 2.0, 2.0)
    assert late["lyric_len"] == 2 and late["lyric_frames"][:12].eq(0).all() and late["lyric_frames"][13:27].gt(0).all()
    b = collate([it, ds._make("train__song0", 0.0, 2.0)])
    assert b["lyric_ids"].shape == (2, 2) and b["lyric_ids"][1].eq(0).all() and b["lyric_len"].tolist() == [2, 0]


def test_single_track_crops_skip_silent_tracks(pre):
    tc = TrackCrops(pre, "train", 0.5, seed=0, augment=AUG)
    voc, acc = tc.parts
    assert "train__inst" not in voc.songs and "train__inst" in acc.songs and voc.fields == ("wav48_vocals",)
    x = next(iter(make_loader(tc, 4, True, seed=0)))
    assert x.shape == (4, 24000) and torch.isfinite(x).all()
    lv = [10 * math.log10(float(tc[k].pow(2).mean()) + 1e-20) for k in range(0, len(tc), 7)]
    assert min(lv) >= AUG.level_db[0] - 0.01 and max(lv) <= AUG.level_db[1] + 0.01


def test_features_in_the_training_step_and_a_short_fit_with_workers(pre, tmp_path):
    from duotok.distributed import objective_loss
    from duotok.tracking import NullTracker
    from duotok.train import fit
    data = load_splits(["mel_mix", "chroma_mix"], pre, crop_s=2.0, seed=0, augment=AUG)
    feats = data["features"]
    raw = next(iter(make_loader(data["train"], 2, True, collate_fn=collate)))
    b = feats(raw)
    assert torch.allclose(b["mel_mix"], log_mel(raw["wav24_mix"], 24000)[..., :200], atol=1e-5) and b["chroma_mix"].shape == (2, 12, 200)

    class Obj(torch.nn.Module):
        def __init__(self):
            super().__init__(); torch.manual_seed(0); self.lin = torch.nn.Linear(128, 12)
        def forward(self, batch):
            y = self.lin(batch["mel_mix"].transpose(1, 2)).transpose(1, 2)
            return {"l1": (y.sigmoid() - batch["chroma_mix"]).abs().mean()}

    cfg = dataclasses.replace(PARAMS.ssl.train, steps=6, batch_size=2, val_every=3, ckpt_every=0,
                              log_every=3, warmup_steps=1, num_workers=2)
    curves = []
    for run in range(2):
        seen = []
        res = fit(Featurized(Obj(), feats), objective_loss, make_loader(data["train"], 2, True, 0, 2, collate, "toy"), cfg,
                  tmp_path / f"fit{run}", NullTracker(), {"l1": 1.0},
                  val_loader=FeatureLoader(make_loader(data["val"], 2, False, collate_fn=collate), feats),
                  val_fn=lambda m, loader: {"n": float(sum(len(x["mel_mix"]) for x in loader))}, progress=False)
        curves.append(res.train_metrics["l1"])
        assert res.step == 6 and res.val_metrics["n"] == len(data["val"])
    assert curves[0] == curves[1]                                         # seeded crops, workers: a repeatable run

