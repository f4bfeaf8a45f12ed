"""A stage's MLflow run is a record: the DVC path of its output and checkpoints, a curves figure, a file list and its
audio examples as artifacts, and artifact locations that follow the repository when it is moved (duotok.tracking.log_run_record,
relocate_store). A stage entry point (`duotok.stage.stage_main`) with a tiny `run` stands in for a training stage."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _helpers import ROOT

STAGE = '''
import sys
from pathlib import Path
from duotok.stage import stage_main

def run(params, tracker):
    out = Path("outputs/ssl"); out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"w" * 64); (out / "model.json").write_text("{}")
    (out / "examples").mkdir(exist_ok=True); (out / "examples/0_mix.wav").write_bytes(b"RIFF" + b"0" * 60)
    for step in range(1, 6): tracker.log_metrics({"train/loss": 1.0 / step, "val/mel_l1": 2.0 - 0.1 * step}, step=step)
    return {"steps": 5}

stage_main("ssl", run, [])
'''

READ = '''
import json, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from duotok.tracking import open_store
exp = open_store()
runs = MlflowClient().search_runs([exp])
r = runs[0]
art = Path(r.info.artifact_uri.removeprefix("file://"))
print(json.dumps(dict(n=len(runs), status=r.info.status, tags=r.data.tags, artifact_uri=r.info.artifact_uri,
                      files=sorted(str(p.relative_to(art)) for p in art.rglob("*") if p.is_file()),
                      listed=json.loads((art / "run/files.json").read_text()))))
'''


def _py(code: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_stage_run_record_survives_a_move(tmp_path):
    proj = tmp_path / "repo"
    proj.mkdir()
    shutil.copy(ROOT / "params.yaml", proj / "params.yaml")
    _py(STAGE, proj)
    rec = json.loads(_py(READ, proj).splitlines()[-1])
    assert rec["n"] == 1 and rec["status"] == "FINISHED"
    assert rec["tags"]["dvc.stage"] == "ssl" and rec["tags"]["dvc.output"] == "outputs/ssl"
    assert rec["tags"]["dvc.checkpoints"] == "outputs/ssl/model.safetensors"
    assert {"plots/curves.png", "run/files.json", "samples/0_mix.wav"} <= set(rec["files"])
    assert rec["listed"] == {"outputs/ssl/model.json": 2, "outputs/ssl/model.safetensors": 64,
                             "outputs/ssl/examples/0_mix.wav": 64}
    assert rec["artifact_uri"].startswith((proj / "mlruns").resolve().as_uri())

    moved = tmp_path / "elsewhere" / "repo2"
    moved.parent.mkdir()
    proj.rename(moved)
    rec2 = json.loads(_py(READ, moved).splitlines()[-1])                   # a new process in the moved repository
    assert rec2["artifact_uri"].startswith((moved / "mlruns").resolve().as_uri()), rec2["artifact_uri"]
    assert rec2["files"] == rec["files"] and rec2["listed"] == rec["listed"]
