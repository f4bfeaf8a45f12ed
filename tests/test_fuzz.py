"""Fuzz suite: mutated WAV/FLAC files through the audio loader, mutated song.json / lyrics through
`read_song`, defect-zoo song trees through `validate_corpus`, mutated token files through `DualTokens.load`,
damaged packaged tokenizers through `DuoTok.from_pretrained` (+ decoder, + a short encode), mutated params.yaml
through `load_params` (harness and targets: tests/_fuzz.py).

Every case must end `accepted` (with a valid result) or `rejected` (a `duotok.core.InputError` with a
message), within 10 s, without an allocation beyond 1 GiB, and leave its input byte-identical.
CI runs each target's default number of cases; `DUOTOK_FUZZ_CASES=N` runs N per target,
`DUOTOK_FUZZ_SEED=S` explores other inputs. A failure names the case: replay it in-process with
`python tests/_fuzz.py --replay TARGET:CASE --seed S`."""
import collections
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fuzz import FAILURES, TARGETS, Runner, n_cases  # noqa: E402

SEED = int(os.environ.get("DUOTOK_FUZZ_SEED", "0"))
REJECTION_NAMES = {"audio_wav": "/a.wav", "audio_flac": "/a.flac", "token_file": "/t.npz",   # a rejection names the file
                   "package": "/pkg/"}


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


@pytest.mark.parametrize("name", [n for n in TARGETS if not n.startswith("_")])
def test_fuzz_target(runner, name):
    results = [runner.case(name, i, SEED) for i in range(n_cases(TARGETS[name]))]
    counts = collections.Counter(r["outcome"] for r in results)
    bad = [r for r in results if r["outcome"] in FAILURES]
    report = "\n".join(f"{r['target']}:{r['case']} (seed {SEED}) {r['outcome']}: {r['detail']}" for r in bad[:5])
    assert not bad, f"{len(bad)} of {len(results)} cases failed {dict(counts)}:\n{report}"
    unnamed = [r for r in results if r["outcome"] == "rejected" and REJECTION_NAMES.get(name, "") not in r["detail"]]
    assert not unnamed, f"rejections that do not name the file: {unnamed[:3]}"
    # the mutations reach both sides (no degenerate generator): audio is accepted or rejected, a song
    # folder is usable or refused, a corpus has usable songs or none
    labels = collections.Counter(r["outcome"] if r["outcome"] == "rejected" else r["detail"].split(" of ")[0]
                                 for r in results)
    assert len(labels) >= 2, dict(labels)
    print(name, dict(counts), dict(labels), f"slowest case {max(r['ms'] for r in results):.0f} ms")


def test_guards_catch_a_hang_and_a_big_allocation(runner):
    hang = runner.case("_selftest_hang", 0, timeout=1.0)
    assert hang["outcome"] == "hang" and "sleep" in hang["detail"], hang
    alloc = runner.case("_selftest_alloc", 0)
    assert alloc["outcome"] == "memory", alloc
    assert runner.case("audio_wav", 0)["outcome"] in ("accepted", "rejected")       # the worker carries on
