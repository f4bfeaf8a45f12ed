"""Tiny song corpora for the tests: MUSDB-shaped stem folders (`write_song`), rendered and indexed (`index_corpus`)."""
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from duotok.corpus import STEMS


def write_song(d: Path, secs=4.5, sr=44100, silent=(), seed=0, meta=None, vocals=None):
    """Four stems of `secs` s: sines + a little noise (a stem in `silent` is zero); `vocals` (array at `sr`) replaces
    the vocal stem; `meta` is written as song.json."""
    d.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(seed)
    t = np.arange(int(secs * sr)) / sr
    for k, s in enumerate(STEMS):
        x = 0.0 * t if s in silent else 0.2 * np.sin(2 * np.pi * 110 * (k + 1 + seed % 3) * t) + 0.01 * rng.standard_normal(len(t))
        if s == "vocals" and vocals is not None: x = vocals[:len(t)]
        sf.write(d / f"{s}.wav", np.stack([x, x], 1).astype("float32"), sr, subtype="FLOAT")
    if meta: (d / "song.json").write_text(json.dumps(meta, ensure_ascii=False))
    return d


def index_corpus(songs: Path, root: Path, segment_s=2.0, splits: dict | None = None, n_mels: int = 128, **kw) -> Path:
    """Render `songs` into `root/render` and index it into `root/pre` (a `segment_s` grid); returns `root/pre`.
    `splits` {song id: split name} pins splits in render's index (any name, e.g. a held-out `shift` set)."""
    from duotok.preprocess import SegmentSpec, preprocess_corpus
    from duotok.render import render_corpus
    render_corpus(songs, root / "render", workers=1, log=lambda *_: None)
    if splits:
        idx = json.loads((root / "render" / "index.json").read_text())
        for r in idx["songs"]: r["split"] = splits.get(r["id"], r.get("split"))
        (root / "render" / "index.json").write_text(json.dumps(idx))
    preprocess_corpus(root / "render", root / "pre", SegmentSpec(segment_s=segment_s, hop_s=segment_s, n_mels=n_mels), workers=1,
                      log=lambda *_: None, **kw)
    return root / "pre"
