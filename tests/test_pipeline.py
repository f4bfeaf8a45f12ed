"""The toy-size chain of all stages: a 3-song corpus generated from real scores goes through every DVC
stage (render -> ... -> report) as `python -m duotok.stages.<name>`, in a scratch project folder,
with params/toy.yaml. Checks each stage's outputs exist and that the metrics are finite."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    shutil.copy(ROOT / "params.yaml", d / "params.yaml")
    shutil.copytree(ROOT / "params", d / "params")
    shutil.copytree(ROOT / "nbs" / "reports", d / "nbs" / "reports")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlruns.db'}"}
    r = subprocess.run([sys.executable, "-m", "duotok.corpus", "generate", "--n-songs", "3", "--seed", "0",
                        "--out", "data/songs"], cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, env


def _finite(d):
    return all(math.isfinite(v) for v in d.values() if isinstance(v, float))


def test_every_stage_runs_in_order_at_toy_size(project):
    d, env = project
    for name in STAGES:
        r = subprocess.run([sys.executable, "-m", f"duotok.stages.{name}", "--profile", "params/toy.yaml"],
                           cwd=d, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"stage {name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        m = json.loads((d / "outputs" / name / "metrics.json").read_text())
        assert _finite(m), (name, m)
        assert not (d / "outputs" / ".resume" / name).exists(), f"{name}: resume state left behind"
    assert (d / "outputs/decoder/package").is_dir()
    ev = json.loads((d / "eval/metrics.json").read_text())
    assert any("ppl_1024" in k for k in ev), sorted(ev)[:20]
    assert (d / "outputs/report/report.html").stat().st_size > 10_000
    import mlflow
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["duotok"])
    assert set(STAGES) <= set(runs["tags.dvc.stage"]), "each stage opened its MLflow run"
