"""Foundation invariants: configuration, checkpoints, the shared training loop (resume, NaN stop,
2-process torchrun), MLflow tracking + UI, the DVC pipeline, and nbdev discipline."""
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import nbformat
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from duotok.checkpoint import CheckpointError, load_checkpoint, resumable_state, save_checkpoint
from duotok.config import ConfigError, Params, TrainConfig, load_params, to_dict, from_dict
from duotok.train import NonFiniteLossError, fit
from duotok.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


# ---------------------------------------------------------------- configuration
def test_params_load_and_derived_rates():
    p = load_params(PARAMS)
    assert p.audio.frame_rate == 100 and p.audio.downsample == 4 and p.audio.token_rate == 25
    assert p.audio.kbps == pytest.approx(2 * 25 * torch.log2(torch.tensor(float(p.audio.codebook_size))).item() / 1000)
    assert from_dict(Params, to_dict(p)) == p  # round trip


def test_paper_profile_is_075_kbps():
    p = load_params(PARAMS, profile=ROOT / "params/paper.yaml")
    assert p.audio.codebook_size == 32768 and p.audio.token_rate == 25 and p.audio.sample_rate == 48000
    assert p.audio.kbps == pytest.approx(0.75)
    assert (p.ssl.encoder.layers, p.ssl.encoder.lower_layers, p.ssl.encoder.width) == (24, 12, 1024)


@pytest.mark.parametrize("override, needle", [
    ("ssl.encoder.width=1.5", "ssl.encoder.width"),
    ("ssl.encoder.width=true", "ssl.encoder.width"),
    ("ssl.train.lr=fast", "ssl.train.lr"),
    ("ssl.encoder.widht=3", "ssl.encoder.widht"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("preprocess.silent=maybe", "preprocess.silent"),
    ("ssl.encoder.lower_layers=99", "ssl.encoder.lower_layers"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_params(PARAMS, [override])


def test_missing_key_is_named(tmp_path):
    text = PARAMS.read_text().replace("  mask_prob: 0.6\n", "")
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"ssl\.mask_prob"):
        load_params(tmp_path / "p.yaml")


def test_overrides_apply_and_configs_are_frozen():
    p = load_params(PARAMS, ["ssl.train.steps=7", "finetune.noise.p=0.5"])
    assert p.ssl.train.steps == 7 and p.finetune.noise.p == 0.5
    with pytest.raises(Exception):
        p.ssl.train.steps = 8  # frozen dataclass


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_exact_and_not_pickle(tmp_path):
    m = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    save_checkpoint(tmp_path, m, {"dims": [5, 7, 3]})
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert not raw.startswith(b"\x80") and b"PK" != raw[:2]  # neither pickle nor torch zip
    sd, cfg = load_checkpoint(tmp_path)
    m2 = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)); m2.load_state_dict(sd)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert cfg == {"dims": [5, 7, 3]}
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nope")


# ---------------------------------------------------------------- training loop
def _toy(steps, ckpt_every=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g); y = x.sum(-1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=0.1, warmup_steps=2, weight_decay=0.0, grad_clip=1.0,
                      val_every=0, ckpt_every=ckpt_every, log_every=5, seed=0, mixed_precision="no", num_workers=0)
    return loader, cfg


def test_fit_stops_on_nan(tmp_path):
    loader, cfg = _toy(10)
    nan_loss = lambda m, b: {"x/l": m(b[0]).mean() * float("nan")}
    with pytest.raises(NonFiniteLossError, match="step 0"):
        fit(nn.Linear(4, 1), nan_loss, loader, cfg, tmp_path / "s", NullTracker(), {"x/l": 1.0}, progress=False)


def test_fit_resumes_after_kill(tmp_path):
    """A child process trains and is killed (os._exit) after its step-10 checkpoint; the rerun resumes there."""
    script = tmp_path / "kill.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_foundation import _toy
from duotok.train import fit
from duotok.tracking import NullTracker
loader, cfg = _toy(20)
def on_step(step, model):
    if step == 12: os._exit(17)
loss = lambda m, b: {{"reg/mse": ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()}}
torch.manual_seed(0)
fit(torch.nn.Linear(4, 1), loss, loader, cfg, {str(tmp_path / 'out' / 'toy')!r}, NullTracker(), {{"reg/mse": 1.0}}, on_step=on_step, progress=False)
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 17, r.stderr
    state = resumable_state(tmp_path / "out" / "toy")
    assert json.loads((state / "step.json").read_text())["step"] == 10
    loader, cfg = _toy(20)
    loss = lambda m, b: {"reg/mse": ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()}
    res = fit(nn.Linear(4, 1), loss, loader, cfg, tmp_path / "out" / "toy", NullTracker(), {"reg/mse": 1.0}, progress=False)
    assert res.resumed_from == 10 and res.step == 20


def test_fit_under_torchrun_two_processes(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--standalone",
                        str(ROOT / "tests/_ddp_fit.py"), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(d["world"] == 2 and d["num_processes"] == 2 and d["step"] == 30 for d in ranks)
    assert ranks[0]["w"] == pytest.approx(ranks[1]["w"]), "DDP keeps the replicas identical"
    assert ranks[0]["after"] < ranks[0]["before"] / 5


# ---------------------------------------------------------------- tracking
def test_start_run_logs_config_sha_and_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    from duotok.tracking import read_history, start_run
    p = load_params(PARAMS)
    with start_run("ssl", p, root=tmp_path) as t:
        t.log_metrics({"train/mlm/ce": 2.0}, step=1); t.log_metrics({"train/mlm/ce": 1.0}, step=2)
        run_id = t.run_id
    import mlflow
    r = mlflow.get_run(run_id)
    assert r.data.tags["dvc.stage"] == "ssl" and "git.sha" in r.data.tags
    assert r.data.params["ssl.encoder.width"] == str(p.ssl.encoder.width)
    h = read_history("ssl", root=tmp_path)
    assert list(h.sort_values("step")["value"]) == [2.0, 1.0]


def test_processes_opening_a_fresh_store_at_once_do_not_race(tmp_path):
    "MLflow migrates a new SQLite schema on first use; unserialised, a second process fails (`duplicate column name`)."
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}"}
    code = "import sys; from duotok.tracking import open_store; print(open_store(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1, "one experiment, created once"


def test_mlflow_ui_serves_a_page(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'ui.db'}")
    from duotok.tracking import serve_ui
    with serve_ui(root=tmp_path) as url:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode("utf-8", "replace")
    assert r.status == 200 and "mlflow" in body.lower()


# ---------------------------------------------------------------- pipeline + nbdev discipline
from duotok.stage import STAGES as _STAGES
STAGES = list(_STAGES)       # the pipeline order the package declares


def test_dvc_pipeline_has_every_stage_with_its_params_section():
    import yaml
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == STAGES
    params = yaml.safe_load(PARAMS.read_text())
    for name, st in dvc["stages"].items():
        assert st["cmd"] == f"python -m duotok.stages.{name}"
        assert name in st["params"] and name in params, name
        assert st["outs"][0] == f"outputs/{name}"
    assert "analytics = false" in (ROOT / ".dvc/config").read_text()


def _stage_and_report_notebooks():
    nbs = sorted((ROOT / "nbs").glob("*_stage_*.ipynb")) + sorted((ROOT / "nbs/reports").glob("*.ipynb"))
    return [p for p in nbs if not p.name.startswith("_")]


@pytest.mark.parametrize("nb", _stage_and_report_notebooks(), ids=lambda p: p.name)
def test_runnable_notebooks_have_one_parameters_cell(nb):
    cells = nbformat.read(nb, as_version=4).cells
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{nb.name}: {len(tagged)} cells tagged 'parameters' (need exactly 1 for papermill)"


def test_nbdev_clean_keeps_the_parameters_tag(tmp_path):
    nb = nbformat.v4.new_notebook()
    c = nbformat.v4.new_code_cell("steps = 3"); c.metadata["tags"] = ["parameters"]; c.metadata["scrolled"] = True
    nb.cells = [c]
    path = tmp_path / "x.ipynb"; nbformat.write(nb, path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run([str(Path(sys.executable).parent / "nbdev-clean"), "--fname", str(path)], check=True, cwd=tmp_path)
    meta = nbformat.read(path, as_version=4).cells[0].metadata
    assert meta.get("tags") == ["parameters"] and "scrolled" not in meta


def test_git_sha_dirty_only_when_tracked_inputs_differ(tmp_path):
    "dvc.lock, rewritten by `dvc repro` after every stage, does not mark the run dirty; any other tracked change does."
    from duotok.core import git_sha
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q"); git("config", "user.email", "t@t"); git("config", "user.name", "t")
    (tmp_path / "dvc.lock").write_text("a\n"); (tmp_path / "params.yaml").write_text("x: 1\n")
    git("add", "."); git("commit", "-qm", "c")
    clean = git_sha(tmp_path)
    assert clean and "+dirty" not in clean
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "new_untracked.txt").write_text("u\n")
    assert git_sha(tmp_path) == clean
    (tmp_path / "params.yaml").write_text("x: 2\n")
    assert git_sha(tmp_path) == clean + "+dirty"
