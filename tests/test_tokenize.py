"""duotok tokenize at corpus scale on a toy package: a real kill -9 mid-run then a resume gives the bytes of an
uninterrupted run; two torchrun processes and two local workers give the dataset of one process; a song's tokens do
not depend on the batch it is encoded in (fp32); bad input gives a clear message and changes nothing written."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _helpers import ROOT
from _toy_package import full_toy_package, tree, write_song
from duotok.cli import main
from duotok.tokenize import TokenDataset, load_song_stems, load_tokens

pytestmark = pytest.mark.timeout(900)
N_SONGS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    pkg = full_toy_package(d)
    songs = d / "songs"
    for i in range(N_SONGS - 2):
        write_song(songs / f"s{i:02d}", 3.0 + (i % 4), i)
    write_song(songs / "s10_bad", 2.0, 10)
    (songs / "s10_bad" / "bass.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")      # unreadable audio
    write_song(songs / "s11_live", 3.0, 11, roles=("mixture",))                         # a mix only: the separator
    ref = d / "ref"
    r = _tokenize(songs, ref, pkg)
    assert r.returncode == 1, r.stderr[-3000:]                                          # 1: some song rejected
    return d, pkg, songs, ref, r


def _tokenize(songs, out, pkg, *extra, launcher=()):
    return subprocess.run([*launcher, *([] if launcher else [sys.executable]), "-m", "duotok.cli", "tokenize", str(songs),
                           "-o", str(out), "--model", str(pkg), "--shard-size", "1", "-q", *extra],
                          env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_dataset_index_rejects_and_throughput(corpus):
    d, pkg, songs, ref, r = corpus
    ds = TokenDataset(ref)
    assert len(ds) == N_SONGS - 1 and "s10_bad" not in ds.ids and "s11_live" in ds.ids
    rej = [json.loads(l) for l in (ref / "rejects.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rej] == ["s10_bad"] and "bass.wav" in rej[0]["reason"] and "unreadable" in rej[0]["reason"]
    assert "s of audio per s" in r.stderr and "1 rejected" in r.stderr
    sh = ds.shard(ds.index["songs"][-1]["shard"])
    assert sh.meta[0]["kind"] == "mix" and sh.meta[0]["separator"] == "builtin" and sh.meta[0]["sample_rate"] == 24000
    assert ds.index["songs"][0]["duration_s"] == 3.0 and ds[0].n_tokens == 75
    every = load_tokens(ref)
    assert every.is_ragged and every.segment == ds.ids and int(every.lengths.sum()) == ds.index["n_tokens"]


def test_song_alone_equals_song_in_the_corpus_fp32(corpus):
    from duotok.tokenizer import DuoTok
    d, pkg, songs, ref, _ = corpus
    ds = TokenDataset(ref)
    for batch_windows in (1, 16):
        tok = DuoTok.from_pretrained(pkg, batch_windows=batch_windows)
        for i in (0, 3, 7):
            v, a, sr = load_song_stems(songs / ds.ids[i])
            t = tok.encode(v, a, sr)
            assert np.array_equal(t.vocals, ds[i].vocals) and np.array_equal(t.accompaniment, ds[i].accompaniment)


def test_kill_9_then_resume_gives_the_same_bytes(corpus, tmp_path):
    d, pkg, songs, ref, _ = corpus
    out = tmp_path / "ds"
    p = subprocess.Popen([sys.executable, "-m", "duotok.cli", "tokenize", str(songs), "-o", str(out), "--model", str(pkg),
                          "--shard-size", "1", "-q"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not (out / "shards" / "shard-00002.json").exists():
        assert p.poll() is None and time.time() - t0 < 300, "tokenize ended before it could be killed"
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and not (out / "index.json").exists(), "the kill came too late to test resuming"
    done = sorted(out.glob("shards/shard-*.json"))
    assert 3 <= len(done) < N_SONGS
    kept = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.glob("shards/shard-*") if f.with_suffix(".json").exists()}
    r = _tokenize(songs, out, pkg)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"{len(done)} of {N_SONGS} shards already done, skipped" in r.stderr
    assert all((f.stat().st_ino, f.stat().st_mtime_ns) == k for f, k in kept.items())   # finished shards not rewritten
    assert tree(out) == tree(ref)                                                       # byte-identical, no leftovers


def test_two_torchrun_processes_and_two_workers_give_the_same_dataset(corpus, tmp_path):
    d, pkg, songs, ref, _ = corpus
    torchrun = Path(sys.executable).with_name("torchrun")
    r = _tokenize(songs, tmp_path / "ddp", pkg, launcher=(str(torchrun), "--standalone", "--nproc_per_node", "2"))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "rank 1 of 2:" in r.stderr and "rank 0 of 2:" in r.stderr
    assert tree(tmp_path / "ddp") == tree(ref)
    r = _tokenize(songs, tmp_path / "workers", pkg, "--workers", "2")
    assert r.returncode == 1, r.stderr[-3000:]
    assert tree(tmp_path / "workers") == tree(ref)


def test_manifests_csv_and_jsonl(corpus, tmp_path, capsys):
    d, pkg, songs, ref, _ = corpus
    (tmp_path / "m.csv").write_text("id,vocals,drums,bass,other,artist\n"
                                    + "".join(f"x{i},{songs}/s0{i}/vocals.wav,{songs}/s0{i}/drums.wav,{songs}/s0{i}/bass.wav,"
                                              f"{songs}/s0{i}/other.wav,me\n" for i in range(2))
                                    + "x2,nowhere/vocals.wav,,,,\n")
    assert main(["tokenize", str(tmp_path / "m.csv"), "-o", str(tmp_path / "c"), "--model", str(pkg), "-q"]) == 1
    c = TokenDataset(tmp_path / "c")
    assert c.ids == ["x0", "x1"] and np.array_equal(c[1].vocals, TokenDataset(ref)[1].vocals)
    assert c.shard(0).meta[0]["source"] == {"artist": "me"}
    rej = json.loads((tmp_path / "c/rejects.jsonl").read_text())
    assert rej["id"] == "x2" and f"{tmp_path}/nowhere/vocals.wav" in rej["reason"]
    lines = [json.dumps({"folder": f"../songs/s0{i}"}) for i in range(3)]
    (d / "m").mkdir(exist_ok=True); (d / "m/list.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["tokenize", str(d / "m/list.jsonl"), "-o", str(tmp_path / "j"), "--model", str(pkg), "-q"]) == 0
    assert TokenDataset(tmp_path / "j").ids == ["s00", "s01", "s02"]


def test_bad_input_is_a_clear_error_and_changes_nothing(corpus, tmp_path, capsys):
    d, pkg, songs, ref, _ = corpus
    before = tree(ref)
    cases = [
        (["tokenize", str(tmp_path / "none"), "-o", str(tmp_path / "o1"), "--model", str(pkg)], "no such folder or manifest"),
        (["tokenize", str(songs), "-o", str(ref), "--model", str(pkg), "--shard-size", "3"],
         "holds a token dataset made with another configuration: n_shards: 12 -> 4; shard_size: 1 -> 3. "),
        (["tokenize", str(songs), "-o", str(tmp_path / "o2"), "--model", str(tmp_path / "nopkg")], "not a packaged duotok tokenizer"),
        (["lm", "train", str(tmp_path / "o3"), "-o", str(tmp_path / "lm")], "no such token file or token dataset folder"),
    ]
    (tmp_path / "empty.csv").write_text("id,vocals\n")
    cases.append((["tokenize", str(tmp_path / "empty.csv"), "-o", str(tmp_path / "o4"), "--model", str(pkg)], "no songs"))
    (tmp_path / "half").mkdir(); shutil.copy(ref / "plan.json", tmp_path / "half" / "plan.json")
    cases.append((["lm", "train", str(tmp_path / "half"), "-o", str(tmp_path / "lm")], "token dataset incomplete (0 of 12 shards"))
    (tmp_path / "other").mkdir(); (tmp_path / "other" / "keep.txt").write_text("mine")
    cases.append((["tokenize", str(songs), "-o", str(tmp_path / "other"), "--model", str(pkg)], "is not a token dataset"))
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"duotok {argv[0]}: error: ") and msg in err, (argv, err)
    assert tree(ref) == before and (tmp_path / "other" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o4").exists()


def test_restart_replaces_a_dataset_of_another_configuration(corpus, tmp_path, capsys):
    "Refused without --restart (naming the changed keys, the way out, the folder untouched); --restart starts over."
    d, pkg, songs, ref, _ = corpus
    ds = tmp_path / "ds"
    shutil.copytree(ref, ds)
    argv = ["tokenize", str(songs), "-o", str(ds), "--model", str(pkg), "--shard-size", "4", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "shard_size: 1 -> 4" in err and "--restart" in err and tree(ds) == tree(ref)
    assert main(argv + ["--restart"]) == 1                                              # 1: s10_bad rejected again
    new = TokenDataset(ds)
    assert new.index["shard_size"] == 4 and len(new.index["shards"]) == 3 and new.ids == TokenDataset(ref).ids
    assert all(np.array_equal(new[i].vocals, TokenDataset(ref)[i].vocals) for i in range(len(new)))
