"""Bad input, case by case (issue 17, audio and corpus side): each test feeds one defect, asserts the
message a user sees (the file, the problem, what to do) and that the input is byte-identical afterwards."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from duotok.audio import AudioError, _soxr_resample, load_audio, resample, sinc_kernel_size
from duotok.core import InputError
from duotok.corpus import STEMS, SongError, main as corpus_main, validate_corpus

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fuzz import tree_hash  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}


def make_song(d: Path, sr=22050, secs=1.0, channels=1, meta=None, silent=False, lengths=None, seed=0):
    d.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(seed)
    for s in STEMS:
        n = int((lengths or {}).get(s, secs) * sr)
        x = np.zeros((n, channels)) if silent else 0.1 * rng.standard_normal((n, channels))
        sf.write(d / f"{s}.wav", x.astype("float32"), sr, subtype="FLOAT")
    if meta is not None: (d / "song.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    return d


def msgs(rep, sid):
    return " | ".join(rep.rejected.get(sid, []))


# -- audio: header checks before any allocation, bounded resampling ---------------------------------
def test_odd_rates_resample_in_bounded_memory(tmp_path):
    """44,101 and 47,999 Hz used to make torchaudio build a 4-9 GB kernel (gcd 1 with the target rate).
    Under an address-space cap of 512 MiB above the loaded interpreter they now load, resample and
    stream through the tokenizer's mel front end (`duotok encode`'s path)."""
    for rate in (44101, 47999):
        sf.write(tmp_path / f"x{rate}.wav", (0.1 * np.random.default_rng(0).standard_normal((2 * rate, 2))).astype("float32"), rate, subtype="PCM_16")
    before = tree_hash(tmp_path)
    code = textwrap.dedent(f"""
        import resource, types, numpy as np
        from duotok.audio import load_audio
        from duotok.tokenizer import stream_log_mel
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
        audio = types.SimpleNamespace(encoder_sample_rate=24000, hop_length=240, n_fft=1024, n_mels=128)
        for rate in (44101, 47999):
            x, sr = load_audio("{tmp_path}/x%d.wav" % rate, sr=48000)
            assert x.shape == (2, 96000) and sr == 48000, x.shape
            y, _ = load_audio("{tmp_path}/x%d.wav" % rate)
            m = stream_log_mel(y, rate, audio)
            assert m.shape == (128, 201) and np.isfinite(m.numpy()).all(), m.shape
        print("ok")""")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert tree_hash(tmp_path) == before


def test_absurd_rates_are_refused_from_the_header(tmp_path):
    sf.write(tmp_path / "ok.wav", np.zeros((8000, 1), "float32"), 8000)
    b = bytearray((tmp_path / "ok.wav").read_bytes())
    for rate in (1, 1_000_000):
        b[24:28] = rate.to_bytes(4, "little"); (tmp_path / f"r{rate}.wav").write_bytes(bytes(b))
    before = tree_hash(tmp_path)
    with pytest.raises(AudioError) as e: load_audio(tmp_path / "r1.wav", sr=48000)
    assert str(e.value) == (f"{tmp_path}/r1.wav: sample rate 1 Hz is outside 8000-384000 Hz (a damaged header?); "
                            "re-export the file at a standard rate such as 44100 or 48000 Hz")
    with pytest.raises(AudioError, match="1000000 Hz is outside"): load_audio(tmp_path / "r1000000.wav")
    assert isinstance(e.value, InputError) and tree_hash(tmp_path) == before


def test_soxr_agrees_with_torchaudio_and_standard_rates_are_unchanged():
    rng = np.random.default_rng(0)
    for o, n in ((44100, 48000), (22050, 16000), (48000, 24000)):
        t = np.arange(2 * o) / o
        x = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(rng.uniform(50, 0.4 * min(o, n), 10), rng.uniform(0, 6, 10)))
        x = (x / 10).astype(np.float32)
        ta = torchaudio.functional.resample(torch.from_numpy(x), o, n, lowpass_filter_width=16, rolloff=0.95,
                                            resampling_method="sinc_interp_kaiser", beta=8.555).numpy()
        assert sinc_kernel_size(o, n) < 1 << 20 and np.array_equal(resample(x, o, n), ta)   # default path unchanged
        sx = _soxr_resample(x, o, n)
        assert sx.shape == ta.shape and np.abs(sx - ta)[n // 10:-n // 10].max() < 1e-4        # away from the edges
    t = np.arange(44101) / 44101                                      # soxr path: against the analytic tone
    y = resample(np.sin(2 * np.pi * 3000 * t).astype(np.float32)[None], 44101, 48000)
    truth = np.sin(2 * np.pi * 3000 * np.arange(48000) / 48000)
    assert y.shape == (1, 48000) and np.abs(y[0, 4800:-4800] - truth[4800:-4800]).max() < 1e-4
    yt = resample(torch.from_numpy(np.sin(2 * np.pi * 3000 * t).astype(np.float32)), 44101, 48000)
    assert isinstance(yt, torch.Tensor) and torch.allclose(yt, torch.from_numpy(y[0]))


def test_stems_that_are_not_regular_files_are_refused_without_waiting(tmp_path):
    d = make_song(tmp_path / "songs" / "s")
    (d / "vocals.wav").unlink(); os.mkfifo(d / "vocals.wav")             # opening a pipe would wait forever
    (d / "drums.wav").unlink(); (d / "drums.wav").symlink_to("/dev/zero")
    before = tree_hash(tmp_path)
    rep = validate_corpus(tmp_path / "songs")
    m = msgs(rep, "s")
    assert f"{d}/vocals.wav: not a regular file (a folder, pipe or device); give an audio file" in m
    assert f"{d}/drums.wav: not a regular file" in m and tree_hash(tmp_path) == before


# -- render: espeak-ng, ids, empty corpus --------------------------------------------------------------
def test_syllable_starting_with_dash_is_sung_with_stdin_open():
    """'-ing' used to reach espeak-ng as an option: with stdin open it waited on the terminal."""
    code = ("import numpy as np\nfrom duotok.render import sing, Syllable\n"
            "v = sing([Syllable('-ing', 0.0, 0.5, 0), Syllable('--help', 0.5, 1.0, 1)], [(0.0, 1.0, 69)], 'en-us', 1.1)\n"
            "print(float(np.abs(v[:24000]).max()), float(np.abs(v[24000:48000]).max()))")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)                        # stdin stays open and empty
    try: out, err = p.communicate(timeout=120)
    finally: p.kill()
    assert p.returncode == 0, err[-2000:]
    assert all(float(v) > 0.01 for v in out.split()), out            # both syllables sung


def test_tools_get_no_terminal_and_a_time_limit():
    from duotok.render import run_tool
    with pytest.raises(RuntimeError, match="sleep did not finish within 0.5 s"): run_tool(["sleep", "5"], 0.5)
    assert run_tool(["cat"], 10).stdout == b""                        # reads /dev/null, returns at once


def test_colliding_ids_are_reported_per_song(tmp_path):
    root = tmp_path / "songs"
    for name in ("a b", "a_b", "c"): make_song(root / name)
    before = tree_hash(root)
    rep = validate_corpus(root)                                       # used to abort with a traceback
    assert [s.id for s in rep.songs] == ["c"] and list(rep.rejected) == ["a_b"]
    assert rep.rejected["a_b"] == [f"{root}/a b: song id 'a_b' is also the id of 'a_b': folder names that differ only "
                                   "in characters outside [A-Za-z0-9_.-] collide; rename one of them",
                                   f"{root}/a_b: song id 'a_b' is also the id of 'a b': folder names that differ only "
                                   "in characters outside [A-Za-z0-9_.-] collide; rename one of them"]
    assert corpus_main(["validate", str(root)]) == 1 and tree_hash(root) == before


def test_paths_that_are_not_plain_names_never_reach_outputs(tmp_path):
    from duotok.render import _materialise, render_corpus
    one = make_song(tmp_path / "one"); (one / "sub").mkdir()
    hidden = make_song(tmp_path / "songs" / ".hidden"); make_song(tmp_path / "songs" / "ok")
    out = tmp_path / "outputs" / "render"; out.mkdir(parents=True); (out / "keep.txt").write_text("x")
    before = tree_hash(tmp_path / "songs"), tree_hash(one)
    # the corpus root given as `<song folder>/sub/..`: the id used to be '..', and render deleted out_root
    m = render_corpus(one / "sub" / "..", out, workers=1, log=lambda *_: None)
    assert m["songs"] == 1 and (out / "songs" / "one" / "mix.flac").exists() and (out / "keep.txt").exists()
    rep = validate_corpus(tmp_path / "songs")
    assert [s.id for s in rep.songs] == ["ok"] and msgs(rep, ".hidden") == (
        f"{hidden}: the folder name gives the song id '.hidden', which is not a plain folder name: rename the folder "
        "(letters, digits, '_', '-', '.'; not starting with '.')")
    with pytest.raises(SongError, match="not a plain song folder name; refusing to replace it"):
        _materialise(out / "songs" / "one", out / "songs" / "..")
    assert (out / "keep.txt").exists() and (tree_hash(tmp_path / "songs"), tree_hash(one)) == before


def test_empty_corpus_fails_with_a_message_and_exit_2(tmp_path):
    from duotok.render import render_corpus
    (tmp_path / "songs").mkdir()
    with pytest.raises(SongError) as e: render_corpus(tmp_path / "songs", tmp_path / "out", workers=1, log=lambda *_: None)
    assert str(e.value) == (f"{tmp_path}/songs: no usable song among 0 song folders: no song folders: a song folder holds "
                            "the stems vocals, drums, bass, other (.wav/.flac) or a song.json recipe with MIDI parts "
                            f"(docs/corpus.md); `python -m duotok.corpus validate {tmp_path}/songs` lists every problem")
    assert not (tmp_path / "out").exists()
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    r = subprocess.run([sys.executable, "-m", "duotok.stages.render", "--no-track", "--set", f"render.songs_dir={tmp_path / 'songs'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"[render] error: {e.value}"
    assert not (tmp_path / "outputs" / "render" / "songs").exists()
    assert corpus_main(["validate", str(tmp_path / "songs")]) == 2
    assert corpus_main(["validate", str(tmp_path / "nowhere")]) == 2


def test_mixture_only_folders_are_reported(tmp_path, capsys):
    d = tmp_path / "songs" / "live"; d.mkdir(parents=True)
    sf.write(d / "mixture.wav", np.zeros((8000, 2), "float32"), 8000)
    before = tree_hash(tmp_path)
    assert corpus_main(["validate", str(tmp_path / "songs")]) == 2     # used to print "0 song folders" and exit 0
    out = capsys.readouterr().out
    assert "1 song folders, 0 usable, 1 rejected" in out
    assert (f"[error] live: {d}/mixture.wav: only a mixture (mixture.wav), no stems: duotok needs the four stems "
            "vocals, drums, bass, other; separate the mixture into stems first (mixture-only songs are not supported yet)") in out
    assert tree_hash(tmp_path) == before


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory):
    "A packaged tokenizer of random weights (the one tests/test_tokenizer.py builds)."
    from test_tokenizer import toy_encoder
    from duotok.tokenizer import package_encoder
    d = tmp_path_factory.mktemp("pkg")
    toy_encoder().save(d / "cb")
    package_encoder(d / "cb", d / "pkg")
    return d / "pkg"


def test_encode_refuses_stems_of_different_length(tmp_path, toy_package, capsys):
    from duotok.cli import main
    from duotok.tokenizer import DualTokens
    song = make_song(tmp_path / "song", lengths={"drums": 2.0}, secs=5.0)   # drums 2 s, the rest 5 s
    before = tree_hash(song)
    assert main(["encode", "--model", str(toy_package), "--song", str(song), "-o", str(tmp_path / "tok"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"duotok encode: error: stems differ in length: {song}/vocals.wav 5.00 s, {song}/drums.wav 2.00 s, "
                   f"{song}/bass.wav 5.00 s, {song}/other.wav 5.00 s (more than 0.05 s apart): trim them to one length, "
                   "or pass --pad to zero-pad the shorter ones")
    assert main(["encode", "--model", str(toy_package), "--vocals", str(song / "vocals.wav"), "--accompaniment",
                 str(song / "drums.wav"), "-o", str(tmp_path / "t.npz"), "-q"]) == 2
    assert "stems differ in length" in capsys.readouterr().err
    assert main(["encode", "--model", str(toy_package), "--song", str(song), "-o", str(tmp_path / "tok"), "-q", "--pad"]) == 0
    assert DualTokens.load(tmp_path / "tok" / "song.npz").n_tokens == 125    # 5 s, not cut to 2 s
    assert tree_hash(song) == before


def test_written_files_keep_the_usual_mode(tmp_path):
    from duotok.audio import save_audio
    from duotok.checkpoint import save_checkpoint
    from duotok.core import atomic_write_json
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck", {"w": torch.zeros(2)}, {"a": 1})      # safetensors writes 0600 by itself
        save_audio(tmp_path / "a.flac", np.zeros(100, np.float32), 8000)
        atomic_write_json(tmp_path / "x.json", {})
    finally: os.umask(old)
    for p in (tmp_path / "ck" / "model.safetensors", tmp_path / "ck" / "model.json", tmp_path / "a.flac", tmp_path / "x.json"):
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))


# -- validation covers what later stages need --------------------------------------------------------
def test_warnings_strict_and_exit_codes(tmp_path, capsys):
    root = tmp_path / "songs"
    make_song(root / "silent", silent=True, meta={"split": "test"})
    make_song(root / "zh", meta={"split": "test", "language": "zh", "lyrics": "桜 love 😀"})
    make_song(root / "odd", sr=44101, meta={"split": "test"})
    before = tree_hash(root)
    rep = validate_corpus(root)
    assert len(rep.songs) == 3 and not rep.errors
    warn = {(p.song, p.message) for p in rep.problems}
    assert ("silent", "all four stems are silent (peak below -60 dBFS): the song gives nothing to learn; check the files "
                      "or remove the song") in warn
    assert ("zh", "lyrics use characters outside the lyric vocabulary: 桜 (-> <unk>); 😀 (dropped): the lyric head "
                  "cannot learn them (vocabulary: docs/corpus.md)") in warn
    assert ("odd", "unusual sample rate 44101 Hz (a damaged or mislabelled header?): it is resampled as given (with "
                   "soxr); check that the song plays at the right speed") in warn
    assert ("", "no song would be in the 'train' split (3 usable songs, pinned: {'test': 3}): the ssl and finetune "
                "stages need train and val segments; remove \"split\" from some song.json files or add songs") in warn
    assert ("", "no song would be in the 'val' split (3 usable songs, pinned: {'test': 3}): the ssl and finetune "
                "stages need train and val segments; remove \"split\" from some song.json files or add songs") in warn
    assert corpus_main(["validate", str(root)]) == 0
    assert corpus_main(["validate", str(root), "--strict"]) == 2           # every song has a warning: none usable
    out = capsys.readouterr().out
    assert "[error] silent:" in out and "[error] (corpus):" in out
    assert tree_hash(root) == before
    make_song(root / "fine", meta={"split": "test"})
    assert corpus_main(["validate", str(root), "--strict"]) == 1           # usable songs, but warnings
    with pytest.raises(SystemExit): corpus_main(["validate", "--help"])
    assert "exit status:\n  0  every song folder is usable" in capsys.readouterr().out
    assert "exit status" in (ROOT / "docs" / "corpus.md").read_text()


def test_song_json_values_are_type_checked(tmp_path):
    lyr = [{"text": "-ing", "start": 0.0, "end": 0.2, "word": "abc"}, {"text": 5, "start": 0.2, "end": 0.3},
           {"text": "x", "start": float("nan"), "end": 0.5, "pitch": 300}]
    make_song(tmp_path / "songs" / "s", meta={"title": ["no"], "lyrics": lyr})
    rec = tmp_path / "songs" / "r"; rec.mkdir()
    (rec / "song.json").write_text(json.dumps({"lyrics": [{"text": "la", "start": 0, "end": 1}],
                                               "recipe": {"voice": "-x", "duration_s": 1e9, "vocal_gain_db": "loud"}}))
    before = tree_hash(tmp_path / "songs")
    rep = validate_corpus(tmp_path / "songs")
    s, r = msgs(rep, "s"), msgs(rep, "r")
    assert "\"title\" must be a string, got list" in s and "lyrics[0]: \"word\" must be a word index (an integer >= 0), got 'abc'" in s
    assert "lyrics[1]: syllable \"text\" must be a string, got int" in s
    assert "lyrics[2]: \"pitch\" must be a MIDI note number 0-127 or null, got 300" in s
    assert "lyrics[2]: start/end must be finite numbers (seconds), got nan, 0.5" in s
    assert "recipe \"voice\" '-x' is not an espeak-ng voice name (like 'en-us+f3')" in r
    assert "recipe \"duration_s\" must be a number of seconds in (0, 1800], got 1000000000.0" in r
    assert "recipe \"vocal_gain_db\" must be a number in [-60, 60], got 'loud'" in r
    (tmp_path / "deep").mkdir(); (tmp_path / "deep" / "song.json").write_text("[" * 100000 + "]" * 100000)
    rep = validate_corpus(tmp_path / "deep")
    assert "unreadable JSON (RecursionError" in msgs(rep, "deep")
    assert tree_hash(tmp_path / "songs") == before


def test_a_corpus_without_train_songs_stops_in_preprocess(tmp_path):
    from duotok.preprocess import PreprocessError, SegmentSpec, preprocess_corpus
    from duotok.render import render_corpus
    for i in range(3): make_song(tmp_path / "songs" / f"s{i}", secs=2.0, meta={"split": "test"}, seed=i)
    before = tree_hash(tmp_path / "songs")
    render_corpus(tmp_path / "songs", tmp_path / "render", workers=1, log=lambda *_: None)
    with pytest.raises(PreprocessError) as e:
        preprocess_corpus(tmp_path / "render", tmp_path / "pre", SegmentSpec(segment_s=2.0, hop_s=2.0), workers=1, log=lambda *_: None)
    assert str(e.value) == (f"{tmp_path}/render: no segment in the 'train' and 'val' split (3 usable songs; songs per split "
                            "{'test': 3}; pinned in song.json: {'test': 3}): ssl and finetune need train and val segments; "
                            "remove \"split\" from some song.json files or add songs")
    assert isinstance(e.value, InputError) and not (tmp_path / "pre").exists() and tree_hash(tmp_path / "songs") == before


# == phase 2: token files, packages, config ranges, stage errors ======================================
REMAKE = "re-create it (duotok encode / duotok tokenize write token files)"


def _token_files(d: Path) -> dict[str, tuple[bytes, str]]:
    "name -> (file bytes, the message `DualTokens.load` must give after '<path>: ')."
    import io, zipfile, zlib
    from duotok.tokenizer import DualTokens, write_npz
    t = DualTokens(np.arange(20) % 16, np.arange(20) % 16, 25, (16, 16), "m")
    arrays = t.arrays()
    def npz(**over) -> bytes:
        b = io.BytesIO(); write_npz(b, {**arrays, **over}); return b.getvalue()
    good = npz()
    i = good.index(b"vocals.npy") + 120
    hdr = io.BytesIO(); np.lib.format.write_array_header_1_0(hdr, {"descr": "<i8", "fortran_order": False, "shape": (10 ** 10,)})
    huge = io.BytesIO()
    with zipfile.ZipFile(huge, "w") as z:
        for k, a in arrays.items():
            m = io.BytesIO(); np.save(m, a); z.writestr(f"{k}.npy", hdr.getvalue() + b"\0" * 160 if k == "vocals" else m.getvalue())
    bomb = io.BytesIO()                  # 400 MB of zero ids, deflated to < 1 MB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        for k, a in arrays.items():
            if k != "vocals": z.writestr(f"{k}.npy", (lambda m: (np.save(m, a), m.getvalue())[1])(io.BytesIO())); continue
            h = io.BytesIO(); np.lib.format.write_array_header_1_0(h, {"descr": "<i8", "fortran_order": False, "shape": (50_000_000,)})
            with z.open("vocals.npy", "w", force_zip64=True) as f:
                f.write(h.getvalue())
                for _ in range(40): f.write(bytes(10_000_000))
    h = t.header()
    cases = {
        "truncated": (good[: len(good) // 2], f"not a readable .npz token file: BadZipFile: File is not a zip file; {REMAKE}"),
        "empty": (b"", f"not a readable .npz token file: BadZipFile: File is not a zip file; {REMAKE}"),
        "bad_crc": (good[:i] + bytes([good[i] ^ 1]) + good[i + 1:],
                    f"not a readable .npz token file (member vocals.npy): BadZipFile: Bad CRC-32 for file 'vocals.npy'; {REMAKE}"),
        "header_list": (npz(header=np.array("[1, 2]")), f"field 'header' must be a JSON object, got list; {REMAKE}"),
        "header_not_json": (npz(header=np.array("{oops")), "field 'header' is not JSON (Expecting property name enclosed in "
                            f"double quotes: line 1 column 2 (char 1)); {REMAKE}"),
        "codebook_scalar": (npz(header=np.array(json.dumps({**h, "codebook_sizes": 256}))),
                            "header 'codebook_sizes' must be a list of two integers in [2, 2^31] (vocals, accompaniment), got 256"),
        "token_rate_zero": (npz(header=np.array(json.dumps({**h, "token_rate": 0}))),
                            "header 'token_rate' must be a number of tokens per second in (0, 10000], got 0"),
        "float_ids": (npz(vocals=arrays["vocals"] + 0.5), f"'vocals' must hold integer ids, got dtype float64; {REMAKE}"),
        "text_ids": (npz(acc=np.array(list("abc"))), f"field 'acc' has dtype <U1; expected numbers; {REMAKE}"),
        "negative_ids": (npz(vocals=-arrays["vocals"] - 1),
                         f"'vocals' ids must be in [0, 16); 20 are not (first at flat index 0: -1); {REMAKE}"),
        "ids_too_big": (npz(acc=arrays["acc"] + 16), f"'acc' ids must be in [0, 16); 20 are not (first at flat index 0: 16); {REMAKE}"),
        "bad_offsets": (npz(offsets=np.array([0, 30, 20]), segment=np.array(["a", "b"]), header=np.array(json.dumps({**h, "version": 2}))),
                        "'offsets' must be N + 1 non-decreasing integers from 0 to the stream length 20, got [0, 30, 20]; " + REMAKE),
        "huge_shape": (huge.getvalue(), "field 'vocals' declares shape (10000000000,) of int64 (80000000000 bytes) but the "
                       f"member holds 160 bytes: the file is damaged; {REMAKE}"),
        "zip_bomb": (bomb.getvalue(), "its arrays declare 400000" ),
    }
    for name, (data, _) in cases.items(): (d / f"{name}.npz").write_bytes(data)
    return cases


def test_damaged_token_files_give_one_message_and_allocate_nothing(tmp_path, capsys):
    """Each damaged token file gives `TokenFileError` '<file>: <problem>; <what to do>' from `DualTokens.load`, and
    `duotok info` prints it as one line with exit status 2. The 74.5 GiB shape and the 400 MB zip bomb are refused
    from their headers under an address-space cap of 256 MiB above the loaded interpreter."""
    from duotok.cli import main
    from duotok.tokenizer import DualTokens, TokenFileError
    cases = _token_files(tmp_path)
    before = tree_hash(tmp_path)
    for name, (data, msg) in cases.items():
        p = tmp_path / f"{name}.npz"
        with pytest.raises(TokenFileError) as e: DualTokens.load(p)
        assert str(e.value).startswith(f"{p}: {msg}"), (name, str(e.value))
        assert isinstance(e.value, InputError) and len(data) < 1 << 20 and p.read_bytes() == data
        assert main(["info", str(p)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"duotok info: error: {e.value}"]
    code = textwrap.dedent(f"""
        import resource
        from duotok.tokenizer import DualTokens, TokenFileError
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        for n in ("huge_shape", "zip_bomb"):
            try: DualTokens.load("{tmp_path}/%s.npz" % n); raise SystemExit(n + " accepted")
            except TokenFileError as e: print("refused", n)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and r.stdout.split() == ["refused", "huge_shape", "refused", "zip_bomb"], r.stderr[-2000:]
    assert tree_hash(tmp_path) == before


def test_info_reads_the_pipelines_own_token_files(tmp_path, capsys):
    "`duotok info outputs/pre_encode/tokens_val.npz` (issue 19 said it refused them) describes the shard."
    from duotok.cli import main
    from duotok.diffusion import write_pre_encoded
    from duotok.tokenizer import DualTokens
    t = DualTokens(np.arange(24).reshape(3, 8) % 32, np.arange(24).reshape(3, 8) % 32, 25, (32, 32), "toy", ["a/0", "a/1", "b/0"])
    out = tmp_path / "outputs" / "pre_encode"; out.mkdir(parents=True)
    write_pre_encoded(out, "val", t, np.zeros((3, 2, 4, 16), np.float32))
    assert main(["info", str(out / "tokens_val.npz")]) == 0
    assert capsys.readouterr().out.startswith("DualTokens(shard of 3 x 8, 0.32 s at 25 Hz, K=(32, 32)")


def test_decoding_zero_tokens_and_odd_api_rates_are_refused(tmp_path, toy_package, capsys):
    from duotok.audio import AudioError
    from duotok.cli import main
    from duotok.tokenizer import DualTokens, DuoTok, TokenFileError
    empty = DualTokens(np.zeros(0, np.int64), np.zeros(0, np.int64), 25, (64, 64)).save(tmp_path / "in" / "empty.npz")
    before = tree_hash(tmp_path / "in")
    tok = DuoTok.from_pretrained(toy_package)
    with pytest.raises(TokenFileError, match=r"DuoTok.decode: the tokens hold 0 tokens per track \(T = 0\): there is no "
                       r"audio to decode; encode a song of at least one token"):
        tok.decode(empty)
    assert main(["decode", "--model", str(toy_package), str(empty), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "0 tokens per track (T = 0)" in capsys.readouterr().err
    x = np.zeros(4800, np.float32)
    for sr in (1, 1_000_000, 44100.5, "48k"):
        with pytest.raises(AudioError) as e: tok.encode(x, x, sr)
        assert str(e.value) == (f"DuoTok.encode: sample rate {sr} Hz is outside 8000-384000 Hz (a damaged header?); "
                                "re-export the file at a standard rate such as 44100 or 48000 Hz")
    with pytest.raises(AudioError, match="DuoTok.encode_mix: sample rate 0 Hz"): tok.encode_mix(x, 0, separator=lambda m, r: (m, m, r))
    assert tok.encode(x, x, 24000.0).n_tokens == 5
    assert tree_hash(tmp_path / "in") == before


@pytest.mark.parametrize("damage, msg", [
    ("truncate", "encoder/model.safetensors: not a readable safetensors file (SafetensorError: Error while deserializing header"),
    ("pickle", "encoder/model.safetensors: a pickled PyTorch file, not safetensors; duotok never loads pickles: re-run the "
               "stage that writes it, or re-package the tokenizer (python -m duotok.package)"),
    ("missing", "checkpoint file missing: {pkg}/encoder/model.json (did the stage that writes it run?)"),
    ("token_rate", "encoder/model.json: audio.token_rate: 0 is not >= 1"),
    ("hop", "encoder/model.json: audio.hop_length: -240 is not >= 1"),
    ("json_list", 'encoder/model.json: expected a JSON object {"config": {...}}, got [1, 2]'),
    ("huge_width", "encoder/model.json: the config's shapes differ from the weights (encoder.lower_blocks.0.ffn.0.bias: "
                   "(16384,) vs (128,) in the weights"),
    ("huge_layers", "encoder/model.json: encoder.layers: 100000 is not in [1, 256]"),
])
def test_damaged_packages_name_the_file_and_the_field(tmp_path, toy_package, capsys, damage, msg):
    import pickle, shutil
    from duotok.checkpoint import CheckpointError
    from duotok.cli import main
    from duotok.config import ConfigError
    from duotok.tokenizer import DuoTok
    pkg = tmp_path / "pkg"; shutil.copytree(toy_package, pkg)
    w, c = pkg / "encoder" / "model.safetensors", pkg / "encoder" / "model.json"
    cfg = json.loads(c.read_text())
    if damage == "truncate": w.write_bytes(w.read_bytes()[:100])
    elif damage == "pickle": w.write_bytes(pickle.dumps({"w": [1.0]}))
    elif damage == "missing": c.unlink()
    elif damage == "json_list": c.write_text("[1, 2]")
    else:
        if damage == "token_rate": cfg["config"]["audio"]["token_rate"] = 0
        elif damage == "hop": cfg["config"]["audio"]["hop_length"] = -240
        elif damage == "huge_width": cfg["config"]["encoder"]["width"] = 4096; cfg["config"]["encoder"]["heads"] = 64
        else: cfg["config"]["encoder"]["layers"] = 100000
        c.write_text(json.dumps(cfg))
    before = tree_hash(tmp_path)
    with pytest.raises(InputError) as e: DuoTok.from_pretrained(pkg)    # CheckpointError, or ConfigError for a value
    want = msg.format(pkg=pkg) if damage == "missing" else f"{pkg}/{msg}"
    assert str(e.value).startswith(want), str(e.value)
    assert isinstance(e.value, CheckpointError if damage not in ("token_rate", "hop", "huge_layers") else ConfigError)
    assert main(["info", str(pkg)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"duotok info: error: {e.value}"]
    assert tree_hash(tmp_path) == before


def test_pretrained_vae_folder_must_hold_safetensors(tmp_path):
    from duotok.checkpoint import CheckpointError
    from duotok.vae import PretrainedOobleck
    d = tmp_path / "vae"; d.mkdir()
    with pytest.raises(CheckpointError, match=r"vae.pretrained=.*/vae: not a diffusers model directory \(no config.json\)"):
        PretrainedOobleck(d)
    (d / "config.json").write_text("{}"); (d / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError) as e: PretrainedOobleck(d)
    assert str(e.value) == (f"vae.pretrained={d}: no .safetensors weights (found ['config.json', 'diffusion_pytorch_model.bin']); "
                            "duotok loads pretrained weights as safetensors only, never a pickled .bin / .pt: save the model "
                            "with save_pretrained(..., safe_serialization=True)")
    assert tree_hash(tmp_path) == before


def test_config_values_out_of_range_are_refused_with_the_dotted_key(tmp_path):
    from duotok.config import ConfigError, load_params
    for prof in (None, ROOT / "params/toy.yaml", ROOT / "params/paper.yaml"):
        load_params(ROOT / "params.yaml", profile=prof)                       # the shipped files load
    for bad, msg in [("preprocess.segment_s=-4", "preprocess.segment_s: -4.0 is not > 0"),
                     ("preprocess.val_fraction=1.5", "preprocess.val_fraction: 1.5 is not in [0, 1)"),
                     ("ssl.train.batch_size=0", "ssl.train.batch_size: 0 is not >= 1"),
                     ("codebook.train.steps=-1", "codebook.train.steps: -1 is not >= 0"),
                     ("audio.sample_rate=1", "audio.sample_rate: 1 is not in [8000, 384000]"),
                     ("data.augment.eq_p=2", "data.augment.eq_p: 2.0 is not in [0, 1]"),
                     ("generate.top_p=0", "generate.top_p: 0.0 is not in (0, 1]"),
                     ("decoder.train.lr=.inf", "decoder.train.lr: inf is not > 0")]:
        with pytest.raises(ConfigError) as e: load_params(ROOT / "params.yaml", [bad])
        assert str(e.value) == msg and isinstance(e.value, InputError)
    (tmp_path / "p.yaml").write_text("audio: [1, 2\n")
    with pytest.raises(ConfigError, match=r"p.yaml: not a readable YAML file \(ParserError"): load_params(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match="profile file not found: nowhere.yaml"): load_params(ROOT / "params.yaml", profile="nowhere.yaml")


@pytest.mark.parametrize("stage", ["preprocess", "ssl"])
def test_every_stage_prints_bad_input_as_one_line_with_exit_2(tmp_path, stage):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    before = tree_hash(tmp_path)
    r = subprocess.run([sys.executable, "-m", f"duotok.stages.{stage}", "--no-track", "--set", "preprocess.val_fraction=1.5"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"[{stage}] error: preprocess.val_fraction: 1.5 is not in [0, 1)"]
    assert tree_hash(tmp_path) == before


def test_a_safetensors_file_whose_header_length_starts_with_0x80_loads(tmp_path):
    "The pickle check must not refuse real safetensors files: their first byte is the header length's low byte."
    import torch
    from safetensors.torch import save_file
    from duotok.checkpoint import read_weights
    for n in range(1, 600):                       # find a tensor name that makes the header length's low byte 0x80
        save_file({"w" * n: torch.zeros(1)}, tmp_path / "a.safetensors")
        if (tmp_path / "a.safetensors").read_bytes()[:1] == b"\x80": break
    assert (tmp_path / "a.safetensors").read_bytes()[:1] == b"\x80"
    assert list(read_weights(tmp_path / "a.safetensors")) == ["w" * n]
