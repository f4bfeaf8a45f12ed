"""Tests of duotok.lm: layouts, KV-cache sampling, metrics, and learning on structured synthetic tokens."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from duotok import lm as L
from duotok.config import TrainConfig
from duotok.tracking import NullTracker
from duotok.train import fit

V, T, P = 32, 24, 6


def tiny(max_len=64, V=V):
    return L.TokenLM(L.TokenLMConfig((V, V), layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, max_len=max_len))


def test_config_rejects_bad_heads_and_paper_size_is_about_right():
    with pytest.raises(ValueError):
        L.TokenLMConfig((8, 8), hidden=30, heads=4)
    cfg = L.TokenLMConfig((32768, 32768), layers=10, hidden=768, heads=12, kv_heads=2, ffn=3072, max_len=1024)
    with torch.device("meta"):
        m = L.TokenLM(cfg)
    n = sum(p.numel() for p in m.parameters())
    emb_heads = 2 * 2 * 32771 * 768
    assert 0.9 * (emb_heads + 10 * 8.6e6) < n < 1.1 * (emb_heads + 10 * 8.6e6), n
    assert m.backbone.config.num_key_value_heads == 2 and m.backbone.config.rope_parameters["rope_theta"] == 1e6


def test_layouts_and_validation():
    v, a = np.arange(4)[None], np.arange(4, 8)[None]
    d = L.build_sequences(v, a, (8, 8), "dual", prompt=2)
    tg = d.ids[:, :, 1:]
    assert tg[d.train_mask].tolist() == [0, 1, 2, 3, 9, 4, 5, 6, 7, 9]  # codes + EOS (9) of each stream, never SOS
    assert tg[d.score_mask].tolist() == [0, 1, 2, 3, 9, 6, 7, 9]
    assert tg[d.score_no_eos_mask].tolist() == [0, 1, 2, 3, 6, 7]
    c = L.build_sequences(v, a, (8, 8), "v2a", prompt=2)
    assert c.ids.shape == (1, 2, 12)
    assert c.ids[0, :, 1:][c.score_mask[0]].tolist() == [6, 7, 9]
    assert c.ids[0, :, 1:][c.score_no_eos_mask[0]].tolist() == [6, 7]
    assert sorted(c.ids[0, :, 1:][c.train_mask[0]].tolist()) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 9]
    with pytest.raises(ValueError, match="outside"):
        L.build_sequences(v, a + 10, (8, 8))
    with pytest.raises(ValueError, match="protocol"):
        L.build_sequences(v, a, (8, 8), "mix")
    with pytest.raises(ValueError, match="max_len"):
        tiny(max_len=8)(c.ids)


class ConstantLM(torch.nn.Module):
    "A fixed model: every position of every stream predicts the same hand-set distribution `p` (V + 3 entries)."
    K = 2

    def __init__(self, p):
        super().__init__()
        self.register_buffer("logp", torch.tensor(p, dtype=torch.float32).log())

    def forward(self, ids):
        B, _, Lx = ids.shape
        return L.LMOutput([self.logp.expand(B, Lx, -1) for _ in range(self.K)])


# V = 4; ids 0..3, SOS 4, EOS 5, PAD 6; probabilities -> bits: 2, 2, 3, 3, (SOS) 4, (EOS) 3, (PAD) 4
P_FIXED = [1 / 4, 1 / 4, 1 / 8, 1 / 8, 1 / 16, 1 / 8, 1 / 16]


def test_ppl_at_1024_both_conventions_by_hand():
    """Benchmark convention (targets `[tokens, EOS]`, SOS never scored) and the codes-only figure on a fixed model.
    vocals [0, 2, 3]: codes 2, 3, 3 bits, EOS 3 bits; accompaniment [1, 1, 2]: codes 2, 2, 3 bits, EOS 3 bits."""
    m = ConstantLM(P_FIXED)
    d = L.build_sequences(np.array([[0, 2, 3]]), np.array([[1, 1, 2]]), (4, 4), "dual")
    ln2 = math.log(2)
    ce = L.score_lm(m, d)
    assert ce["vocals"] == pytest.approx(11 / 4 * ln2, rel=1e-6) and ce["acc"] == pytest.approx(10 / 4 * ln2, rel=1e-6)
    bench = L.stream_metrics(ce, (4, 4))["overall/ppl_1024"]
    assert bench == pytest.approx(2 ** (21 / 8) * 1024 / 4, rel=1e-6)          # exp(mean_k CE_k) * 1024 / V
    ce0 = L.score_lm(m, d, mask="score_no_eos_mask")
    codes = L.no_eos_metrics(ce0, {"vocals": 4, "acc": 4})
    assert codes["vocals/ce_no_eos"] == pytest.approx(8 / 3 * ln2, rel=1e-6)
    assert codes["overall/ppl_1024_no_eos"] == pytest.approx(2 ** (15 / 6) * 1024 / 4, rel=1e-6)
    # v2a, prompt 1: scored accompaniment targets 1, 2, EOS -> (2 + 3 + 3) / 3 bits; without EOS (2 + 3) / 2
    c = L.build_sequences(np.array([[0, 2, 3]]), np.array([[1, 1, 2]]), (4, 4), "v2a", prompt=1)
    assert L.score_lm(m, c)["acc"] == pytest.approx(8 / 3 * ln2, rel=1e-6)
    assert L.score_lm(m, c, mask="score_no_eos_mask")["acc"] == pytest.approx(5 / 2 * ln2, rel=1e-6)
    assert math.isnan(L.score_lm(m, c)["vocals"])


def test_scoring_equals_the_benchmark_loss_on_its_label_layout():
    """Codec-Evaluation's `data_process` labels each stream `[SOS, tokens, EOS]` (pad -100) and scores it with
    transformers' `ForCausalLMLoss` (labels shifted by one): the same mean CE as `score_lm` on the dual layout."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    torch.manual_seed(0)
    model = tiny()
    v, a = np.random.default_rng(0).integers(0, V, (2, 2, 10))
    d = L.build_sequences(v, a, (V, V), "dual")
    ours = L.score_lm(model, d)
    with torch.no_grad():
        logits = model(d.ids).logits  # the benchmark feeds the whole [SOS, tokens, EOS] sequence
    for k, s in enumerate(L.STREAM_NAMES):
        ref = ForCausalLMLoss(logits[k].float(), d.ids[:, k].clone(), vocab_size=V + L.N_SPECIAL)
        assert ours[s] == pytest.approx(ref.item(), rel=1e-5)


def test_ppl_metrics_definitions():
    m = L.ppl_metrics(math.log(152.0), 32768)
    assert m["ppl"] == pytest.approx(152.0)
    assert m["ppl_1024"] == pytest.approx(152.0 * 1024 / 32768)  # paper: raw 152 <-> PPL@1024 4.75
    assert m["bpt"] == pytest.approx(math.log2(152.0))
    assert m["bpt_norm"] == pytest.approx(math.log2(152.0) / 15)
    s = L.stream_metrics({"vocals": 1.0, "acc": 3.0}, (16, 16))
    assert s["overall/ce"] == pytest.approx(2.0) and s["overall/ppl_1024"] == pytest.approx(math.exp(2) * 64)


def test_unigram_baseline():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.125, 0.125])
    tr, te = rng.choice(4, 20000, p=p), rng.choice(4, 20000, p=p)
    ce, _ = L.unigram_ce(tr, te, 4, eos=False)
    assert ce == pytest.approx(-(p * np.log(p)).sum(), abs=0.01)
    assert math.isnan(L.unigram_ce(tr, [], 4)[0])
    # with EOS (default): each test sequence of T codes adds one EOS target, p(EOS) = 1 / (T + 1) in the train data
    seqs = rng.choice(4, (500, 9), p=p)
    ce_e, _ = L.unigram_ce(seqs, seqs, 4)
    h = -(p * np.log(p)).sum()
    assert ce_e == pytest.approx((9 * (h + math.log(10 / 9)) + math.log(10)) / 10, abs=0.02)


def test_kv_cache_sampling_matches_full_recompute_and_is_seeded():
    torch.manual_seed(0)
    m = tiny()
    vv = torch.randint(0, V, (2, 8))
    pr = torch.randint(0, V, (2, 2))
    g1 = L.generate_accompaniment(m, vv, pr, temperature=1.0, generator=torch.Generator().manual_seed(3))
    g2 = L.generate_accompaniment(m, vv, pr, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert g1.shape == (2, 6) and torch.equal(g1, g2) and int(g1.max()) < V
    greedy = L.generate_accompaniment(m, vv, pr, temperature=0)
    acc = pr.clone()  # recompute each greedy step without the cache
    for _ in range(6):
        filler = torch.zeros(2, 8 - acc.shape[1], dtype=torch.long)
        b = L.build_sequences(vv, torch.cat([acc, filler], 1), (V, V), "v2a")
        pos = 8 + 2 + acc.shape[1]  # input position whose output predicts the next accompaniment token
        logits = m(b.ids[:, :, :pos + 1]).logits[1][:, -1, :V]
        acc = torch.cat([acc, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, acc[:, 2:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "Train both protocols briefly with duotok.train.fit on structured synthetic streams (same rules, split)."
    v_all, a_all = L.synthetic_streams(320, T, V, seed=0)
    v_tr, a_tr, v_te, a_te = v_all[:256], a_all[:256], v_all[256:], a_all[256:]
    cfg = TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, weight_decay=0.01, grad_clip=1.0,
                      val_every=0, ckpt_every=0, log_every=50, seed=0, mixed_precision="no", num_workers=0)
    res = {}
    for proto in L.PROTOCOLS:
        tr = L.build_sequences(v_tr, a_tr, (V, V), proto, prompt=P)
        te = L.build_sequences(v_te, a_te, (V, V), proto, prompt=P)
        torch.manual_seed(0)
        model = tiny()
        loader = DataLoader(tr, batch_size=cfg.batch_size, shuffle=True)
        fit(model, L.lm_loss, loader, cfg, tmp_path_factory.mktemp(proto) / "lm", NullTracker(), {"lm/ce": 1.0},
            progress=False)
        res[proto] = L.score_lm(model, te)
    uni = {"vocals": L.unigram_ce(v_tr, v_te, V)[0], "acc": L.unigram_ce(a_tr[:, P:], a_te[:, P:], V)[0]}
    return res, uni


def test_lm_beats_unigram_on_both_protocols(trained):
    res, uni = trained
    assert res["dual"]["vocals"] < uni["vocals"] - 0.3, (res, uni)
    assert res["dual"]["acc"] < uni["acc"] - 0.3, (res, uni)
    assert res["v2a"]["acc"] < uni["acc"] - 0.3, (res, uni)
    assert math.isnan(res["v2a"]["vocals"])  # vocals are prompt only in v2a


def test_vocal_conditioning_helps_accompaniment(trained):
    res, _ = trained
    assert res["v2a"]["acc"] < res["dual"]["acc"] - 0.1, res
