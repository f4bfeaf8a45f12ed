"""Diffusion decoder (nbs/52_diffusion, nbs/55_stage_decoder, nbs/54_package): denoiser, flow matching
with the diffusers scheduler, chunked TokenDecoder, decoder stage and packaging."""
import json

import numpy as np
import pytest
import torch

from _helpers import ROOT, audio, section
from duotok.config import to_dict
from duotok.diffusion import (DiTBlock, DiTDenoiser, LatentDecoder, TokenDecoder, chunk_starts, crossfade_weights,
                              flow_matching_loss, make_scheduler, sample)
from duotok.tokenizer import DualTokens
from duotok.vae import build_vae, save_vae, synthetic_stems

AUDIO = audio(codebook_size=16)
VAE_CFG = section("vae", arch="oobleck", latent_dim=8, encoder_hidden_size=16, decoder_channels=16,
                  downsampling_ratios=(4, 4, 6, 10), channel_multiples=(1, 2, 4, 8))


def _perturb(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_dit_block_is_identity_at_init():
    x = torch.randn(2, 7, 32)
    assert torch.equal(DiTBlock(32, 4)(x, torch.randn(2, 32)), x)


def test_denoiser_shapes_and_errors():
    den = DiTDenoiser(8, (16, 20), width=32, layers=2, heads=4)
    x, ids, tr = torch.randn(3, 8, 12), torch.randint(0, 16, (3, 6)), torch.tensor([0, 1, 1])
    assert den(x, torch.tensor([1.0, 500.0, 999.0]), ids, tr).shape == x.shape
    with pytest.raises(ValueError, match="latent frames"):
        den(x, torch.tensor(1.0), ids[:, :5], tr)
    with pytest.raises(ValueError, match="divisible"):
        DiTBlock(30, 4)


def test_condition_dropout_ignores_ids():
    den = _perturb(DiTDenoiser(8, (16, 16), width=32, layers=1, heads=4)).eval()
    x, tr, t = torch.randn(2, 8, 10), torch.tensor([0, 1]), torch.tensor([300.0, 300.0])
    a, b = torch.randint(0, 16, (2, 5)), torch.randint(0, 16, (2, 5))
    drop = torch.ones(2, dtype=torch.bool)
    assert torch.allclose(den(x, t, a, tr, drop), den(x, t, b, tr, drop))
    assert not torch.allclose(den(x, t, a, tr), den(x, t, b, tr))


@pytest.mark.parametrize("shared", [True, False])
def test_latent_decoder_tracks(shared):
    ld = _perturb(LatentDecoder(8, (16, 16), width=32, layers=1, heads=4, shared=shared)).eval()
    x, ids = torch.randn(4, 8, 10), torch.randint(0, 16, (4, 5))
    tr = torch.tensor([0, 1, 0, 1])
    out = ld(x, torch.tensor(100.0), ids, tr)
    assert out.shape == x.shape and len(ld.nets) == (1 if shared else 2)
    # the track changes the prediction (track embedding or separate nets)
    assert not torch.allclose(out, ld(x, torch.tensor(100.0), ids, 1 - tr))
    z = torch.randn(4, 8, 10)
    ld.latent_mean.fill_(2.0); ld.latent_std.fill_(3.0)
    assert torch.allclose(ld.denormalize(ld.normalize(z, tr), tr), z, atol=1e-6)


class _Oracle(torch.nn.Module):
    "Returns the exact flow-matching velocity towards a fixed x0: (x_t - x0) / sigma."
    def __init__(self, x0):
        super().__init__()
        self.x0, self.latent_dim, self.upsample = x0, x0.shape[1], 2
        self.register_buffer("latent_mean", torch.zeros(2, x0.shape[1]))
        self.register_buffer("latent_std", torch.ones(2, x0.shape[1]))
    def forward(self, x, t, ids, track, drop=None):
        sigma = (t.float() / 1000).clamp_min(1e-4)[:, None, None]
        return (x - self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1)) / sigma
    def denormalize(self, x, track):
        return x


def test_sampler_with_oracle_velocity_reaches_target():
    x0 = torch.randn(2, 4, 6)
    z = sample(_Oracle(x0), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), steps=4,
               guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z, x0, atol=1e-3)


def test_scheduler_noising_convention():
    sch = make_scheduler()
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = sch.timesteps[torch.tensor([0, 999])]
    xt = sch.scale_noise(x0, t, noise)
    sig = (t / 1000)[:, None, None]
    assert torch.allclose(xt, sig * noise + (1 - sig) * x0, atol=1e-5)


def test_flow_matching_learns_token_to_latent_map():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ld = LatentDecoder(4, (8, 8), width=32, layers=2, heads=4)
    sch = make_scheduler()
    targets = torch.stack([torch.full((4, 8), 1.0), torch.full((4, 8), -1.0)])
    tok = torch.stack([torch.zeros(4, dtype=torch.long), torch.full((4,), 3)])
    opt = torch.optim.Adam(ld.parameters(), 3e-3)
    for _ in range(250):
        k = torch.randint(0, 2, (16,), generator=g)
        loss = flow_matching_loss(ld, sch, targets[k], tok[k], torch.zeros(16, dtype=torch.long), 0.1, g)["fm/mse"]
        opt.zero_grad(); loss.backward(); opt.step()
    z = sample(ld, tok, torch.zeros(2, dtype=torch.long), steps=10, guidance_scale=1.5, generator=g)
    assert z[0].mean() > 0.5 and z[1].mean() < -0.5


def test_chunking_helpers():
    for T, c, o in [(130, 50, 10), (100, 50, 10), (51, 50, 10), (7, 50, 10), (1000, 50, 25)]:
        s = chunk_starts(T, c, o)
        assert s[0] == 0 and min(T, s[-1] + c) == T
        assert all(b - a <= c - o for a, b in zip(s, s[1:]))  # overlap at least o
    w = crossfade_weights(100, 20, 30)
    assert w.min() > 0 and w[20:70].eq(1).all() and (w[:20].diff() > 0).all()


class _ConstVAE(torch.nn.Module):
    latent_dim, hop = 8, 960
    def decode(self, z):
        return torch.ones(z.shape[0], z.shape[-1] * 960)


@pytest.mark.parametrize("T", [7, 50, 130])
def test_token_decoder_any_length_and_crossfade_normalisation(T):
    td = TokenDecoder(LatentDecoder(8, (16, 16), width=32, layers=1, heads=4), _ConstVAE(), steps=1,
                      guidance_scale=1.0, chunk_tokens=50, overlap_tokens=10)
    wv, wa = td.decode(torch.randint(0, 16, (2, T)), torch.randint(0, 16, (2, T)))
    assert wv.shape == wa.shape == (2, T * 1920)
    assert torch.allclose(wv, torch.ones_like(wv), atol=1e-5)  # overlap-add weights sum to one
    with pytest.raises(ValueError, match="outside"):
        td.decode(torch.full((1, 5), 16), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        td.decode(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long))


def _write_pre_encode(d, vae):
    from duotok.diffusion import latent_stats, load_pre_encoded, write_pre_encoded
    data = {"train": synthetic_stems(3, 2.0), "val": synthetic_stems(2, 2.0, seed=1)}
    man = {"splits": {}, "latent_dim": 8, "latent_rate": 50.0, "token_rate": 25, "codebook_sizes": [16, 16],
           "sample_rate": 48000, "audio": to_dict(AUDIO)}
    for split, items in data.items():
        with torch.no_grad():
            lat = torch.stack([vae.encode(torch.stack([it["wav48_vocals"], it["wav48_acc"]])) for it in items]).numpy()
        ids = np.random.default_rng(0).integers(0, 16, (len(items), 50))
        write_pre_encoded(d, split, DualTokens(ids, ids[::-1].copy(), 25, (16, 16), "toy", [it["segment"] for it in items]), lat)
        assert DualTokens.load(d / f"tokens_{split}.npz").segment == [it["segment"] for it in items]   # the one token format
        assert load_pre_encoded(d, split)[1].shape == lat.shape
        man["splits"][split] = {"n": len(items), "tokens": 50, "latent_frames": 100}
        if split == "train":
            m, s = latent_stats(lat)
            man["latent_mean"], man["latent_std"] = m.tolist(), s.tolist()
    (d / "manifest.json").write_text(json.dumps(man))
    return data


def test_decoder_stage_toy_and_package(tmp_path):
    from duotok.config import load_params
    from duotok.package import package_decoder
    from duotok.stages.decoder import run
    from duotok.tracking import NullTracker
    vae = build_vae(VAE_CFG, AUDIO).eval()
    save_vae(tmp_path / "vae", vae, VAE_CFG, AUDIO)
    data = _write_pre_encode(tmp_path, vae)
    p = load_params(ROOT / "params.yaml", ["decoder.train.steps=4", "decoder.train.batch_size=4", "decoder.train.log_every=2",
                                    "decoder.width=32", "decoder.layers=1", "decoder.sampling_steps=2",
                                    "decoder.val_segments=2", "decoder.chunk_s=1.0"])
    tracker = NullTracker()
    m = run(p, tracker, pre_dir=tmp_path, vae_dir=tmp_path / "vae", out_dir=tmp_path / "dec", datasets=data,
            package_to=None)
    assert set(tracker.timings) == {"train_s", "val_s"} and not [k for k in m if k.endswith("_s")]   # durations: the run record
    for tr in ("vocals", "acc", "mix"):
        for name in ("decoded", "vae", "silence", "meanspec"):
            assert np.isfinite(m[f"val/{tr}/mel_l1/{name}"])
    assert m["val/n"] == 2 and m["val/acc/mel_l1/silence"] != m["val/acc/mel_l1/meanspec"]
    dec = package_decoder(tmp_path / "pkg", tmp_path / "dec", tmp_path / "vae")
    td = TokenDecoder.from_dir(dec, steps=1)
    assert td.chunk_tokens == 25 and td.overlap_tokens == 10 and td.steps == 1
    wv, wa = td.decode(np.zeros(40, dtype=np.int64), np.ones(40, dtype=np.int64))
    assert wv.shape == wa.shape == (40 * 1920,) and torch.isfinite(wv).all()
