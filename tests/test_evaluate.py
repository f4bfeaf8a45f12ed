"""The evaluate and report stages end to end on synthetic tokens and a stand-in tokenizer (no upstream outputs)."""
import json

import numpy as np
import pytest

from _helpers import ROOT
from duotok import lm as L
from duotok.config import load_params
from duotok.evaluation import load_token_split
from duotok.stages import evaluate as E
from duotok.synthetic import EchoTokenizer, audio_items
from duotok.tokenizer import DualTokens
from duotok.tracking import NullTracker

TOY = ["evaluate.lm.layers=2", "evaluate.lm.hidden=64", "evaluate.lm.ffn=128", "evaluate.lm_train.steps=150",
       "evaluate.lm_train.lr=0.003", "evaluate.lm_train.batch_size=32", "evaluate.prompt_s=0.25", "evaluate.pitch_segments=1"]

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    v, a = L.synthetic_streams(288, 24, 32, seed=0)
    pre = root / "outputs/pre_encode"; pre.mkdir(parents=True)
    DualTokens(v[:256], a[:256], 25, (32, 32), "toy", [f"s{i}" for i in range(256)]).save(pre / "tokens_train.npz")
    DualTokens(v[256:], a[256:], 25, (32, 32), "toy", [f"t{i}" for i in range(32)]).save(pre / "tokens_test.npz")
    p = load_params(ROOT / "params.yaml", TOY)
    tracker = NullTracker()
    res = E.run(p, tracker, pre, out_dir=root / "outputs/evaluate", eval_dir=root / "eval",
                tokenizer=EchoTokenizer(0.005), test_items=audio_items(2))
    return root, res, tracker


def test_evaluate_writes_metrics_table_plots(toy_root):
    root, res, tracker = toy_root
    assert json.loads((root / "eval/metrics.json").read_text()) == res
    assert all(np.isfinite(v) for v in res.values())
    for k in ("lm/dual/overall/ppl_1024", "lm/dual/vocals/bpt_norm", "lm/v2a/acc/ppl", "unigram/acc_tail/ppl_1024",
              "recon/vocals/mel_l1", "recon/acc/stoi", "recon/mix/pesq", "recon/vocals/rpa", "usage/vocals/perplexity", "kbps"):
        assert k in res, k
    assert res["kbps"] == pytest.approx(25 * 2 * 5 / 1000)
    md = (root / "eval/results.md").read_text()
    assert "measured on this repository's test split" in md and "| DAC | 75 | 8 x 1024 |" in md and "duotok (ours" in md
    assert {p.name for p in (root / "eval/plots").iterdir()} == {"code_usage.png", "lm_ce.png", "reconstruction.png"}
    assert (root / "outputs/evaluate/examples/0_vocals_recon.wav").exists()
    assert (root / "outputs/evaluate/examples/generated_acc.wav").exists()
    assert not (root / "outputs/evaluate/.resume").exists()
    logged = {k for _, m in tracker.metrics for k in m}
    assert set(res) <= logged  # same keys in MLflow
    # durations are run metadata: the tracker's timings (run record, MLflow time/...), not eval/metrics.json
    assert {"lm/dual/train_s", "lm/v2a/train_s", "lm_s", "recon/encode_s", "recon/decode_s", "recon_s", "stability_s",
            "evaluate_s"} <= set(tracker.timings), tracker.timings
    assert not [k for k in res if k.endswith("_s")]


def test_evaluate_acceptance_on_structured_tokens(toy_root):
    _, m, _ = toy_root
    assert m["lm/dual/vocals/ce"] < m["unigram/vocals/ce"] and m["lm/dual/acc/ce"] < m["unigram/acc/ce"]
    assert m["lm/v2a/acc/ce"] < m["unigram/acc_tail/ce"]
    assert m["lm/v2a/acc/ce"] < m["lm/dual/acc_tail/ce"]


def test_missing_tokens_error_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokens_train.npz"):
        load_token_split(tmp_path, "train")


class _BrokenDecoder(EchoTokenizer):
    def decode(self, toks): raise RuntimeError("the decoder produced NaN")


def test_a_broken_decode_fails_the_stage(toy_root, tmp_path):
    """A decode error is an error (the chain test must notice), not a note in results.md; so is a missing package."""
    root, _, _ = toy_root
    p = load_params(ROOT / "params.yaml", TOY + ["evaluate.lm_train.steps=2"])
    with pytest.raises(RuntimeError, match="NaN"):
        E.run(p, NullTracker(), root / "outputs/pre_encode", out_dir=tmp_path / "out", eval_dir=tmp_path / "eval",
              tokenizer=_BrokenDecoder(), test_items=audio_items(1))
    with pytest.raises(FileNotFoundError, match="packaged duotok tokenizer"):
        E.run(load_params(ROOT / "params.yaml", TOY + ["evaluate.lm_train.steps=2", f"evaluate.package={tmp_path / 'none'}"]),
              NullTracker(), root / "outputs/pre_encode", out_dir=tmp_path / "out2", eval_dir=tmp_path / "eval2",
              test_items=audio_items(1))
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.slow
def test_report_renders_with_figures(toy_root, tmp_path):
    pytest.importorskip("papermill")
    from duotok.stages.report import run as report_run
    root, _, _ = toy_root
    m = report_run(load_params(ROOT / "params.yaml"), NullTracker(), out_dir=tmp_path / "report", root=root)
    assert m["report/errors"] == 0 and m["report/figures"] >= 5, m
    assert (tmp_path / "report/report.html").stat().st_size > 100_000
