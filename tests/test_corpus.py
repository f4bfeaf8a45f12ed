"""Song format, validation (every problem of every song in one pass), vocabulary, recipe generator."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from duotok.corpus import (STEMS, UNK_ID, VOCAB, SongError, build_shift_corpus, char_ids, discover_songs, generate_corpus,
                           ids_to_text, load_stems, main, music_excerpts, normalize_lyrics, read_song, validate_corpus)


def make_song(d: Path, sr=44100, secs=2.0, channels=2, lengths=None, meta=None, subtype="FLOAT", seed=0):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in STEMS:
        n = int((lengths or {}).get(s, secs) * sr)
        sf.write(d / f"{s}.wav", (0.1 * rng.standard_normal((n, channels))).astype("float32"), sr, subtype=subtype)
    if meta is not None: (d / "song.json").write_text(json.dumps(meta, ensure_ascii=False))
    return d


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file(): h.update(p.read_bytes())
    return h.hexdigest()


def messages(rep, sid):
    return " | ".join(rep.rejected.get(sid, []))


def test_musdb_layout_loads_as_is(tmp_path):
    make_song(tmp_path / "train" / "Artist - Title", sr=44100)
    make_song(tmp_path / "test" / "Other Song")
    (tmp_path / "train" / "Artist - Title" / "mixture.wav").write_bytes(b"ignored")
    rep = validate_corpus(tmp_path)
    assert [s.id for s in rep.songs] == ["test__Other_Song", "train__Artist_-_Title"]
    assert [s.split for s in rep.songs] == ["test", "train"] and not rep.errors
    # one train song cannot also give a val split: the only finding is that corpus-wide warning
    assert [(p.song, p.level) for p in rep.problems] == [("", "warning")] and "'val' split" in rep.problems[0].message
    x = load_stems(rep.songs[1], 48000)
    assert all(v.shape == (96000,) and v.dtype == np.float32 for v in x.values())


def test_every_problem_of_every_song_in_one_pass(tmp_path):
    root = tmp_path / "songs"
    make_song(root / "good", meta={"title": "ok", "language": "en", "lyrics": "hello world"})
    # corrupt: random bytes
    make_song(root / "corrupt"); (root / "corrupt" / "drums.wav").write_bytes(b"RIFF\x00\x01garbage" * 10)
    # truncated: header promises more samples than the file holds
    make_song(root / "truncated", subtype="PCM_16")
    b = (root / "truncated" / "bass.wav").read_bytes(); (root / "truncated" / "bass.wav").write_bytes(b[: len(b) // 2])
    # NaN samples
    make_song(root / "nan"); x = np.zeros((4410, 1), "float32"); x[100] = np.nan
    sf.write(root / "nan" / "vocals.wav", x, 44100, subtype="FLOAT")
    # 6 channels
    make_song(root / "six"); sf.write(root / "six" / "other.wav", np.zeros((88200, 6), "float32"), 44100)
    # length mismatch
    make_song(root / "mismatch", lengths={"vocals": 2.0, "drums": 1.0})
    # missing stem + unknown key + empty lyrics, all in one song
    make_song(root / "many", meta={"title": "x", "colour": "red", "lyrics": []}); (root / "many" / "other.wav").unlink()
    before = tree_hash(root)
    rep = validate_corpus(root)
    assert tree_hash(root) == before                                    # never modifies data/
    assert [s.id for s in rep.songs] == ["good"]
    assert set(rep.rejected) == {"corrupt", "truncated", "nan", "six", "mismatch", "many"}
    assert "unreadable" in messages(rep, "corrupt") and "drums.wav" in messages(rep, "corrupt")
    assert "truncated" in messages(rep, "truncated") or "unreadable" in messages(rep, "truncated")
    assert "NaN" in messages(rep, "nan") and "0.002 s" in messages(rep, "nan")
    assert "6 channels" in messages(rep, "six")
    assert "length mismatch" in messages(rep, "mismatch") and "drums 1.000 s" in messages(rep, "mismatch")
    many = messages(rep, "many")
    assert "missing stem 'other'" in many and "unknown keys ['colour']" in many and "empty lyrics" in many
    assert len(rep.rejected["many"]) == 3
    assert "rejected" in rep.format()


def test_8khz_and_silent_stems_are_accepted(tmp_path):
    d = make_song(tmp_path / "lofi", sr=8000, channels=1)
    sf.write(d / "drums.wav", np.zeros(16000, "float32"), 8000)       # silent stem: fine (e.g. no drums)
    song, probs = read_song(d, tmp_path)
    assert song is not None and all(p.level == "warning" and "8000 Hz" in p.message for p in probs)
    x = load_stems(song, 48000)
    assert x["vocals"].shape == (96000,) and np.abs(x["drums"]).max() == 0
    assert np.abs(x["vocals"]).std() > 0.01


def test_timed_lyrics_checked(tmp_path):
    bad = [{"text": "a", "start": 0.5, "end": 0.4}, {"text": "b", "start": 0.2, "end": 0.3}, {"text": "c", "start": 5, "end": 6}]
    make_song(tmp_path / "s", meta={"lyrics": bad})
    rep = validate_corpus(tmp_path)
    m = messages(rep, "s")
    assert "bad times" in m and "after the audio" in m


def test_non_latin_lyrics():
    assert normalize_lyrics("Ich  bin's, «Liebe»!  ") == "ich bin's liebe"
    ru, el, ja = char_ids("Калинка моя"), char_ids("Αγάπη μου"), char_ids("さくら 桜")
    assert UNK_ID not in ru and UNK_ID not in el and ids_to_text(ru) == "калинка моя"
    assert ja.count(UNK_ID) == 4 and ja[3] == VOCAB.index(" ")         # unknown script -> explicit <unk>
    assert VOCAB[0] == "<blank>" and VOCAB[1] == "<unk>"
    for lang_text in ("Wie schön leuchtet", "où es-tu, garçon", "perché così", "mañana", "Dziękuję", "Ça"):
        assert UNK_ID not in char_ids(lang_text), lang_text


def test_missing_root():
    with pytest.raises(SongError, match="not found"): discover_songs("/nonexistent/songs")


def test_generator_is_deterministic_and_extends(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ids_a = generate_corpus(a, n_songs=3, seed=7, log=lambda *_: None)
    ids_b = generate_corpus(b, n_songs=6, seed=7, log=lambda *_: None)
    assert set(ids_a) <= set(ids_b)
    for sid in ids_a: assert tree_hash(a / sid) == tree_hash(b / sid)
    rep = validate_corpus(b)
    assert len(rep.songs) == 6 and not rep.errors
    kinds = {s.meta["recipe"]["kind"] for s in rep.songs}
    assert kinds == {"chorale", "folk", "pop"}
    for s in rep.songs:
        assert s.syllables and all(x.start is not None and x.end > x.start for x in s.syllables)
        assert 5 <= s.meta["recipe"]["duration_s"] <= 21
        assert set(s.parts) == set(STEMS)
    ch = next(s for s in rep.songs if s.meta["recipe"]["kind"] == "chorale")
    assert ch.language == "de" and "Bach" in ch.meta["source"]


def test_cli_validate_exit_code(tmp_path, capsys):
    make_song(tmp_path / "ok")
    assert main(["validate", str(tmp_path)]) == 0
    make_song(tmp_path / "bad", lengths={"bass": 0.5})
    capsys.readouterr()
    assert main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "bad" in out and "length mismatch" in out and "1 rejected" in out


def test_instrumental_and_accompaniment_only_songs(tmp_path):
    "No vocal stem is fine when song.json says instrumental; an unseparated accompaniment replaces drums+bass+other."
    def acc_song(name, meta=None, vocals=False, drums=False):
        d = tmp_path / name; d.mkdir()
        x = (0.1 * np.random.default_rng(0).standard_normal((44100, 2))).astype("float32")
        sf.write(d / "accompaniment.flac", x, 44100)
        if vocals: sf.write(d / "vocals.wav", x, 44100)
        if drums: sf.write(d / "drums.wav", x, 44100)
        if meta is not None: (d / "song.json").write_text(json.dumps(meta))
    acc_song("inst", {"instrumental": True})
    acc_song("karaoke", {"lyrics": "la la"}, vocals=True)                    # vocals + accompaniment: fine
    acc_song("no_vocals")                                                     # not marked instrumental
    acc_song("inst_with_vocals", {"instrumental": True}, vocals=True)
    acc_song("both_acc", {"instrumental": True}, drums=True)
    acc_song("inst_lyrics", {"instrumental": True, "lyrics": "la"})
    acc_song("inst_str", {"instrumental": "yes"})
    rep = validate_corpus(tmp_path)
    assert sorted(s.id for s in rep.songs) == ["inst", "karaoke"]
    s = {x.id: x for x in rep.songs}
    assert s["inst"].instrumental and not s["inst"].acc_separated and not s["karaoke"].instrumental and not s["karaoke"].acc_separated
    x = load_stems(s["inst"], 48000)
    assert set(x) == set(STEMS) and np.abs(x["vocals"]).max() == 0 == np.abs(x["drums"]).max() and np.std(x["other"]) > 0.05
    assert np.std(load_stems(s["karaoke"], 48000)["vocals"]) > 0.05
    assert "missing stem 'vocals'" in messages(rep, "no_vocals") and '"instrumental": true' in messages(rep, "no_vocals")
    assert "a vocal stem in a song marked" in messages(rep, "inst_with_vocals")
    assert "give one or the other" in messages(rep, "both_acc")
    assert "has no lyrics" in messages(rep, "inst_lyrics")
    assert "must be true or false" in messages(rep, "inst_str")


def test_shift_corpus_is_held_out_and_cached(tmp_path):
    args = dict(recipes=2, music=["hyperrogue-music", "warzone2100-music"], excerpts=1, excerpt_s=3.0, seed=1, log=lambda *_: None)
    ids = build_shift_corpus(tmp_path / "a", **args)
    rep = validate_corpus(tmp_path / "a")
    s = {x.id: x for x in rep.songs}
    assert sorted(ids) == sorted(s) and not rep.errors and len(ids) == 4, rep.format()
    assert all(x.split == "shift" and "shift" in x.meta["tags"] and x.meta["licence"] for x in s.values())
    music = [x for x in s.values() if "real-music" in x.meta["tags"]]
    assert len(music) == 2 and all(x.instrumental and not x.acc_separated for x in music)
    assert {x.meta["licence"] for x in music} <= {"CC-BY-SA-3.0", "CC-BY-SA-3.0+ or GPL-2+", "GPL-2+"}
    assert all(abs(sf.info(x.stems["accompaniment"]).duration - 3.0) < 1e-3 and "Debian package" in x.meta["source"] for x in music)
    chorale = s["shift-chorale-0000"].meta["source"]
    # a score the main corpus uses is never drawn again; the folder is rebuilt only when an input changed
    ids_b = build_shift_corpus(tmp_path / "b", exclude_sources={chorale}, **args)
    assert json.loads((tmp_path / "b" / "shift-chorale-0000" / "song.json").read_text())["source"] != chorale and len(ids_b) == 4
    before = tree_hash(tmp_path / "a"); mtime = (tmp_path / "a" / ids[-1] / "accompaniment.flac").stat().st_mtime_ns
    assert build_shift_corpus(tmp_path / "a", **args) == ids
    assert tree_hash(tmp_path / "a") == before and (tmp_path / "a" / ids[-1] / "accompaniment.flac").stat().st_mtime_ns == mtime
    assert build_shift_corpus(tmp_path / "a", **{**args, "excerpt_s": 2.0}) == ids and tree_hash(tmp_path / "a") != before
    for reserved in ("fretsonfire-songs-muldjord", "singularity-music"):
        with pytest.raises(SongError, match="reserved"): music_excerpts(tmp_path / "c", [reserved], 1, 3.0, 0)
