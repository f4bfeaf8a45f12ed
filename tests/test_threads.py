"""Thread choice on a shared machine (`duotok.core.choose_threads` / `set_threads`, issue 20)."""
import os
import subprocess
import sys

import pytest

from duotok.core import THREADS_ENV, busy_cores, choose_threads, free_threads

ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", THREADS_ENV)}


def threads_in_child(code: str, **env) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**ENV, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_a_busy_neighbour_is_seen_and_left_its_core():
    cores = len(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_cores(0.5) >= 0.7
        assert free_threads(sample_s=0.5) <= max(1, cores - 1)
        assert choose_threads() == cores              # the default does not follow the load: reruns repeat their numbers
    finally:
        hog.kill(); hog.wait()


def test_the_setting_and_the_users_choice_win(monkeypatch):
    code = "import torch; from duotok.core import set_threads; print(set_threads(), torch.get_num_threads())"
    assert threads_in_child(code, **{THREADS_ENV: "3"}) == "3 3"
    assert threads_in_child(code, OMP_NUM_THREADS="2") == "2 2"                 # the user's OpenMP setting is kept
    # the user's own torch.set_num_threads after importing duotok is kept
    assert threads_in_child("import torch, duotok.core as c; torch.set_num_threads(5); print(c.set_threads())") == "5"
    n = int(threads_in_child("from duotok.core import set_threads; print(set_threads())"))
    assert n == len(os.sched_getaffinity(0))                                    # default: every core of the affinity
    n = int(threads_in_child("from duotok.core import set_threads; print(set_threads())", **{THREADS_ENV: "auto"}))
    assert 1 <= n <= len(os.sched_getaffinity(0))
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(ValueError, match=THREADS_ENV):
        choose_threads()


def test_cli_threads_option():
    out = threads_in_child("import torch; from duotok.cli import main; main(['--threads', '2', 'info', 'nothing']); "
                           "print(torch.get_num_threads())")
    assert out.splitlines()[-1] == "2"
