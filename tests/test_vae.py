"""VAE (nbs/50_vae, nbs/51_stage_vae): shapes at 48 kHz / 50 Hz, losses, pretrained adapter, checkpoints."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from _helpers import PARAMS, ROOT, section
from duotok.vae import (DuoVAE, PretrainedOobleck, STFTVAE, VAEObjective, WaveDiscriminator, build_vae, load_vae,
                        multi_resolution_stft_loss, save_vae, synthetic_stems, vae_loss)

CFG = section("vae", arch="oobleck", latent_dim=8, encoder_hidden_size=16, decoder_channels=16,
              downsampling_ratios=(4, 4, 6, 10), channel_multiples=(1, 2, 4, 8))
STFT_CFG = section("vae", arch="stft", latent_dim=8, width=32, layers=1, n_fft=1920, frame_hop=480, phase="free")
AUDIO = PARAMS.audio


def _wav(n=2, L=9600, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(n, L, generator=g)


@pytest.mark.parametrize("L", [960, 9600, 10000])
def test_shapes_50hz(L):
    vae = DuoVAE().eval()
    with torch.no_grad():
        z = vae.encode(_wav(2, L))
        y = vae.decode(z)
    assert vae.hop == 960 and vae.latent_rate == 50
    assert z.shape == (2, 8, math.ceil(L / 960))
    assert y.shape == (2, z.shape[-1] * 960)
    assert vae(_wav(2, L)).recon.shape == (2, L)


def test_initial_posterior_std_is_small():
    mean, logvar = DuoVAE().posterior(_wav(2, 9600))
    assert (0.5 * logvar).exp().mean() < 0.05  # noise must not swamp the initial means (posterior collapse)


def test_odd_stride_lengths_are_exact():
    vae = DuoVAE(downsampling_ratios=(2, 4, 4, 6, 5), channel_multiples=(1, 1, 1, 1, 1))
    with torch.no_grad():
        assert vae.decode(torch.zeros(1, 8, 7)).shape == (1, 7 * 960)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        DuoVAE(latent_dim=8, encoder_hidden_size=32)
    with pytest.raises(ValueError, match="same length"):
        DuoVAE(downsampling_ratios=(4, 4, 6, 10), channel_multiples=(1, 2))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        DuoVAE().encode(torch.zeros(1, 1, 960))
    with pytest.raises(ValueError, match="latents"):
        DuoVAE().decode(torch.zeros(1, 4, 3))


def test_losses():
    x = _wav(2, 4800)
    assert multi_resolution_stft_loss(x, x) < 1e-5
    assert multi_resolution_stft_loss(0.5 * x, x) > 0.1
    out = vae_loss(DuoVAE(), x, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"stft/mr", "wave/l1", "kl", "mel/l1"}
    assert set(vae_loss(DuoVAE(), x, mel=False, stft=False)) == {"wave/l1", "kl"}
    assert all(torch.isfinite(v) and v >= 0 for v in out.values())


def test_adversarial_terms_reach_only_their_parameters():
    m = VAEObjective(DuoVAE(), {"mel/l1": 1.0, "stft/mr": 1.0, "adv/gen": 0.1, "adv/feat": 1.0, "adv/disc": 0.1})
    m.disc = WaveDiscriminator(channels=8)
    out = m(_wav(2, 4800))
    assert {"adv/gen", "adv/feat", "adv/disc"} <= set(out)
    (out["adv/gen"] + out["adv/feat"]).backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.disc.parameters())
    m.zero_grad()
    out["adv/disc"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.disc.parameters())
    plain = VAEObjective(build_vae(PARAMS.vae, AUDIO), dict(PARAMS.vae.lambdas))   # the default: no adversarial
    assert plain.disc is None and set(plain(_wav(1, 4800))) == {"wave/l1", "kl", "mel/l1", "stft/mag", "stft/if", "stft/gd"}


def test_training_reduces_loss():
    torch.manual_seed(0)
    vae = DuoVAE()
    x = synthetic_stems(1, 0.2)[0]["wav48_acc"][None]
    opt = torch.optim.Adam(vae.parameters(), 2e-3)
    losses = []
    for _ in range(25):
        loss = vae_loss(vae, x, generator=torch.Generator().manual_seed(1))["stft/mr"]
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_checkpoint_roundtrip_is_frozen_and_identical(tmp_path):
    vae = build_vae(CFG, AUDIO).eval()
    save_vae(tmp_path, vae, CFG, AUDIO)
    back = load_vae(tmp_path)
    x = _wav(1, 4800)
    with torch.no_grad():
        assert torch.allclose(vae.encode(x), back.encode(x))
    assert not back.training and not any(p.requires_grad for p in back.parameters())


def test_pretrained_44k_stereo_adapter(tmp_path):
    from diffusers import AutoencoderOobleck
    AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[2, 4, 4, 8, 8], channel_multiples=[1, 1, 1, 1, 1],
                       decoder_channels=8, decoder_input_channels=4, audio_channels=2,
                       sampling_rate=44100).save_pretrained(tmp_path / "sao_vae")
    pre = PretrainedOobleck(tmp_path / "sao_vae")
    x = _wav(2, 48000)
    with torch.no_grad():
        z = pre.encode(x)
        y = pre.decode(z)
    assert (pre.native_rate, pre.native_hop, pre.channels, pre.latent_dim) == (44100, 2048, 2, 4)
    assert z.shape == (2, 4, 50) and y.shape == (2, 48000) and torch.isfinite(y).all()
    # through a (packaged-style) checkpoint with a relative path
    save_vae(tmp_path, None, dataclasses.replace(CFG, pretrained="sao_vae"), AUDIO)
    assert isinstance(load_vae(tmp_path), PretrainedOobleck)
    with pytest.raises(FileNotFoundError, match="config.json"):
        PretrainedOobleck(tmp_path / "nowhere")


def test_vae_stage_toy(tmp_path):
    from duotok.config import load_params
    from duotok.stages.vae import run
    from duotok.vae import StemCrops
    from duotok.tracking import NullTracker
    items = synthetic_stems(3, 1.0)
    items[0]["silent_vocals"] = True
    assert len(StemCrops(items, 4800)) == 5
    p = load_params(ROOT / "params.yaml", ["vae.train.steps=2", "vae.train.log_every=1", "vae.val_segments=1"])
    tracker = NullTracker()
    m = run(p, tracker, out_dir=tmp_path, datasets=(items, synthetic_stems(2, 1.0, seed=1)))
    assert m["val/vocals/n"] == 1 and m["val/acc/n"] == 1
    assert set(tracker.timings) == {"train_s", "val_s"} and not [k for k in m if k.endswith("_s")]   # durations: the run record
    assert np.isfinite(m["val/vocals/mel_l1"]) and np.isfinite(m["val/acc/si_sdr"])
    assert (tmp_path / "vae.safetensors").exists() and load_vae(tmp_path).latent_dim == p.vae.latent_dim


def test_paper_profile_vae_is_64d_50hz():
    from duotok.config import load_params
    p = load_params(ROOT / "params.yaml", profile=ROOT / "params/paper.yaml")
    v = p.vae
    assert v.latent_dim == 64 and math.prod(v.downsampling_ratios) == p.audio.vae_hop == 960
    with torch.device("meta"):
        vae = build_vae(v, p.audio)
    assert isinstance(vae, DuoVAE)
    assert vae.latent_rate == 50 and sum(p.numel() for p in vae.parameters()) > 50e6


@pytest.mark.parametrize("L", [960, 9600, 10000, 47999])
def test_stft_vae_shapes_50hz(L):
    vae = build_vae(STFT_CFG, AUDIO).eval()
    assert isinstance(vae, STFTVAE) and vae.hop == 960 and vae.latent_rate == 50
    with torch.no_grad():
        z = vae.encode(_wav(2, L))
        y = vae.decode(z)
    assert z.shape == (2, 8, math.ceil(L / 960)) and y.shape == (2, z.shape[-1] * 960)
    assert vae(_wav(2, L)).recon.shape == (2, L) and torch.isfinite(y).all()


def test_stft_vae_latent_frames_are_local():
    """Latent frame t describes samples around [t*960, (t+1)*960): a click in frame 5 changes only the frames
    within the encoder's receptive field (STFT window + 7-tap convs: +-4 latent frames at one block)."""
    vae = build_vae(STFT_CFG, AUDIO).eval()
    x = torch.zeros(1, 20 * 960)
    y = x.clone(); y[0, 5 * 960 + 480] = 1.0
    with torch.no_grad():
        d = (vae.encode(y) - vae.encode(x)).abs().sum(1)[0]  # (20,)
    assert d[5] > 0 and d[0] == 0 and d[10:].max() == 0 and d[4:7].min() > 0


def test_stft_vae_errors_and_small_initial_std():
    vae = build_vae(STFT_CFG, AUDIO)
    assert (0.5 * vae.posterior(_wav(2, 9600))[1]).exp().mean() < 0.05
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        vae.encode(torch.zeros(1, 1, 960))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="frame_hop"):
        STFTVAE(frame_hop=400)
    with pytest.raises(ValueError, match="vae.arch"):
        build_vae(dataclasses.replace(STFT_CFG, arch="wavenet"), AUDIO)
    with pytest.raises(ValueError, match="vae_hop"):
        build_vae(dataclasses.replace(CFG, downsampling_ratios=(4, 4, 6, 5)), AUDIO)


def test_stft_vae_learns_and_uses_its_latent():
    """A few hundred steps on a handful of clips: the mel loss drops well below its start, and decoding
    the clip's own latent beats decoding another clip's latent (the decoder does not ignore z)."""
    torch.manual_seed(0)
    vae = build_vae(STFT_CFG, AUDIO)
    items = synthetic_stems(4, 0.5)
    x = torch.stack([it["wav48_vocals"] for it in items[:2]] + [it["wav48_acc"] for it in items[2:]])
    opt = torch.optim.Adam(vae.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        loss = vae_loss(vae, x, generator=g, stft=False)["mel/l1"]
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    from duotok.metrics import multiscale_mel_l1
    vae.eval()
    with torch.no_grad():
        z = vae.encode(x)
        own = multiscale_mel_l1(x, vae.decode(z), 48000, reduce=False)
        swapped = multiscale_mel_l1(x, vae.decode(z.roll(2, 0)), 48000, reduce=False)
    assert (own < swapped).all(), (own, swapped)


def test_stft_vae_checkpoint_roundtrip(tmp_path):
    vae = build_vae(STFT_CFG, AUDIO).eval()
    save_vae(tmp_path, vae, STFT_CFG, AUDIO)
    back = load_vae(tmp_path)
    x = _wav(1, 4800)
    with torch.no_grad():
        assert isinstance(back, STFTVAE) and torch.equal(vae.decode(vae.encode(x)), back.decode(back.encode(x)))
    assert not back.training and not any(p.requires_grad for p in back.parameters())


HARM_CFG = dataclasses.replace(STFT_CFG, arch="harmonic", phase="noise", harmonics=16)


@pytest.mark.parametrize("L", [960, 10000])
def test_harmonic_vae_shapes_and_pitch_channels(L):
    from duotok.vae import HarmonicVAE, f0_features
    vae = build_vae(HARM_CFG, AUDIO).eval()
    assert isinstance(vae, HarmonicVAE) and vae.latent_rate == 50
    x = _wav(2, L)
    with torch.no_grad():
        z = vae.encode(x)
        y = vae.decode(z)
    assert z.shape == (2, 8, math.ceil(L / 960)) and y.shape == (2, z.shape[-1] * 960) and torch.isfinite(y).all()
    assert torch.equal(z[:, :2], f0_features(x, 48000, 960))  # the pitch channels are measured, not learned
    out = vae(x)
    assert out.fixed == 2 and torch.allclose(out.latents[:, :2], z[:, :2], atol=1e-3)


def test_f0_features_track_a_tone():
    from duotok.vae import f0_features
    sr = 48000
    t = torch.arange(sr) / sr
    f0 = 330 * (1 + 0.02 * torch.sin(2 * math.pi * 5 * t))
    tone = 0.3 * sum(torch.sin(k * 2 * math.pi * torch.cumsum(f0, 0) / sr) / k for k in range(1, 6))
    p = f0_features(torch.stack([tone, torch.zeros(sr)]), sr, 960)
    cents = 1200 * torch.log2(220 * 2 ** p[0, 0] / f0[480::960])  # latent frame t is centred on sample 960 t + 480
    assert cents[1:-1].abs().max() < 25 and p[0, 1, 1:-1].min() > 0.9 and p[1, 1].max() == 0


def test_harmonic_vae_round_trip_keeps_a_sung_tone(tmp_path):
    """Regression test of issue 24: after 60 steps at toy size, a held-out sung tone (harmonics, vibrato,
    syllables) survives encode -> decode with its pitch (torchcrepe RPA >= 0.8 against the original's F0); the
    free-phase STFTVAE it replaced scored 0.0 here. The trained model also round-trips through a checkpoint."""
    from duotok.metrics import pitch_track, raw_pitch_accuracy
    torch.manual_seed(0)
    vae = build_vae(HARM_CFG, AUDIO)
    x = torch.stack([it["wav48_vocals"] for it in synthetic_stems(4, 0.25)])
    opt = torch.optim.Adam(vae.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        l = vae_loss(vae, x, generator=g, stft=False, spectral=True, mag_floor=0.1)
        loss = l["mel/l1"] + l["stft/mag"] + 1e-4 * l["kl"]
        opt.zero_grad(); loss.backward(); opt.step()
    vae.eval()
    tone = synthetic_stems(2, 1.0, seed=5)[0]["wav48_vocals"]
    with torch.no_grad():
        y = vae.decode(vae.encode(tone[None]))[0]
    rpa = raw_pitch_accuracy(pitch_track(tone, 48000), pitch_track(y, 48000))
    assert rpa >= 0.8, rpa
    save_vae(tmp_path, vae, HARM_CFG, AUDIO)
    with torch.no_grad():
        assert torch.equal(load_vae(tmp_path).decode(vae.encode(tone[None]))[0], y)
