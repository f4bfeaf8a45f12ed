"BEST-RQ objective and the ssl stage: frozen quantizer, masking, loss, checkpoint, resume after a kill."
import json

import pytest
import torch
from vector_quantize_pytorch import RandomProjectionQuantizer

from _helpers import ROOT, audio, section
from duotok.config import EncoderConfig, load_params
from duotok.models.encoder import MusicEncoder, load_encoder
from duotok.ssl import RandomProjectionTargets, bestrq_validate, build_bestrq, load_bestrq, save_bestrq, span_mask
from duotok.tracking import NullTracker

torch.set_num_threads(1)
ECFG = EncoderConfig(width=32, layers=2, lower_layers=1, heads=2, conv_channels=16)
AUDIO = audio(n_mels=32)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_bestrq(section("ssl", encoder=ECFG, rpq_codebook_size=64, rpq_dim=8, **kw), AUDIO)


def test_rpq_matches_library():
    ours = RandomProjectionTargets(128, 256, 16, 1, seed=7)
    lib = RandomProjectionQuantizer(dim=128, codebook_size=256, codebook_dim=16, num_codebooks=1)
    lib.rand_projs.copy_(ours.rand_projs)
    lib.vq._codebook.embed.copy_(ours.codebook)
    x = torch.randn(3, 40, 128) * 5 + 2
    assert torch.equal(ours(x)[..., 0], lib(x))


def test_quantizer_frozen_and_deterministic(tmp_path):
    m = make_model(rpq_codebooks=2)
    assert list(m.quantizer.parameters()) == []
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith("quantizer"))
    mel = torch.randn(4, 32, 200)
    t0 = m.targets(mel).clone()
    assert t0.shape == (4, 50, 2)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = m(mel).losses["mlm/ce"]; opt.zero_grad(); loss.backward(); opt.step()
    assert torch.equal(m.targets(mel), t0)                             # unchanged by training
    save_bestrq(tmp_path, m)
    assert torch.equal(load_bestrq(tmp_path).targets(mel), t0)         # identical when rebuilt
    # same seed -> same quantizer without any checkpoint
    assert torch.equal(make_model(seed=3, rpq_codebooks=2).targets(mel), t0)
    assert load_bestrq(tmp_path).cfg == m.cfg
    enc = load_encoder(tmp_path)
    assert torch.equal(enc.upper_blocks[0].qkv.weight, m.encoder.upper_blocks[0].qkv.weight)


def test_span_mask_fraction_and_spans():
    g = torch.Generator().manual_seed(0)
    m = span_mask(200, 100, 10, 0.6, g)
    assert abs(m.float().mean().item() - 0.6) < 0.03
    with pytest.raises(ValueError):
        span_mask(1, 10, 0, 0.5)


def test_masked_frames_replaced_by_noise():
    m = make_model(mask_noise_std=0.1)
    seen = {}
    m.encoder.subsampler.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach().clone()))
    mel = torch.randn(2, 32, 400) * 3 + 1
    out = m(mel, generator=torch.Generator().manual_seed(0))
    fmask = out.token_mask.repeat_interleave(4, dim=1)                 # (B, F)
    x, ref = seen["x"], m.encoder.normalize(mel)
    masked = x.permute(0, 2, 1)[fmask]
    assert abs(masked.std().item() - 0.1) < 0.01 and abs(masked.mean().item()) < 0.01
    assert torch.allclose(x.permute(0, 2, 1)[~fmask], ref.permute(0, 2, 1)[~fmask])


def test_loss_only_on_masked_positions():
    m = make_model()
    mel = torch.randn(2, 32, 200)
    out = m(mel, generator=torch.Generator().manual_seed(1))
    sel = out.token_mask & out.valid
    lg = out.logits[sel].flatten(0, 1); tg = out.targets[sel].flatten()
    assert torch.allclose(out.losses["mlm/ce"], torch.nn.functional.cross_entropy(lg, tg))
    assert 0.3 < out.losses["mlm/mask_frac"] < 0.9


def test_one_step_lowers_loss_on_fixed_batch():
    m = make_model()
    mel = torch.randn(8, 32, 200)
    f = lambda: m(mel, generator=torch.Generator().manual_seed(0)).losses["mlm/ce"]
    l0 = f().item()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    opt.zero_grad(); f().backward(); opt.step()
    assert f().item() < l0


def test_validate_reports_constant_baseline():
    m = make_model()
    batches = [{"mel_mix": torch.randn(2, 32, 200)} for _ in range(2)]
    v1, v2 = bestrq_validate(m, batches), bestrq_validate(m, batches)
    assert v1 == v2                                                      # fixed val masks
    assert 0 < v1["mlm/const_acc"] <= 1 and 0 <= v1["mlm/acc"] <= 1 and 0 < v1["mlm/code_usage"] <= 1


# ---------------------------------------------------------------- the stage, resume after a kill
class Toy(torch.utils.data.Dataset):
    def __init__(self, n, seed, die_after=None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 128, 40, generator=g)
        self.die_after, self.calls = die_after, 0
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after: raise KeyboardInterrupt("simulated kill")
        return {"mel_mix": self.x[i]}


TOY = ["ssl.encoder.width=32", "ssl.encoder.layers=2", "ssl.encoder.lower_layers=1", "ssl.encoder.heads=2",
       "ssl.encoder.conv_channels=16", "ssl.rpq_codebook_size=32", "ssl.train.batch_size=2",
       "ssl.train.val_every=0", "ssl.train.warmup_steps=1", "ssl.train.log_every=1"]


def test_stage_resumes_after_kill(tmp_path):
    from duotok.stages.ssl import run
    p = load_params(ROOT / "params.yaml", TOY + ["ssl.train.steps=6", "ssl.train.ckpt_every=2"])
    out = tmp_path / "ssl"
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):                       # dies mid-run, after the step-2 checkpoint
        # (the 16 train items are read once first for the encoder's input statistics, then 11 during training)
        run(p, NullTracker(), {"train": Toy(16, 0, die_after=16 + 11), "val": Toy(4, 1), "manifest": {}}, out_dir=out)
    assert not (out / "model.safetensors").exists()
    m = run(p, NullTracker(), {"train": Toy(16, 0), "val": Toy(4, 1), "manifest": {}}, out_dir=out)
    assert m["resumed_from"] in (2, 4) and m["steps"] == 6
    cfg = json.loads((out / "model.json").read_text())["config"]
    assert cfg["kind"] == "ssl" and cfg["encoder"]["width"] == 32 and cfg["ssl"]["rpq_codebook_size"] == 32
    assert cfg["audio"]["n_mels"] == p.audio.n_mels
    assert "val/mlm/acc" in m and "val/mlm/const_acc" in m


# ---------------------------------------------------------------- linear probe (duotok.probe)
def _fake_preprocess(root, n=6, n_mels=32, segment_s=1.6, seed=0):
    """A tiny song index (train + val songs of one `segment_s` grid segment each) whose audio carries the `singing`
    label: in every other song a loud vocal tone sings one syllable over the whole segment, the others are silent
    instrumentals. Drums are silent in every other song; tags name a source and a voice."""
    import numpy as np
    from _corpus import index_corpus, write_song
    sr, songs = 44100, root.parent / f"{root.name}_songs"
    t = np.arange(int(segment_s * sr)) / sr
    for sp in ("train", "val"):
        for i in range(n):
            sung = i % 2 == 0
            meta = {"split": sp, "language": "en", "tags": [["chorale", "folk", "pop"][i % 3], ["female", "male"][(i // 2) % 2]]}
            if sung: meta["lyrics"] = [dict(text="la", start=0.0, end=segment_s, word=0)]
            write_song(songs / sp / f"s{i}", secs=segment_s, sr=sr, seed=seed + i, meta=meta,
                       silent=("vocals",) if not sung else ("drums",) if i % 4 == 0 else (),
                       vocals=0.3 * np.sin(2 * np.pi * (220 + 20 * i) * t) if sung else None)
    return index_corpus(songs, root.parent / f"{root.name}_work", segment_s=segment_s, n_mels=n_mels)


def test_linear_probe_informative_features_beat_random():
    from duotok.probe import RIDGE_GRID, ProbeLabel, linear_probe
    g = torch.Generator().manual_seed(0)
    def split(n):
        y = torch.randint(0, 4, (n, 25), generator=g)
        good = torch.randn(n, 25, 16, generator=g)
        good[..., :4] += 3 * torch.nn.functional.one_hot(y, 4)                # the label is linearly readable
        return good, torch.randn(n, 25, 16, generator=g), ProbeLabel(y, torch.ones_like(y, dtype=torch.bool))
    (g_tr, r_tr, l_tr), (g_te, r_te, l_te) = split(40), split(12)
    songs = torch.arange(40) // 4                                                # 10 train "songs" of 4 segments
    good, rand = linear_probe(g_tr, l_tr, g_te, l_te, songs), linear_probe(r_tr, l_tr, r_te, l_te, songs)
    maj_class = torch.bincount(l_tr.y.flatten()).argmax()
    assert good.majority == rand.majority == pytest.approx(float((l_te.y == maj_class).float().mean()))
    assert good.acc > 0.9 and good.balanced > 0.9                                 # the label is found
    assert rand.acc < good.majority + 0.1 and abs(rand.balanced - 0.25) < 0.1     # noise: chance level
    assert good.n_train == 1000 and good.n_test == 300 and good.reg in RIDGE_GRID
    assert linear_probe(g_tr, l_tr, g_te, l_te, method="logistic").acc > 0.9                # the fixed-C logistic probe too
    # a label carried by one small-scale dimension among 15 noise dimensions is found (features are standardised)
    weak_tr, weak_te = r_tr.clone(), r_te.clone()
    weak_tr[..., 0] = 0.05 * l_tr.y + 0.01 * weak_tr[..., 0]; weak_te[..., 0] = 0.05 * l_te.y + 0.01 * weak_te[..., 0]
    bin_tr, bin_te = ProbeLabel((l_tr.y > 1).long(), l_tr.valid), ProbeLabel((l_te.y > 1).long(), l_te.valid)
    assert linear_probe(weak_tr, bin_tr, weak_te, bin_te, songs).acc > 0.95
    # `valid` restricts both fitting and scoring; max_train subsamples the fit
    half = ProbeLabel(l_te.y, l_te.y < 2)
    assert linear_probe(g_tr, l_tr, g_te, half, max_train=200).n_test == int((l_te.y < 2).sum())
    assert linear_probe(g_tr, l_tr, g_te, l_te, max_train=200).n_train == 200
    # a label with one class in train cannot be probed
    assert linear_probe(g_tr, ProbeLabel(torch.zeros_like(l_tr.y), l_tr.valid), g_te, l_te) is None


def test_segment_labels_and_random_twin():
    from duotok.probe import corpus_labels, random_twin
    cm = torch.rand(2, 12, 5)
    lab = corpus_labels(cm, cm, torch.tensor([[0, 3, 3, 0, 1]] * 2), torch.tensor([[-200., -60, -40, -10, -49]] * 2),
                        [["chorale", "male"], ["odd"]])
    assert lab["singing"].y[0].tolist() == [0, 1, 1, 0, 1] and lab["drums"].y[0].tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(lab["melody_pc"].valid, lab["singing"].y.bool())
    assert lab["source"].y[0] == 0 and lab["source"].valid.tolist() == [True, False] and lab["voice"].valid.tolist() == [True, False]
    enc = MusicEncoder(ECFG, AUDIO); enc.set_normalization(torch.randn(32), torch.rand(32) + 0.5)
    state = torch.random.get_rng_state()
    a, b = random_twin(enc, 5), random_twin(enc, 5)
    assert torch.equal(torch.random.get_rng_state(), state)                       # global RNG untouched
    assert torch.equal(a.upper_blocks[0].qkv.weight, b.upper_blocks[0].qkv.weight) and torch.equal(a.mel_mean, enc.mel_mean)
    assert not torch.equal(a.upper_blocks[0].qkv.weight, enc.upper_blocks[0].qkv.weight)


def test_probe_ssl_on_a_preprocess_folder(tmp_path):
    from duotok.probe import probe_ssl
    root = _fake_preprocess(tmp_path / "pre")
    enc = MusicEncoder(ECFG, AUDIO)
    m = probe_ssl(data_root=root, encoder=enc, verbose=False)
    labels = ("singing", "melody_pc", "mix_pc", "drums", "source", "voice")
    assert m["probe/layer"] == ECFG.lower_layers - 1
    assert all(f"probe/{l}/{k}" in m for l in labels for k in ("trained", "random", "majority", "input", "diff_lo", "diff_hi"))
    assert all(m[f"probe/{l}/diff_lo"] <= m[f"probe/{l}/trained"] - m[f"probe/{l}/random"] + 1e-9 for l in labels)
    assert m["probe/singing/input"] > 0.95 > m["probe/singing/majority"] + 0.2      # the planted label is found in the input
    assert m["probe/drums/input"] >= m["probe/drums/majority"] - 0.1                # no drum cue in this mel: near majority


def test_stage_reports_probe(tmp_path):
    from duotok.stages.ssl import run
    root = _fake_preprocess(tmp_path / "pre", n_mels=128)
    p = load_params(ROOT / "params.yaml", TOY + ["ssl.train.steps=2", "ssl.train.ckpt_every=2"])
    m = run(p, NullTracker(), out_dir=tmp_path / "ssl", data_root=root)
    assert m["steps"] == 2 and m["probe/layer"] == 0 and 0 <= m["probe/singing/trained"] <= 1
    assert m["probe/singing/input"] > 0.95 and "probe/singing/random" in m
    off = run(load_params(ROOT / "params.yaml", TOY + ["ssl.train.steps=2", "ssl.probe.enabled=false"]), NullTracker(),
              out_dir=tmp_path / "ssl2", data_root=root)
    assert not any(k.startswith("probe/") for k in off)


def test_stage_trains_on_a_split_smaller_than_the_batch_and_refuses_an_empty_one(tmp_path):
    """A train split with fewer segments than the batch used to give zero batches (drop_last) and a loop that
    never ended; `duotok.data.make_loader` gives one smaller batch, and refuses an empty split by name."""
    from duotok.stages.ssl import run
    p = load_params(ROOT / "params.yaml", TOY + ["ssl.train.steps=3", "ssl.train.ckpt_every=0", "ssl.probe.enabled=false"])
    m = run(p, NullTracker(), {"train": Toy(1, 0), "val": Toy(2, 1), "manifest": {}}, out_dir=tmp_path / "one")
    assert m["steps"] == 3                                    # 1 segment < batch 2: 3 epochs of one batch
    with pytest.raises(ValueError, match=r"ssl train split: the split has 0 items \(batch size 2\)"):
        run(p, NullTracker(), {"train": Toy(0, 0), "val": Toy(2, 1), "manifest": {}}, out_dir=tmp_path / "none")
