"BEST-RQ objective and the ssl stage: frozen quantizer, masking, loss, checkpoint, resume after a kill."
import json

import pytest
import torch
from vector_quantize_pytorch import RandomProjectionQuantizer

from duotok.config import load_params
from duotok.models.encoder import EncoderConfig, MusicEncoder
from duotok.ssl import (BestRQ, BestRQConfig, RandomProjectionTargets, bestrq_validate, load_bestrq, load_encoder,
                        save_bestrq, span_mask)
from duotok.tracking import NullTracker

torch.set_num_threads(1)
ECFG = EncoderConfig(n_mels=32, width=32, layers=2, lower_layers=1, heads=2, conv_channels=16)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return BestRQ(MusicEncoder(ECFG), BestRQConfig(rpq_codebook_size=64, rpq_dim=8, **kw))


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
    assert torch.equal(BestRQ(MusicEncoder(ECFG), BestRQConfig(rpq_codebook_size=64, rpq_dim=8, rpq_codebooks=2)).targets(mel), t0)
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
    p = load_params("params.yaml", TOY + ["ssl.train.steps=6", "ssl.train.ckpt_every=2"])
    out = tmp_path / "ssl"
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):                       # dies mid-run, after the step-2 checkpoint
        run(p, NullTracker(), {"train": Toy(16, 0, die_after=11), "val": Toy(4, 1), "manifest": {}}, out_dir=out)
    assert not (out / "model.safetensors").exists()
    m = run(p, NullTracker(), {"train": Toy(16, 0), "val": Toy(4, 1), "manifest": {}}, out_dir=out)
    assert m["resumed_from"] in (2, 4) and m["steps"] == 6
    cfg = json.loads((out / "model.json").read_text())["config"]
    assert cfg["encoder"]["width"] == 32 and cfg["bestrq"]["rpq_codebook_size"] == 32
    assert "val/mlm/acc" in m and "val/mlm/const_acc" in m
