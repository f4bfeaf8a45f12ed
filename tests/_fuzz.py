"""Fuzz harness for duotok's input handling (used by tests/test_fuzz.py).

A *target* builds one deterministic, mutated input under a case folder, feeds it to duotok and checks
an accepted result. Every case runs in a worker process (`python tests/_fuzz.py --worker`) with

* a time limit per case (SIGALRM inside the worker, which names where it hung, and a hard kill from the
  parent as a fallback),
* a memory guard: the worker's address space is capped at what it held after its imports plus
  `DUOTOK_FUZZ_MEM_MB` (default 1024) MiB, so any single allocation beyond that fails,
* a hash of the case folder before and after (inputs must stay byte-identical).

The outcome of a case is `accepted` (returned, and `check` passed), `rejected` (raised a
`duotok.core.InputError` with a message) or a failure: `error` (any other exception, or a failed check),
`hang`, `memory`, `modified` (the input changed), `crash` (the worker died).

Targets: mutated WAV/FLAC (audio loader), song.json / lyrics, defect-zoo corpora, token files (`DualTokens.load`),
packaged tokenizers (`DuoTok.from_pretrained` + decoder + a short encode), params.yaml (`load_params`).
Adding a target: write `make(rng, case_dir)`, `run(case_dir)`
and `check(case_dir, result)` and register them with `@target("name", cases=N)`. Replay one case with
`python tests/_fuzz.py --replay NAME:CASE [--seed S]` (prints the traceback in-process)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASE_TIMEOUT_S = 10.0
MEM_GUARD_MB = int(os.environ.get("DUOTOK_FUZZ_MEM_MB", "1024"))
FAILURES = ("error", "hang", "memory", "modified", "crash")


@dataclass
class Target:
    name: str
    make: Callable[[np.random.Generator, Path], Any]      # writes the input under the case folder
    run: Callable[[Path], Any]                            # feeds it to duotok
    check: Callable[[Path, Any], str | None]              # asserts an accepted result is valid; may label it
    cases: int                                            # cases in the default (CI) run


TARGETS: dict[str, Target] = {}


def target(name: str, cases: int):
    "Register `make` (the decorated function) with `run` and `check` given as attributes afterwards."
    def deco(make):
        TARGETS[name] = Target(name, make, None, None, cases)
        return make
    return deco


def case_rng(name: str, case: int, seed: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), case])


def tree_hash(root: Path) -> str:
    "Hash of names, kinds and regular-file bytes under `root` (never opens pipes or devices)."
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            st = os.lstat(p)
            h.update(f"{p.relative_to(root)}|{stat.S_IFMT(st.st_mode)}|{st.st_size}".encode())
            if stat.S_ISLNK(st.st_mode): h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode): h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- mutators
WEIRD_INTS = (0, 1, 2, 3, 7, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 44101, 47999, 1000000)


def mutate_bytes(b: bytes, rng: np.random.Generator, fields: list[tuple[int, int]] = ()) -> bytes:
    "1-3 random byte-level mutations; `fields` = (offset, width) of little-endian header integers."
    b = bytearray(b)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(8))
        if op == 0 and len(b) > 1: del b[int(rng.integers(1, len(b))):]                      # truncate
        elif op == 1 and b:                                                                  # flip bytes
            for i in rng.integers(0, len(b), int(rng.integers(1, 9))): b[int(i)] = int(rng.integers(256))
        elif op == 2 and fields:                                                             # header field
            off, w = fields[int(rng.integers(len(fields)))]
            if off + w <= len(b):
                v = int(rng.choice(WEIRD_INTS)) if rng.random() < 0.7 else int(rng.integers(0, 2 ** (8 * w)))
                b[off:off + w] = (v % 2 ** (8 * w)).to_bytes(w, "little")
        elif op == 3 and b:                                                                  # delete a range
            a = int(rng.integers(len(b))); del b[a:a + int(rng.integers(1, 64))]
        elif op == 4:                                                                        # insert bytes
            a = int(rng.integers(len(b) + 1)); b[a:a] = rng.integers(0, 256, int(rng.integers(1, 64))).astype(np.uint8).tobytes()
        elif op == 5: b = bytearray(rng.integers(0, 256, int(rng.integers(0, 2048))).astype(np.uint8).tobytes())
        elif op == 6 and len(b) > 8:                                                         # duplicate a chunk
            a = int(rng.integers(len(b) - 4)); b += b[a:a + int(rng.integers(4, 512))]
        elif op == 7 and b: b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))        # one bit
    return bytes(b)


def riff_fields(b: bytes) -> list[tuple[int, int]]:
    "Header integers of a RIFF/WAVE file: chunk sizes, channels, rate, byte rate, block align, bits."
    out = [(4, 4)]
    i = b.find(b"fmt ")
    if i >= 0: out += [(i + 4, 4), (i + 10, 2), (i + 12, 4), (i + 16, 4), (i + 20, 2), (i + 22, 2)]
    j = b.find(b"data")
    if j >= 0: out.append((j + 4, 4))
    return out


def flac_mutate_streaminfo(b: bytes, rng: np.random.Generator) -> bytes:
    "Set one STREAMINFO field (sample rate 20 bits, channels 3, bits per sample 5, total samples 36)."
    if len(b) < 26 or b[:4] != b"fLaC": return b
    bits = int.from_bytes(b[18:26], "big")
    field, width = [(44, 20), (41, 3), (36, 5), (0, 36)][int(rng.integers(4))]
    v = int(rng.choice([0, 1, 2, 8000, 44101, 47999, 655350, 2 ** width - 1])) % 2 ** width if rng.random() < 0.7 \
        else int(rng.integers(0, 2 ** width))
    bits = (bits & ~(((1 << width) - 1) << field)) | (v << field)
    return b[:18] + bits.to_bytes(8, "big") + b[26:]


WEIRD_VALUES = (None, True, False, -1, 0, 1, 3.5, -0.0, 1e308, 10 ** 30, float("nan"), float("inf"), "", " ", "-ing",
                "--help", "-v", "桜😀", "x" * 5000, [], {}, [[[[[]]]]], {"text": 1}, "train", "test", "val", "\x00")


def json_paths(obj, prefix=()):
    "Every path (tuple of keys/indices) into a JSON value."
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items(): yield from json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj): yield from json_paths(v, prefix + (i,))


def mutate_json(obj, rng: np.random.Generator):
    "1-3 structural mutations: replace a value, delete a key or item, add an unknown key, reorder syllables."
    obj = json.loads(json.dumps(obj))
    for _ in range(int(rng.integers(1, 4))):
        paths = list(json_paths(obj))
        path = paths[int(rng.integers(len(paths)))]
        op = int(rng.integers(5))
        if not path:
            if op == 0: obj = WEIRD_VALUES[int(rng.integers(len(WEIRD_VALUES)))]
            continue
        parent = obj
        for k in path[:-1]: parent = parent[k]
        k = path[-1]
        if op <= 1: parent[k] = WEIRD_VALUES[int(rng.integers(len(WEIRD_VALUES)))]
        elif op == 2:
            del parent[k]
        elif op == 3 and isinstance(parent, dict): parent["zz" + str(int(rng.integers(100)))] = 1
        elif op == 4 and isinstance(parent, list): parent.reverse()
        if not isinstance(obj, (dict, list)): break
    return obj


def dump_json(obj, rng: np.random.Generator) -> bytes:
    "Serialise (NaN/Infinity allowed, as Python's json writes them), sometimes byte-mutated or deeply nested."
    r = rng.random()
    if r < 0.05: return b"[" * 100000 + b"]" * 100000                                  # recursion bomb
    b = json.dumps(obj, ensure_ascii=bool(rng.random() < 0.5)).encode()
    return mutate_bytes(b, rng) if r < 0.3 else b


# ------------------------------------------------------------------------------------------ input makers
def write_seed_audio(path: Path, rng: np.random.Generator, fmt: str) -> None:
    import soundfile as sf
    rate = int(rng.choice([8000, 11025, 16000, 22050, 44100, 48000, 96000, 44101, 47999]))
    ch = int(rng.choice([1, 2, 2, 2, 3]))
    n = int(rng.integers(1, 3000))
    x = (0.3 * rng.standard_normal((n, ch))).astype(np.float32)
    subtype = str(rng.choice(["PCM_16", "PCM_24", "FLOAT", "PCM_U8", "DOUBLE"] if fmt == "WAV" else ["PCM_16", "PCM_24"]))
    sf.write(str(path), x, rate, subtype=subtype, format=fmt)


def make_audio(rng: np.random.Generator, d: Path, fmt: str) -> Path:
    p = d / ("a.wav" if fmt == "WAV" else "a.flac")
    write_seed_audio(p, rng, fmt)
    b = p.read_bytes()
    if rng.random() < 0.85:
        b = mutate_bytes(flac_mutate_streaminfo(b, rng) if fmt == "FLAC" and rng.random() < 0.5 else b, rng,
                         riff_fields(b) if fmt == "WAV" else [(18, 4), (22, 4)])
    p.write_bytes(b)
    return p


def run_audio(d: Path):
    from duotok.audio import load_audio
    p = next(d.iterdir())
    x0, r0 = load_audio(p)
    x, r = load_audio(p, sr=48000, mono=True)
    return x0, r0, x, r


def check_audio(d: Path, res) -> None:
    from duotok.audio import MAX_SR, MIN_SR
    x0, r0, x, r = res
    for a in (x0, x):
        assert a.dtype == np.float32 and a.ndim == 2 and a.shape[1] > 0 and np.isfinite(a).all(), a.shape
    assert 1 <= x0.shape[0] <= 2 and x.shape[0] == 1 and MIN_SR <= r0 <= MAX_SR and r == 48000
    assert x.shape[1] == (x0.shape[1] if r0 == 48000 else math.ceil(x0.shape[1] * 48000 / r0)), (x0.shape, r0, x.shape)
    return "decoded"


@target("audio_wav", cases=150)
def make_audio_wav(rng, d): return make_audio(rng, d, "WAV")


@target("audio_flac", cases=100)
def make_audio_flac(rng, d): return make_audio(rng, d, "FLAC")


for _n in ("audio_wav", "audio_flac"): TARGETS[_n].run, TARGETS[_n].check = run_audio, check_audio


def valid_meta(rng: np.random.Generator, recipe: bool, secs: float) -> dict:
    n = int(rng.integers(1, 6)); step = secs / (n + 1)
    texts = ["Sun", "shine", "-ing", "love", "при", "桜", "😀", "don't"]
    lyr = [dict(text=str(rng.choice(texts)), start=round(i * step, 3), end=round((i + 1) * step, 3), word=i // 2,
                pitch=int(rng.integers(50, 80))) for i in range(n)]
    meta = dict(title="t", language=str(rng.choice(["en", "de", "ru", ""])), split=rng.choice([None, "train", "test"]),
                tags=["x"], lyrics=lyr if rng.random() < 0.8 else "plain text lyrics")
    if recipe:
        meta["recipe"] = dict(kind="pop", voice="en-us+f3", vocal_gain_db=0.0, duration_s=secs, tempo_bpm=100.0)
        meta["lyrics"] = lyr
    return meta


def write_song(d: Path, rng: np.random.Generator, recipe: bool | None = None, mutate: bool = True) -> None:
    "A small song folder (stems or recipe) with a song.json that is mutated when `mutate`."
    import soundfile as sf
    from duotok.corpus import STEMS, Part, write_midi
    d.mkdir(parents=True, exist_ok=True)
    recipe = bool(rng.random() < 0.3) if recipe is None else recipe
    secs = 0.5
    if recipe:
        for i, s in enumerate(STEMS):
            write_midi(d / f"{s}.mid", [Part(0, i, [(0.0, 0.5, 60 + i, 90)])], 120.0, 1.0)
            if mutate and rng.random() < 0.15: (d / f"{s}.mid").write_bytes(mutate_bytes((d / f"{s}.mid").read_bytes(), rng))
    else:
        for s in STEMS:
            sf.write(str(d / f"{s}.wav"), (0.1 * rng.standard_normal((int(8000 * secs), 1))).astype(np.float32), 8000)
    meta = valid_meta(rng, recipe, secs)
    (d / "song.json").write_bytes(dump_json(mutate_json(meta, rng), rng) if mutate else json.dumps(meta).encode())


@target("song_json", cases=150)
def make_song_json(rng, d): write_song(d / "song", rng)


def run_song(d: Path):
    from duotok.corpus import read_song
    return read_song(d / "song", d, deep=True)


def check_song(d: Path, res) -> None:
    from duotok.corpus import Song
    from duotok.render import RenderSettings, lyric_timing, song_hash
    song, problems = res
    assert all(isinstance(p.message, str) and p.message and p.level in ("error", "warning") for p in problems)
    if song is None:
        assert any(p.level == "error" for p in problems), "a song refused without an error"
        return "refused"
    assert isinstance(song, Song) and isinstance(song.title, str) and isinstance(song.language, str)
    for s in song.syllables:
        assert isinstance(s.text, str) and isinstance(s.word, int) and s.word >= 0
        assert (s.start is None) == (s.end is None)
        if s.start is not None: assert math.isfinite(s.start) and math.isfinite(s.end) and 0 <= s.start < s.end
    if song.kind == "recipe": assert all(s.start is not None for s in song.syllables)
    json.dumps(lyric_timing(song.syllables), allow_nan=False)                    # what render writes
    song_hash(song, RenderSettings())
    return "usable"


DEFECTS = ("good", "good", "recipe", "mixture_only", "empty_dir", "zero_stem", "stem_dir", "stem_devnull",
           "stem_fifo", "json_dir", "mutated", "mutated", "bad_audio")
NAMES = ("a b", "a_b", "x..", ".hidden", "...", "Ünïcode", "train", "test/s1", "val/s2", "s", "s ", "-dash")


@target("corpus", cases=60)
def make_corpus(rng, d):
    root = d / "songs"; root.mkdir()
    for _ in range(int(rng.integers(0, 5))):
        name = str(rng.choice(NAMES)) + ("" if rng.random() < 0.6 else str(int(rng.integers(3))))
        sd = root / name
        if sd.exists(): continue
        kind = str(rng.choice(DEFECTS))
        if kind == "empty_dir": sd.mkdir(parents=True); continue
        if kind == "mixture_only":
            import soundfile as sf
            sd.mkdir(parents=True); sf.write(str(sd / "mixture.wav"), np.zeros((800, 2), np.float32), 8000); continue
        write_song(sd, rng, recipe=(kind == "recipe"), mutate=(kind == "mutated"))
        wav = sd / "vocals.wav"
        if kind == "zero_stem" and wav.exists(): wav.write_bytes(b"")
        elif kind == "stem_dir" and wav.exists(): wav.unlink(); wav.mkdir()
        elif kind == "stem_devnull" and wav.exists(): wav.unlink(); wav.symlink_to("/dev/zero")
        elif kind == "stem_fifo" and wav.exists(): wav.unlink(); os.mkfifo(wav)
        elif kind == "json_dir": (sd / "song.json").unlink(); (sd / "song.json").mkdir()
        elif kind == "bad_audio" and wav.exists(): wav.write_bytes(mutate_bytes(wav.read_bytes(), rng, riff_fields(wav.read_bytes())))


def run_corpus(d: Path):
    from duotok.corpus import validate_corpus
    return validate_corpus(d / "songs", deep=True)


def check_corpus(d: Path, rep) -> None:
    from duotok.corpus import is_safe_id
    ids = [s.id for s in rep.songs]
    assert len(set(ids)) == len(ids) and all(is_safe_id(i) for i in ids), ids
    assert isinstance(rep.format(), str)
    if rep.n_found == 0: assert any(p.song == "" and p.level == "error" for p in rep.problems)
    assert len(rep.songs) + len(rep.rejected) <= rep.n_found
    assert all(r for r in rep.rejected.values())
    return f"{len(rep.songs)} usable of {rep.n_found}"


for _n, _r, _c in (("song_json", run_song, check_song), ("corpus", run_corpus, check_corpus)):
    TARGETS[_n].run, TARGETS[_n].check = _r, _c


# ------------------------------------------------------------------------------------ token files (.npz)
def _weird_array(rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
    "An array that breaks one rule of a token field: dtype, shape, range or size."
    n = max(1, like.size)
    choices = [lambda: like.astype(np.float32) + 0.5, lambda: -like - 1, lambda: like + 10 ** 6,
               lambda: np.array(list("abc")), lambda: like.reshape(1, 1, -1), lambda: np.zeros(0, np.int64),
               lambda: like.astype(np.uint8), lambda: like.astype(bool), lambda: np.array(7),
               lambda: np.full(n, 2 ** 62, np.int64), lambda: like[: n // 2], lambda: np.array([[1, 2], [3, 4]]),
               lambda: np.array([0, 5, 3]), lambda: np.array([json.dumps([1])]), lambda: np.array(["{"])]
    pick = choices[int(rng.integers(len(choices)))]
    try: return pick()
    except (ValueError, TypeError): return np.arange(n) * 3              # text fields: numbers instead


def _npy_shape_bomb(arr_bytes: bytes, rng: np.random.Generator) -> bytes:
    "The `.npy` bytes of a member with its header's shape replaced by a huge or negative one (the data unchanged)."
    import io
    hdr_len = arr_bytes.index(b"\n") + 1
    shape = [(10 ** 10,), (2 ** 40, 2), (-1,), (0,), (3, 2 ** 31), (10 ** 6,)][int(rng.integers(6))]
    descr = str(rng.choice(["<i8", "<i4", "<f8", "|O", "<U0", "<U100000", "V8"]))
    b = io.BytesIO()
    try: np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
    except Exception: return arr_bytes                   # numpy refuses to write this header; keep the member
    return b.getvalue() + arr_bytes[hdr_len:]


@target("token_file", cases=200)
def make_token_file(rng, d):
    "A valid song / dense / ragged token file, then mutated: its bytes, one field, the header, or a member's shape."
    import io, zipfile
    from duotok.tokenizer import DualTokens, write_npz
    K = (int(rng.choice([2, 16, 512])), int(rng.choice([2, 64, 512])))
    T = int(rng.integers(0, 40))
    ids = lambda k, *shape: rng.integers(0, k, shape)
    kind = int(rng.integers(3))
    if kind == 0: t = DualTokens(ids(K[0], T), ids(K[1], T), 25, K, "fz")
    elif kind == 1:
        n = int(rng.integers(1, 4))
        t = DualTokens(ids(K[0], n, T), ids(K[1], n, T), 25, K, "fz", [f"s{i}" for i in range(n)])
    else:
        lens = rng.integers(0, 20, int(rng.integers(0, 4)))
        items = [DualTokens(ids(K[0], m), ids(K[1], m), 25, K, "fz") for m in lens]
        t = DualTokens.ragged(items, [f"s{i}" for i in range(len(items))], [m / 25 for m in lens],
                              [{"src": "x"}] * len(items), 25, K, "fz")
    arrays = t.arrays()
    op = int(rng.integers(6))
    if op == 1:                                                            # one field replaced or removed
        k = str(rng.choice(sorted(arrays)))
        if rng.random() < 0.2: arrays.pop(k)
        else: arrays[k] = _weird_array(rng, arrays[k]) if k != "header" else np.array(str(rng.choice(["[1, 2]", "{", "7", "null"])))
    elif op == 2:                                                          # header values
        h = mutate_json(t.header(), rng)
        if rng.random() < 0.3 and isinstance(h, dict): h["codebook_sizes"] = int(rng.choice([256, 0, -1]))
        arrays["header"] = np.array(json.dumps(h))
    b = io.BytesIO()
    if op == 3:                                                            # a member's .npy header declares another shape
        with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
            bomb = str(rng.choice(sorted(arrays)))
            for k, a in arrays.items():
                m = io.BytesIO(); np.lib.format.write_array(m, np.asanyarray(a), allow_pickle=False)
                z.writestr(f"{k}.npy", _npy_shape_bomb(m.getvalue(), rng) if k == bomb else m.getvalue())
    elif op == 4:                                                          # compressed archive (zlib paths)
        np.savez_compressed(b, **arrays)
    else:
        write_npz(b, arrays)
    data = b.getvalue()
    if op in (0, 4, 5) or rng.random() < 0.2: data = mutate_bytes(data, rng)
    (d / "t.npz").write_bytes(data)


def run_token_file(d: Path):
    from duotok.tokenizer import DualTokens
    return DualTokens.load(d / "t.npz")


def check_token_file(d: Path, t) -> str:
    from duotok.tokenizer import DualTokens
    assert isinstance(t, DualTokens) and t.vocals.dtype == t.accompaniment.dtype == np.int64
    for a, k in ((t.vocals, t.codebook_sizes[0]), (t.accompaniment, t.codebook_sizes[1])):
        assert a.shape == t.vocals.shape and (a.size == 0 or (a.min() >= 0 and a.max() < k))
    assert math.isfinite(t.token_rate) and t.token_rate > 0 and min(t.codebook_sizes) >= 2
    if t.is_ragged: assert t.offsets[0] == 0 and t.offsets[-1] == t.n_tokens and (np.diff(t.offsets) >= 0).all()
    assert [x.n_tokens for x in t] == t.lengths.tolist()
    repr(t); json.dumps(t.header())
    return "loaded"


# -------------------------------------------------------------------------------------- packaged tokenizer
_PACKAGE: list[Path] = []


def _toy_package() -> Path:
    "One packaged tokenizer of random weights per worker (tests/_toy_package.py), copied into each case."
    if not _PACKAGE:
        sys.path.insert(0, str(HERE))
        from _toy_package import full_toy_package
        _PACKAGE.append(full_toy_package(Path(tempfile.mkdtemp(prefix="duotok-fuzz-pkg-"))))
    return _PACKAGE[0]


PACKAGE_FILES = ("encoder/model.safetensors", "encoder/model.json", "decoder/denoiser.safetensors", "decoder/denoiser.json",
                 "decoder/vae.safetensors", "decoder/vae.json")


@target("package", cases=60)
def make_package(rng, d):
    """The toy package with one file damaged: bytes, truncated, a pickle, missing, a config value, token_rate 0 and
    the like; one case in eight is left intact (the control: it must load)."""
    import pickle
    shutil.copytree(_toy_package(), d / "pkg")
    p = d / "pkg" / str(rng.choice(PACKAGE_FILES))
    op = int(rng.integers(7)) if rng.random() >= 0.125 else -1
    if op == -1: pass
    elif op == 0: p.write_bytes(mutate_bytes(p.read_bytes(), rng))
    elif op == 1: p.write_bytes(p.read_bytes()[: int(rng.integers(0, p.stat().st_size))])
    elif op == 2: p.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    elif op == 3: p.unlink()
    else:
        p = p.with_suffix(".json")
        cfg = json.loads(p.read_text())
        if op in (4, 6): cfg = mutate_json(cfg, rng)
        elif isinstance(cfg.get("config", {}).get("audio"), dict):
            key = str(rng.choice(["token_rate", "sample_rate", "codebook_size", "hop_length", "n_mels", "vae_hop"]))
            cfg["config"]["audio"][key] = [0, -1, 1, 3.5, 10 ** 7][int(rng.integers(5))]
        p.write_bytes(dump_json(cfg, rng))


def run_package(d: Path):
    from duotok.tokenizer import DuoTok
    tok = DuoTok.from_pretrained(d / "pkg")
    dec = tok.decoder                                                       # loads decoder/ (denoiser + VAE)
    x = np.zeros(4800, np.float32)
    return tok, dec, tok.encode(x, x, 24000)


def check_package(d: Path, res) -> str:
    tok, dec, t = res
    assert tok.token_rate > 0 and min(tok.codebook_sizes) >= 2 and t.n_tokens >= 1
    assert t.vocals.max() < tok.codebook_sizes[0] and t.accompaniment.max() < tok.codebook_sizes[1]
    return "loaded"


# ------------------------------------------------------------------------------------------- params.yaml
_PARAMS: list[dict] = []


@target("config", cases=100)
def make_config(rng, d):
    "params.yaml with 1-3 structural mutations (sometimes byte-mutated), or a range override of one number."
    import yaml
    from duotok.config import load_params_dict
    if not _PARAMS: _PARAMS.append(load_params_dict(ROOT / "params.yaml"))
    raw = json.loads(json.dumps(_PARAMS[0]))
    if rng.random() < 0.4:                                                 # one number set to an edge value
        nums = [k for k, v in _numbers(raw)]
        key = nums[int(rng.integers(len(nums)))]
        (d / "override.txt").write_text(f"{key}={rng.choice(['0', '-1', '1.5', '-4', '.nan', '.inf', '1e400', '0.999', '100000000'])}")
        (d / "params.yaml").write_text(yaml.safe_dump(raw))
        return
    text = yaml.safe_dump(mutate_json(raw, rng), allow_unicode=bool(rng.random() < 0.5))
    b = text.encode()
    if rng.random() < 0.2: b = mutate_bytes(b, rng)
    elif rng.random() < 0.03: b = b"[" * 50000 + b"]" * 50000
    (d / "params.yaml").write_bytes(b)


def _numbers(d, key=""):
    if isinstance(d, dict):
        for k, v in d.items(): yield from _numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(d, (list, tuple)):
        for i, v in enumerate(d): yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(d, (int, float)) and not isinstance(d, bool): yield key, d


def run_config(d: Path):
    from duotok.config import load_params
    o = d / "override.txt"
    return load_params(d / "params.yaml", [o.read_text()] if o.exists() else [])


def check_config(d: Path, p) -> str:
    from duotok.config import Params, numeric_rule, to_dict
    assert isinstance(p, Params)
    for key, v in _numbers(to_dict(p)): assert v in numeric_rule(key), (key, v)
    return "loaded"


for _n, _r, _c in (("token_file", run_token_file, check_token_file), ("package", run_package, check_package),
                   ("config", run_config, check_config)):
    TARGETS[_n].run, TARGETS[_n].check = _r, _c


# Self-test targets: prove that the guards catch a hang and an oversized allocation (not run by default).
@target("_selftest_hang", cases=1)
def _make_nothing(rng, d): pass


@target("_selftest_alloc", cases=1)
def _make_nothing2(rng, d): pass


TARGETS["_selftest_hang"].run = lambda d: time.sleep(3600)
TARGETS["_selftest_alloc"].run = lambda d: np.ones(3 * 2 ** 26)          # 1.5 GiB of float64
TARGETS["_selftest_hang"].check = TARGETS["_selftest_alloc"].check = lambda d, r: None


# -------------------------------------------------------------------------------------------------- worker
class CaseTimeout(BaseException):
    pass


def _on_alarm(signum, frame): raise CaseTimeout()


def _vm_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"): return int(line.split()[1]) * 1024
    return 0


def run_case(name: str, case: int, seed: int, work: Path, timeout: float) -> dict:
    "One case, in this process: make, hash, run (with the alarm), classify, check, hash again."
    from duotok.core import InputError
    t = TARGETS[name]
    d = work / f"{name}-{case}"
    if d.exists(): shutil.rmtree(d)
    d.mkdir(parents=True)
    t.make(case_rng(name, case, seed), d)
    before = tree_hash(d)
    t0 = time.time(); out = dict(target=name, case=case)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        res = t.run(d)
        signal.setitimer(signal.ITIMER_REAL, 0)
        out.update(outcome="accepted", detail=t.check(d, res) or "")
    except CaseTimeout:
        out.update(outcome="hang", detail=f"no result within {timeout:g} s at:\n" + "".join(traceback.format_exc(limit=-4)))
    except InputError as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        out.update(outcome="rejected" if str(e).strip() else "error", detail=str(e)[:300])
    except MemoryError:
        signal.setitimer(signal.ITIMER_REAL, 0)
        out.update(outcome="memory", detail="an allocation exceeded the memory guard:\n" + traceback.format_exc(limit=-4))
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        mem = "can't allocate memory" in str(e) or "bad_alloc" in str(e)
        out.update(outcome="memory" if mem else "error", detail=traceback.format_exc(limit=-6))
    if out["outcome"] != "hang" and tree_hash(d) != before: out.update(outcome="modified", detail="the input changed")
    out["ms"] = round(1000 * (time.time() - t0), 1)
    shutil.rmtree(d, ignore_errors=True)
    return out


def worker_main() -> None:
    "Read `{target, case, seed, timeout}` lines on stdin, answer one JSON line each on stdout."
    import duotok.audio, duotok.corpus, duotok.render, duotok.config, duotok.checkpoint  # noqa: F401  (imports before the memory cap)
    import duotok.tokenizer, duotok.diffusion, duotok.vae, duotok.separate, yaml  # noqa: F401
    import mido, soxr  # noqa: F401
    duotok.audio.resample(np.zeros(100, np.float32), 44101, 48000)
    cap = _vm_bytes() + MEM_GUARD_MB * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _on_alarm)
    work = Path(tempfile.mkdtemp(prefix="duotok-fuzz-"))
    out = sys.stdout; sys.stdout = sys.stderr                       # stray prints must not break the protocol
    try:
        print(json.dumps({"ready": True}), file=out, flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            res = run_case(req["target"], req["case"], req["seed"], work, req["timeout"])
            print(json.dumps(res), file=out, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- parent
class Runner:
    "Drives a worker process; restarts it after a hang or a crash."
    def __init__(self, env: dict | None = None):
        import duotok                                               # the worker imports the same duotok
        path = os.pathsep.join([str(Path(duotok.__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.proc = None

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_fuzz.py"), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, text=True, bufsize=1)
        if json.loads(self._readline(120) or "{}").get("ready") is not True:
            raise RuntimeError("the fuzz worker did not start")

    def _readline(self, timeout: float) -> str | None:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if r else None

    def case(self, name: str, case: int, seed: int = 0, timeout: float = CASE_TIMEOUT_S) -> dict:
        if self.proc is None or self.proc.poll() is not None: self._start()
        self.proc.stdin.write(json.dumps(dict(target=name, case=case, seed=seed, timeout=timeout)) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout + 10)
        if line:
            return json.loads(line)
        dead = self.proc.poll() is not None
        self.close()
        return dict(target=name, case=case, outcome="crash" if dead else "hang",
                    detail="the worker died" if dead else f"no answer within {timeout + 10:g} s (killed)")

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None: self.proc.kill()
            self.proc.wait(); self.proc = None


def n_cases(t: Target) -> int:
    return int(os.environ.get("DUOTOK_FUZZ_CASES", t.cases))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]: worker_main()
    elif sys.argv[1:2] == ["--replay"]:
        name, case = sys.argv[2].split(":")
        seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
        d = Path(tempfile.mkdtemp()); t = TARGETS[name]
        t.make(case_rng(name, int(case), seed), d)
        print(f"input under {d}")
        res = t.run(d); print("accepted:", t.check(d, res))
    else: print(__doc__)
