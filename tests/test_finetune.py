"Stage 2: bottleneck noise, progressive freezing invariants, heads, FinetuneModel checkpoint, the stage + resume."
import json

import pytest
import torch

from _helpers import ROOT, audio, section
from duotok.config import EncoderConfig, FreezeConfig, NoiseConfig, load_params
from duotok.heads import (cer_wer, frame_ce, greedy_decode, mss_loss, separate, separation_sisdr, trivial_asr_baselines)
from duotok.audio import stft
from duotok.models.encoder import MusicEncoder
from duotok.models.finetune import FinetuneModel, enabled_heads, finetune_losses
from duotok.noise import GaussianReplacementNoise, ProgressiveFreezer
from duotok.synthetic import mix_segments
from duotok.tracking import NullTracker

torch.set_num_threads(1)
VOCAB = ["_", "a", "b", "c", " ", "d"]


def tiny_model(p=0.3):
    torch.manual_seed(0)
    enc = MusicEncoder(EncoderConfig(width=32, layers=6, lower_layers=3, heads=2, conv_channels=16), audio(n_mels=16))
    return FinetuneModel(enc, section("finetune", bottleneck_dim=8, noise=NoiseConfig(p=p)), VOCAB)


def finetune_loss(model, batch, heads=("ctc", "mel", "chroma", "mss")):
    return finetune_losses(model, batch, heads)


def tiny_batch(b=2, frames=41):
    g = torch.Generator().manual_seed(0)
    stems = torch.randn(b, 4, (frames - 1) * 240, generator=g) * 0.1
    return {"mel_mix": torch.randn(b, 16, frames, generator=g), "chroma_mix": torch.rand(b, 12, frames, generator=g),
            "lyric_ids": torch.tensor([[1, 2, 3], [4, 0, 0]])[:b], "lyric_len": torch.tensor([3, 1])[:b],
            "wav24_mix": stems.sum(1), "wav24_stems": stems}


# ------------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("mode", ["replace", "additive"])
@pytest.mark.parametrize("granularity", ["frame", "element"])
def test_noise_identity_at_eval(mode, granularity):
    n = GaussianReplacementNoise(NoiseConfig(p=0.5, mode=mode, granularity=granularity)).eval()
    z = torch.randn(4, 50, 8)
    assert torch.equal(n(z), z)


def test_noise_replace_fraction_and_statistics():
    z = -1.0 + 0.5 * torch.randn(16, 400, 8)
    n = GaussianReplacementNoise(NoiseConfig(p=0.25, sigma=1.0, sigma_mode="match")).train()
    y = n(z, generator=torch.Generator().manual_seed(0))
    fr = n.last_mask[..., 0]
    assert (n.last_mask == fr[..., None]).all()                               # whole frames
    assert abs(fr.float().mean().item() - 0.25) < 0.01
    assert torch.equal(y[~fr], z[~fr])
    rep = y[fr]
    assert abs(rep.mean().item() + 1.0) < 0.03 and abs(rep.std().item() - 0.5) < 0.03
    fixed = GaussianReplacementNoise(NoiseConfig(p=0.25, sigma=2.0, sigma_mode="fixed")).train()
    y2 = fixed(z, generator=torch.Generator().manual_seed(0))
    r2 = y2[fixed.last_mask[..., 0]]
    assert abs(r2.std().item() - 2.0) < 0.05 and abs(r2.mean().item()) < 0.05


def test_noise_additive_element_valid_and_schedule():
    z = torch.randn(8, 200, 16)
    n = GaussianReplacementNoise(NoiseConfig(p=0.5, sigma=0.1, mode="additive", sigma_mode="fixed", granularity="element")).train()
    valid = torch.ones(8, 200, dtype=torch.bool); valid[:, 150:] = False
    y = n(z, valid)
    assert abs(n.last_mask[:, :150].float().mean().item() - 0.5) < 0.02 and not n.last_mask[:, 150:].any()
    d = (y - z)[n.last_mask]
    assert abs(d.std().item() - 0.1) < 0.01 and torch.equal(y[~n.last_mask], z[~n.last_mask])
    s = GaussianReplacementNoise(NoiseConfig(p=0.4, warmup_steps=10))
    assert [round(s.set_step(k) or s.current_p, 3) for k in (0, 5, 10, 20)] == [0.0, 0.2, 0.4, 0.4]
    assert GaussianReplacementNoise(NoiseConfig(p=0.4, enabled=False)).current_p == 0.0


# ---------------------------------------------------------------------------------------- freezing
def trainable(m):
    return any(p.requires_grad for p in m.parameters())


def test_freezing_invariants_each_phase():
    model = tiny_model()
    units = model.freeze_units()
    assert [n for n, _ in units] == ["encoder.subsampler", "encoder.lower_blocks.0", "encoder.lower_blocks.1",
                                     "encoder.lower_blocks.2"]
    fr = ProgressiveFreezer(units, total_steps=100, cfg=FreezeConfig(start_fraction=0.2, end_fraction=0.6))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_batch()
    seen = []
    for step in range(100):
        fr.apply(step)
        k = fr.n_frozen(step)
        if step % 10: continue
        model.train()
        for i, (_, u) in enumerate(units):                     # bottom-up prefix frozen, in eval mode
            assert trainable(u) == (i >= k) and u.training == (i >= k)
        for part in (model.encoder.upper_blocks, model.bottleneck, model.heads, model.encoder.norm_out):
            assert trainable(part) and part.training                 # never frozen in stage 2
        before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        loss = sum(finetune_loss(model, batch, heads=("mel", "chroma")).values())
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        for n, p in model.named_parameters():
            if n in before: assert p.grad is None and torch.equal(p, before[n]), n
        seen.append(k)
    assert seen[0] == 0 and seen[-1] == 4 and sorted(seen) == seen and len(set(seen)) >= 3
    fr.apply(99)
    from duotok.core import assert_frozen
    model.train()
    for name, u in units: assert_frozen(u, name)                    # end: whole lower half frozen


def test_freezing_disabled():
    model = tiny_model()
    fr = ProgressiveFreezer(model.freeze_units(), 10, FreezeConfig(enabled=False))
    fr.apply(9)
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------- heads
def test_ctc_decode_and_baselines():
    lp = torch.full((1, 5, 4), -9.0)
    for t, i in enumerate([1, 1, 0, 1, 2]): lp[0, t, i] = 0
    assert greedy_decode(lp) == [[1, 1, 2]]
    assert cer_wer(["ab cd"], ["ab cd"]) == {"cer": 0.0, "wer": 0.0}
    b = trivial_asr_baselines(["la la la", "la"])
    assert b["cer_blank"] == 1.0 and b["cer_trivial"] <= 1.0


def test_frame_ce_targets_and_finetune_loss_term():
    fr = torch.tensor([[0, 3, 3, 1, 1, 0, 0]])
    perfect = torch.full((1, 7, 4), -30.0); perfect[0, torch.arange(7), fr[0]] = 0.0
    perfect = perfect.log_softmax(-1)
    assert frame_ce(perfect, fr) < 1e-6 and greedy_decode(perfect) == [[3, 1]]
    wrong = perfect.roll(1, dims=-1)
    assert frame_ce(wrong, fr) > 20
    # the frame targets are cropped / edge-padded to the model's token count
    assert torch.isfinite(frame_ce(perfect, torch.tensor([[0, 3, 3, 1, 1, 0, 0, 2, 2]])))
    model = tiny_model().train()
    b = tiny_batch()
    assert "asr/frame" not in finetune_loss(model, b)
    t = model(b["mel_mix"]).heads["ctc"].shape[1]
    out = finetune_loss(model, {**b, "lyric_frames": torch.randint(0, 6, (2, t))})
    assert torch.isfinite(out["asr/frame"]) and out["asr/frame"] > 0
    out["asr/frame"].backward()                                        # trains the CTC head and the encoder
    assert model.heads["ctc"].proj.weight.grad.abs().sum() > 0 and model.encoder.subsampler.parameters().__next__().grad is not None
    assert enabled_heads({"asr/ctc": 0.5, "asr/frame": 1.0, "mel/l1": 1.0}) == ("ctc", "mel")
    assert enabled_heads({"asr/ctc": 0.0, "asr/frame": 1.0}) == ("ctc",)


def test_fit_lr_mult_scales_matching_parameters(tmp_path):
    from duotok.config import TrainConfig
    from duotok.train import fit
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})
    a0, b0 = net["a"].weight.detach().clone(), net["b"].weight.detach().clone()
    x = torch.randn(16, 4)
    loss = lambda m, batch: {"l": (m["a"](batch) + m["b"](batch)).pow(2).mean()}
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, val_every=0,
                      ckpt_every=0, log_every=1, seed=0, mixed_precision="no", num_workers=0)
    fit(net, loss, torch.utils.data.DataLoader(x, batch_size=4), cfg, tmp_path / "o", NullTracker(), {"l": 1.0},
        progress=False, lr_mult={"a.": 0.0, "b.weight": 10.0})
    assert torch.equal(net["a"].weight, a0)                              # factor 0: frozen by its lr
    assert (net["b"].weight - b0).abs().max() > 0.1                      # 3 Adam steps at 0.1 (vs <= 0.03 at 1x)
    with pytest.raises(ValueError, match="match no trainable"):
        fit(net, loss, torch.utils.data.DataLoader(x, batch_size=4), cfg, tmp_path / "o2", NullTracker(), {"l": 1.0},
            progress=False, lr_mult={"nope.": 2.0})


def test_mss_ideal_masks_beat_mix():
    g = torch.Generator().manual_seed(0)
    stems = torch.randn(2, 4, 4000, generator=g) * torch.tensor([1.0, 0.3, 0.3, 0.1])[None, :, None]
    mix = stems.sum(1)
    S = stft(stems, 64, 16).abs()
    irm = S / S.sum(1, keepdim=True).clamp_min(1e-8)
    r = separation_sisdr(separate(irm, mix, 64, 16), stems, mix)
    assert (r["est"] > r["mix"]).all() and r["valid"].all()
    assert mss_loss(irm, mix, stems, 64, 16) < mss_loss(torch.full_like(irm, 0.25), mix, stems, 64, 16)


# ------------------------------------------------------------------------------------------- model
def test_composition_checkpoint_and_head_switches(tmp_path):
    model = tiny_model()
    batch = tiny_batch()
    model.train()
    losses = finetune_loss(model, batch)
    assert {"asr/ctc", "mel/l1", "chroma/l1", "mss/l1"} <= set(losses)
    assert "asr/ctc" not in finetune_loss(model, batch, heads=("mel", "chroma", "mss"))
    model.eval()
    mel = batch["mel_mix"]
    out = model(mel)
    u = model.upper(model.bottleneck.proj_out(model.bottleneck.proj_in(model.lower(mel))))
    assert torch.allclose(u, out.u, atol=1e-5) and out.heads["mel"].shape == mel.shape
    model.save(tmp_path)
    cfg = json.loads((tmp_path / "model.json").read_text())["config"]
    assert cfg["kind"] == "finetune" and cfg["finetune"]["bottleneck_dim"] == 8 and cfg["vocab"] == VOCAB
    assert cfg["encoder"]["width"] == 32 and cfg["audio"]["n_mels"] == 16 and cfg["finetune"]["noise"]["p"] == 0.3
    re = FinetuneModel.from_checkpoint(tmp_path).eval()
    assert torch.allclose(re(mel).u, out.u)


# ------------------------------------------------------------------------------------------- stage
class Toy(torch.utils.data.Dataset):
    "`duotok.synthetic.mix_segments` that can die after `die_after` item reads (a simulated kill)."
    def __init__(self, n, seed, die_after=None):
        self.items, self.die_after, self.calls = mix_segments(n, seed=seed), die_after, 0
    def __len__(self): return len(self.items)
    def __getitem__(self, i):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after: raise KeyboardInterrupt("simulated kill")
        return self.items[i]


TOY = ["ssl.encoder.width=32", "ssl.encoder.layers=4", "ssl.encoder.lower_layers=2", "ssl.encoder.heads=2",
       "ssl.encoder.conv_channels=16", "finetune.bottleneck_dim=8", "finetune.train.batch_size=2",
       "finetune.train.val_every=0", "finetune.train.warmup_steps=1", "finetune.train.log_every=1",
       "audio.codebook_size=16"]


def test_stage_runs_resumes_and_switches(tmp_path):
    from duotok.ssl import build_bestrq, save_bestrq
    from duotok.stages.finetune import run
    p = load_params(ROOT / "params.yaml", TOY + ["finetune.train.steps=8", "finetune.train.ckpt_every=2"])
    save_bestrq(tmp_path / "ssl", build_bestrq(p.ssl, p.audio))
    man = {"vocab": ["_", "a", "b", " ", "c"]}
    out = tmp_path / "finetune"
    with pytest.raises(KeyboardInterrupt):                       # 32 items for the chroma mean, then ~5 steps
        run(p, NullTracker(), {"train": Toy(32, 0, die_after=32 + 11), "val": Toy(4, 1), "manifest": man},
            out_dir=out, ssl_dir=tmp_path / "ssl")
    m = run(p, NullTracker(), {"train": Toy(32, 0), "val": Toy(4, 1), "manifest": man}, out_dir=out, ssl_dir=tmp_path / "ssl")
    assert m["resumed_from"] > 0 and m["steps"] == 8 and m["frozen_units"] == 3
    for k in ("val/asr/cer", "val/asr/cer_trivial", "val/mel/l1", "val/mel/l1_mean", "val/chroma/l1_mean",
              "val/mss/sisdr", "val/mss/sisdr_mix", "val/kmeans/rel_mse", "val/kmeans/mel_l1_q"):
        assert k in m, k
    model = FinetuneModel.from_checkpoint(out)
    assert model.vocab == man["vocab"] and model.cfg == p.finetune
    # the greedy decoder's blank bias: fitted on train (a grid value), stored with the model, val decoded with it
    from duotok.heads import BLANK_BIAS_GRID
    assert m["val/asr/blank_bias"] in BLANK_BIAS_GRID and "val/asr/cer_bias0" in m and "val/asr/train_cer_calibrated" in m
    assert json.loads((out / "model.json").read_text())["config"]["asr_blank_bias"] == m["val/asr/blank_bias"]
    p3 = load_params(ROOT / "params.yaml", TOY + ["finetune.train.steps=2", "finetune.asr_blank_bias=1.5"])
    m3 = run(p3, NullTracker(), {"train": Toy(8, 0), "val": Toy(4, 1), "manifest": man}, out_dir=tmp_path / "ft3",
             ssl_dir=tmp_path / "ssl")
    assert m3["val/asr/blank_bias"] == 1.5 and "val/asr/train_cer_calibrated" not in m3      # a fixed bias is used as is
    # ablation switches: no CTC head, no noise, no freezing
    p2 = load_params(ROOT / "params.yaml", TOY + ["finetune.train.steps=2", "finetune.lambdas.asr/ctc=0", "finetune.lambdas.asr/frame=0",
                                           "finetune.noise.enabled=false", "finetune.freeze.enabled=false"])
    m2 = run(p2, NullTracker(), {"train": Toy(8, 0), "val": Toy(4, 1), "manifest": man}, out_dir=tmp_path / "ft2",
             ssl_dir=tmp_path / "ssl")
    assert m2["frozen_units"] == 0 and "val/asr/cer" not in m2 and "val/mel/l1" in m2
