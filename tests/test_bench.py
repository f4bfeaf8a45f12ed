"""`python -m duotok.bench --quick`: one run prints the roofline, encoder, throughput tables with sane numbers."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "duotok.bench", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def tables(text: str) -> dict[str, list[list[str]]]:
    "Section title -> rows (header first, separator dropped) of the markdown table under it."
    res, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "): title = line[3:]; res[title] = []
        elif line.startswith("|") and title and not line.startswith("|---"):
            res[title].append([c.strip() for c in line.strip("|").split("|")])
    return res


def number(cell: str) -> float:
    m = re.match(r"^(-?[\d.]+(?:e[-+]?\d+)?)", cell)
    assert m, f"not a number: {cell!r}"
    return float(m.group(1))


def test_bench_quick_prints_every_table(out):
    t = tables(out)
    roof = next(v for k, v in t.items() if k.startswith("Matmul roofline"))
    assert [r[0] for r in roof[1:]] == ["float32", "bfloat16"] and all(number(r[1]) > 0 for r in roof[1:])
    enc = next(v for k, v in t.items() if k.startswith("Encoder forward"))
    assert enc[0] == ["scale", "dtype", "s/forward", "audio s/s", "GFLOP/s", "% roofline", "vs reference"]
    assert [(r[0], r[1]) for r in enc[1:]] == [("toy", "float32"), ("toy", "bfloat16")]
    for r in enc[1:]:
        v = [number(c) for c in r[2:]]
        assert all(x > 0 for x in v) and abs(v[0] * v[1] - 4.0) < 0.05 * 4.0, r     # s/forward x audio s/s = 4 s
    key, thr = next((k, v) for k, v in t.items() if k.startswith("Throughput"))
    chosen = int(re.search(r"auto: (\d+) thread", key).group(1))
    assert 1 <= chosen <= len(os.sched_getaffinity(0))
    assert len(thr[0]) == 4 and thr[0][1].startswith("quiet") and thr[0][2].startswith("busy") and thr[0][3] == "busy, auto"
    names = [r[0] for r in thr[1:]]
    assert names == ["encoder toy bf16, audio s/s", "encode API, audio s/s", "decode 20 steps, audio s/s",
                     "decode 4 steps, audio s/s", "ssl step fp32, s", "ssl step bf16 autocast, s"], names
    for r in thr[1:]:
        assert len(r) == 4 and all(number(c) > 0 for c in r[1:]), r
        if "encode API" in r[0] or "decode" in r[0]:
            assert all(re.search(r"\(\d+ MB\)$", c) for c in r[1:]), r
