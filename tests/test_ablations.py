"""The ablation study (duotok.ablate, duotok.acoustic; issue 21): the variants differ from duotok where they should and
nowhere else, the switches do what they say at toy size, and the report is built from per-run metrics files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from duotok import ablate as A
from duotok.config import EncoderConfig, load_params
from duotok.models.codebook import CodebookModel
from duotok.models.encoder import MusicEncoder
from duotok.models.finetune import FinetuneModel
from duotok.synthetic import stem_segments
from duotok.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[1]
PLAN = A.load_plan(ROOT / A.PLAN)


def _params(name, seed=0):
    return load_params(ROOT / "params.yaml", A.run_overrides(PLAN, name, seed, params_file=ROOT / "params.yaml"))


def test_variants_differ_from_duotok_only_where_they_should():
    base = _params("duotok").flat()
    want = {"shared_codebook": {"ablate.routing"}, "mix_codebook": {"ablate.routing"}, "noise_off": {"finetune.noise.enabled"},
            "asr_head_off": {"finetune.lambdas.asr/frame"}, "mel_head_off": {"finetune.lambdas.mel/l1"},
            "chroma_head_off": {"finetune.lambdas.chroma/l1"}, "mss_head_off": {"finetune.lambdas.mss/l1"},
            "freeze_off": {"finetune.freeze.enabled"}, "no_stage1": {"ablate.finetune_init"}, "acoustic_rvq": set()}
    for name, keys in want.items():
        flat = _params(name).flat()
        assert {k for k, v in flat.items() if base[k] != v and k != "evaluate.package"} == keys, name
    # duotok itself is the default configuration with fewer steps, the study's seeds and evaluation settings
    default = load_params(ROOT / "params.yaml").flat()
    changed = {k for k, v in base.items() if default[k] != v}
    assert changed <= {*(f"{s}.steps" for s in A.STEP_KEYS), *(f"{s}.warmup_steps" for s in A.STEP_KEYS), *A.SEED_KEYS,
                       "evaluate.package", *(c.split("=")[0] for c in PLAN["common"])}, changed
    # the token LMs are the measuring instrument: the default's steps, unscaled
    assert _params("duotok", 1).finetune.train.seed == 1
    assert _params("duotok", 1).evaluate.lm_train.steps == load_params(ROOT / "params.yaml").evaluate.lm_train.steps


def _finetune_model(P):
    torch.manual_seed(0)
    return FinetuneModel(MusicEncoder(EncoderConfig(width=32, layers=2, lower_layers=1, heads=2, conv_channels=16), P.audio),
                         P.finetune, ["_", "a", "b", "c", " ", "d"])


@pytest.fixture(scope="module")
def codebooks(tmp_path_factory):
    "The codebook stage at toy size with routing dual, shared and mix: {routing: (metrics, model, config)}."
    from duotok.stages import codebook
    from duotok.synthetic import mix_segments
    out = {}
    for routing in ("dual", "shared", "mix"):
        P = load_params(ROOT / "params.yaml", ["audio.n_mels=16", "audio.codebook_size=16", "finetune.bottleneck_dim=8",
                                               "codebook.train.steps=6", "codebook.train.batch_size=8",
                                               "codebook.train.warmup_steps=1", "codebook.train.val_every=0",
                                               "codebook.train.ckpt_every=0", f"ablate.routing={routing}"])
        d = tmp_path_factory.mktemp(routing)
        torch.manual_seed(0)
        data = ({"train": mix_segments(24, n_mels=16, frames=80), "val": mix_segments(8, n_mels=16, frames=80, seed=1)}
                if routing == "mix" else {"train": stem_segments(24), "val": stem_segments(8, seed=1)})
        met = codebook.run(P, NullTracker(), data, finetune=_finetune_model(P), out_dir=d)
        out[routing] = (met, *CodebookModel.from_checkpoint(d))
    return out


def test_shared_codebook_quantizes_both_tracks_with_one_codebook(codebooks):
    from duotok.models.codebook import dual_batch
    _, shared, cfg = codebooks["shared"]
    _, dual, cfg_dual = codebooks["dual"]
    bv, ba = shared.quantizer.branches["vocals"], shared.quantizer.branches["acc"]
    assert torch.allclose(bv.codebook, ba.codebook) and torch.equal(bv.proj_in[1].weight, ba.proj_in[1].weight)
    assert not torch.allclose(dual.quantizer.branches["vocals"].codebook, dual.quantizer.branches["acc"].codebook)
    b = dual_batch(torch.utils.data.default_collate(stem_segments(4, seed=2)))
    h = shared.encoder.lower(b["mel"])
    ids = shared.quantizer.encode(h, b["label"])
    assert torch.equal(ids, bv.encode(h))                      # accompaniment items get the vocal codebook's codes
    assert cfg["routing"] == "shared" and "routing" not in cfg_dual and cfg["model_id"] != cfg_dual["model_id"]


def test_mix_codebook_learns_one_codebook_from_mixes(codebooks):
    met, mix, cfg = codebooks["mix"]
    bv, ba = mix.quantizer.branches["vocals"], mix.quantizer.branches["acc"]
    assert torch.allclose(bv.codebook, ba.codebook)            # one codebook, saved twice: the tokenizer loads it as dual
    assert cfg["routing"] == "mix" and cfg["model_id"] != codebooks["shared"][2]["model_id"]
    # trained on mixes only: the vocal branch's usage is measured, there are no accompaniment items to count
    assert "val/usage/vocals_used_frac" in met and "val/usage/acc_used_frac" not in met
    assert met["steps"] == 6 and met["check/no_nan"]
    # the stems are then tokenized with that one codebook, as a mix tokenizer is used for dual-track LMs
    from duotok.models.codebook import dual_batch
    b = dual_batch(torch.utils.data.default_collate(stem_segments(4, seed=2)))
    h = mix.encoder.lower(b["mel"])
    assert torch.equal(mix.quantizer.encode(h, b["label"]), bv.encode(h))


def test_noise_off_and_random_init_change_the_stage2_model():
    P, Q = _params("duotok"), _params("noise_off")
    on, off = _finetune_model(P).train(), _finetune_model(Q).train()
    z = torch.randn(2, 50, P.finetune.bottleneck_dim)
    assert torch.equal(off.noise(z), z) and on.noise.current_p > 0 and off.noise.current_p == 0
    from duotok.models.finetune import reinit_encoder
    enc = _finetune_model(P).encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    torch.manual_seed(1)
    reinit_encoder(enc)
    after = enc.state_dict()
    assert torch.equal(before["mel_mean"], after["mel_mean"])
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2


def test_acoustic_codec_has_duotoks_bitrate_and_one_stream_per_track():
    from duotok.acoustic import AcousticCodec
    from duotok.synthetic import audio_items
    from duotok.vae import build_vae
    P = load_params(ROOT / "params.yaml", profile=ROOT / "params/toy.yaml")
    torch.manual_seed(0)
    codec = AcousticCodec(build_vae(P.vae, P.audio), P.audio.codebook_size, P.ablate.acoustic.quantizers, P.audio.token_rate)
    it = audio_items(3, seconds=1.0)
    lat = codec.vae.encode(torch.stack([torch.as_tensor(x["wav48_vocals"]) for x in it]))
    codec.fit(lat, steps=5, batch_size=2, generator=torch.Generator().manual_seed(0))
    tok = codec.encode(it[0]["wav48_vocals"], it[0]["wav48_acc"], P.audio.sample_rate)
    assert tok.vocals.shape == tok.accompaniment.shape == (25,) and tok.token_rate == P.audio.token_rate
    assert codec.bits_per_second == 2 * P.audio.token_rate * np.log2(P.audio.codebook_size)   # duotok's bitrate


def _fake_run(root, name, seed, ppl, mel, sha="f00d", results=None):
    "A finished run's folder (run.json, eval/metrics.json) and, as `run_variant` ends, its row in `results`."
    rd = A.run_dir(name, seed, root)
    (rd / "eval").mkdir(parents=True)
    (rd / "run.json").write_text(json.dumps({"variant": name, "seed": seed, "git_sha": sha, "wall_s": {"evaluate": 10.0}}))
    m = {"lm/dual/overall/ppl_1024": ppl, "lm/v2a/acc/ppl_1024": ppl * 0.8, "recon/vocals/mel_l1": mel,
         "recon/acc/mel_l1": mel, "recon/mix/mel_l1": mel, "usage/vocals/usage": 0.9, "usage/acc/usage": 0.8, "kbps": 0.4,
         "stability/test/gain_3db/vocals": 1.0, "stability/test/noise_30db/acc": 0.5, "stability/test/noise_30db/acc_active": 0.0,
         "unigram/overall/ppl_1024": 4 * ppl, "unigram/acc_tail/ppl_1024": 2 * ppl}
    (rd / "eval" / "metrics.json").write_text(json.dumps(m))
    return A.write_result(rd, results if results is not None else root.parent / "results")


def test_report_from_fake_runs(tmp_path):
    runs = tmp_path / "runs"
    for seed, (dp, op, ap) in enumerate([(50.0, 80.0, 400.0), (54.0, 84.0, 420.0)]):
        _fake_run(runs, "duotok", seed, dp, 1.5)
        _fake_run(runs, "noise_off", seed, op, 1.5 + 0.01 * seed)
        _fake_run(runs, "acoustic_rvq", seed, ap, 2.5)
    _fake_run(runs, "shared_codebook", 0, 60.0, 1.6)
    # a row written before the unigram columns existed (an older study's) still reads, as n/a there
    old = json.loads(_fake_run(runs, "freeze_off", 0, 70.0, 1.7).read_text())
    for k in ("ppl_dual_rel", "ppl_v2a_rel"): old.pop(k)
    (tmp_path / "results" / "freeze_off-s0.json").write_text(json.dumps(old))
    import shutil
    shutil.rmtree(runs)                                        # the report needs only the rows (in git), not the run folders
    out = A.table(tmp_path / "results", ROOT / A.PLAN, tmp_path / "ablations.md", note="FAKE METRICS")
    md = out.read_text()
    assert (tmp_path / "ablations_pareto.png").stat().st_size > 1000
    row = next(l for l in md.splitlines() if l.startswith("| duotok |") and "±" in l)
    assert "| 52 ± 2 |" in row and "| 0.75 ± 0 |" in row           # PPL mean ± half-range; stability (1.0 + 0.5) / 2
    assert "| 0.25 ± 0 | 0.4 ± 0 |" in row                          # ÷ unigram: dual 1/4, v2a 0.8/2
    frz = next(l for l in md.splitlines() if l.startswith("| freeze_off |") and "seed" in l)
    assert "| 70 (1 seed) | 56 (1 seed) | n/a | n/a |" in frz, frz
    assert "supported" in next(l for l in md.splitlines() if l.startswith("| Noise lowers PPL"))
    assert "supported: acoustic PPL 7.9x" in md
    assert "not measured" in next(l for l in md.splitlines() if l.startswith("| Dual codebooks beat a mix"))
    assert "1 seed" in next(l for l in md.splitlines() if l.startswith("| shared_codebook |") and "seed" in l)
    assert "`f00d`" in md and "> **FAKE METRICS**" in md
    summary = json.loads((tmp_path / "ablations.json").read_text())["summary"]
    assert summary["noise_off"]["ppl_dual"][:2] == [82.0, 2.0]
