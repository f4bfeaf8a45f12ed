"""The report stage on a small fixture project (metrics written by hand, two wavs per track, an MLflow store with
runs logged out of pipeline order): the headline, paths, the page's assets, the order of the training curves."""
import json
import re

import numpy as np
import pytest
import soundfile as sf

from _helpers import ROOT
from duotok.config import load_params
from duotok.stages.report import NOT_MEASURED, remote_assets, run
from duotok.tracking import NullTracker, start_run

pytest.importorskip("papermill")
pytestmark = pytest.mark.timeout(300)

EVAL = {"kbps": 0.75, "codebook_size/vocals": 32.0, "codebook_size/acc": 64.0, "lm/dual/overall/ppl_1024": 12.5,
        "unigram/overall/ppl_1024": 40.5, "recon/vocals/mel_l1": 1.625, "recon/acc/mel_l1": 1.375,
        "stability/test/gain_-1db/vocals": 0.875, "stability/test/gain_-1db/acc": 0.5,
        "usage/vocals/usage": 0.75, "usage/acc/usage": 0.25}           # no PESQ, STOI, RPA, v2a LM: "not measured"
DECODER = {"val/vocals/mel_l1/silence": 6.5, "val/vocals/mel_l1/meanspec": 2.25, "val/vocals/mel_l1/vae": 0.875}
NOTES = ["a note results.md lists", "a note only notes.json has"]
ORDER_LOGGED = ["decoder", "pre_encode", "ssl", "vae"]     # MLflow lists the newest run first: vae, ssl, pre_encode, decoder


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for k in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):          # the store of the fixture, not of the caller
        mp.delenv(k, raising=False)
    root = tmp_path_factory.mktemp("proj")
    (root / "eval").mkdir()
    (root / "eval/metrics.json").write_text(json.dumps(EVAL))
    (root / "eval/results.md").write_text(f"# Evaluation results\n\n## Notes\n\n- {NOTES[0]}\n")
    ev = root / "outputs/evaluate"; (ev / "examples").mkdir(parents=True)
    (ev / "notes.json").write_text(json.dumps({"notes": NOTES, "published": []}))
    np.savez(ev / "code_counts.npz", vocals=np.arange(32), acc=np.r_[np.ones(16), np.zeros(48)])
    rng = np.random.default_rng(0)
    for t in ("vocals", "acc", "mix"):
        for k in ("orig", "recon"):
            sf.write(ev / f"examples/0_{t}_{k}.wav", (0.1 * rng.standard_normal(24000)).astype(np.float32), 48000)
    (root / "outputs/decoder").mkdir(parents=True)
    (root / "outputs/decoder/metrics.json").write_text(json.dumps(DECODER))
    for stage in ORDER_LOGGED:                                 # logged in this order: MLflow lists the last first
        with start_run(stage, root=root) as t:
            if stage == "pre_encode":
                t.log_metrics({"train/n": 3.0}, step=0)            # what pre_encode logs: one point, no curve,
                t.log_time("train/tokenize_s", 1.0)                 # and a duration (time/...): no panel
            else:
                for s in range(3):
                    t.log_metrics({"train/loss": 1.0 / (s + 1), "train/steps_per_s": 5.0}, step=s)
    m = run(load_params(ROOT / "params.yaml"), NullTracker(), out_dir=root / "report", root=root)
    mp.undo()
    nb = json.loads((root / "report/report.ipynb").read_text())
    return root, m, nb, (root / "report/report.ipynb").read_text(), (root / "report/report.html").read_text()


def _outputs(nb, kind):
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []) if o["output_type"] == kind]


def _text(o):
    t = o.get("text") or o.get("data", {}).get("text/markdown") or ""
    return "".join(t) if isinstance(t, list) else t


def test_renders_without_errors(rendered):
    _, m, nb, _, _ = rendered
    assert m["report/errors"] == 0 and not _outputs(nb, "error"), [o["evalue"] for o in _outputs(nb, "error")]
    assert m["report/figures"] >= 5, m


def test_headline_numbers_and_not_measured(rendered):
    _, _, nb, _, html = rendered
    table = next(_text(o) for o in _outputs(nb, "display_data") if "| quantity |" in _text(o))
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines()[2:]}
    cols = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    row = lambda q, t: dict(zip(cols, rows[(q, t)]))
    assert row("bitrate (kbps)", "both")["ours"] == "0.75"
    ppl = row("PPL@1024, dual-track LM", "both")
    assert (ppl["ours"], ppl["trivial baseline"], ppl["beats baseline"]) == ("12.5", "unigram 40.5", "yes")
    mel = row("mel L1", "vocals")                   # baselines from the decoder stage's metrics
    assert (mel["trivial baseline"], mel["ceiling"], mel["beats baseline"]) == ("silence 6.5; mean spectrum 2.25",
                                                                                "VAE round trip 0.875", "yes")
    assert row("mel L1", "accompaniment")["trivial baseline"] == NOT_MEASURED
    st = row("token stability, gain -1 dB", "accompaniment")
    assert (st["ours"], st["trivial baseline"]) == ("50 %", "chance 1/V 1.56 %")     # 1/64
    for q, t in (("PESQ", "vocals"), ("STOI", "accompaniment"), ("pitch accuracy (RPA) vs the original's pitch", "vocals"),
                 ("PPL@1024, vocal-to-accompaniment LM", "accompaniment")):
        assert row(q, t)["ours"] == NOT_MEASURED, (q, t)
    assert "<table" in html and "token stability, gain -1 dB" in html


def test_no_absolute_paths_no_network_assets(rendered):
    root, m, _, nb_text, html = rendered
    for text in (nb_text, html):
        for p in {str(root), str(root.resolve()), str(ROOT)}:
            assert p not in text
    assert m["report/remote_assets"] == 0 and remote_assets(html) == []
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", html)
    assert "<script src=" not in html


def test_training_curves_in_pipeline_order_and_notes_once(rendered):
    _, _, nb, _, html = rendered
    streams = "".join(_text(o) for o in _outputs(nb, "stream"))
    assert "panels, in pipeline order: ssl, vae, decoder" in streams      # logged decoder, pre_encode, ssl, vae
    assert "no training curve logged by: pre_encode" in streams
    for n in NOTES:
        assert html.count(n) == 1, n


def test_an_empty_project_renders_and_says_what_is_missing(tmp_path, monkeypatch):
    "No stage has run: every section says what is missing, the headline reads 'not measured', nothing fails."
    for k in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    m = run(load_params(ROOT / "params.yaml"), NullTracker(), out_dir=tmp_path / "report", root=tmp_path)
    nb = json.loads((tmp_path / "report/report.ipynb").read_text())
    assert m["report/errors"] == 0, [o["evalue"] for o in _outputs(nb, "error")]
    table = next(_text(o) for o in _outputs(nb, "display_data") if "| quantity |" in _text(o))
    assert all(line.split("|")[3].strip() == NOT_MEASURED for line in table.splitlines()[2:])
    streams = "".join(_text(o) for o in _outputs(nb, "stream"))
    assert "eval/metrics.json                  missing" in streams and "no training curves recorded" in streams
