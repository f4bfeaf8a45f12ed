"Encoder invariants: shapes and rates, padding masks, named halves, chunked inference, the level-invariant front end, the\nbounded receptive field of the banded lower half, paper scale."
import dataclasses
import math

import pytest
import torch

from _helpers import ROOT, audio
from duotok.config import ConfigError, EncoderConfig
from duotok.core import count_parameters
from duotok.models.encoder import (DB_TO_NATS, MusicEncoder, attention_mask, encode_windows, encoder_from_config, load_encoder,
                                   local_level, tokens_for_frames)

torch.set_num_threads(1)
CFG = EncoderConfig(width=32, layers=4, lower_layers=2, heads=2, conv_channels=16)
AUDIO = audio(n_mels=32)


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return MusicEncoder(CFG, AUDIO).eval()


def test_30s_gives_750_frames(enc):
    out = enc(torch.randn(1, 32, 3000))
    assert out.last.shape == (1, 750, 32) and out.mask is None
    assert tokens_for_frames(401) == 101 and enc(torch.randn(1, 32, 401)).last.shape[1] == 101


def test_bad_input_raises(enc):
    with pytest.raises(ValueError, match="n_mels=32"):
        enc(torch.randn(1, 64, 100))
    with pytest.raises(ValueError, match="mask"):
        enc(torch.randn(1, 32, 100), torch.ones(1, 99, dtype=torch.bool))
    with pytest.raises(ConfigError, match="lower_layers"):
        MusicEncoder(EncoderConfig(layers=4, lower_layers=4), AUDIO)
    with pytest.raises(ValueError, match="4x"):
        MusicEncoder(CFG, audio(token_rate=50))


def test_padding_does_not_change_valid_outputs(enc):
    mel = torch.randn(2, 32, 400)
    mask = torch.ones(2, 400, dtype=torch.bool); mask[1, 160:] = False
    out = enc(mel, mask)
    assert out.mask[1].sum() == 40 and out.mask[0].all()
    mel2 = mel.clone(); mel2[1, :, 160:] = 50.0                      # garbage in the padding
    assert torch.allclose(enc(mel2, mask).last[1, :40], out.last[1, :40], atol=1e-5)
    assert torch.allclose(enc(mel[1:, :, :160]).last[0], out.last[1, :40], atol=1e-4)


def test_halves_and_hidden_states(enc):
    mel = torch.randn(2, 32, 200)
    out = enc(mel, return_hidden=True)
    assert len(out.hidden_states) == 4 and len(enc.lower_blocks) == 2 and len(enc.upper_blocks) == 2
    h = enc.lower(mel)
    assert torch.allclose(h, out.hidden_states[1]) and torch.allclose(enc.upper(h), out.last, atol=1e-5)
    names = {n.split(".")[0] for n, _ in enc.named_parameters()}
    assert names == {"subsampler", "lower_blocks", "upper_blocks", "norm_out"}


def test_normalization_buffers(enc):
    e = MusicEncoder(dataclasses.replace(CFG, level="none"), AUDIO)
    e.set_normalization(torch.full((32,), 2.0), torch.full((32,), 4.0))
    assert torch.allclose(e.normalize(torch.full((1, 32, 3), 6.0)), torch.ones(1, 32, 3))
    assert "mel_mean" in e.state_dict() and "mel_std" in e.state_dict()
    with pytest.raises(ValueError):
        e.set_normalization(torch.zeros(3), torch.ones(3))


def test_chunked(enc):
    mel = torch.randn(1, 32, 1000)
    full = enc(mel).last
    assert torch.allclose(enc.encode_chunked(mel, chunk_s=20.0), full, atol=1e-5)   # one window == forward
    ch = enc.encode_chunked(mel, chunk_s=2.0, context_s=1.0)
    assert ch.shape == full.shape
    # with context, chunk boundaries stay close to the full-context features (relative error)
    assert (ch - full).norm() / full.norm() < 0.5
    assert enc.encode_chunked(mel, chunk_s=2.0, layer=1).shape == (1, 250, 32)


def test_config_is_the_params_section_and_roundtrips_through_a_checkpoint(enc, tmp_path):
    from duotok.checkpoint import save_checkpoint
    from duotok.config import checkpoint_config, load_params
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p.ssl.encoder, EncoderConfig)                      # one class: the section is the model config
    ck = checkpoint_config("ssl", p.ssl, AUDIO, encoder=CFG)
    assert encoder_from_config(ck).cfg == CFG and encoder_from_config(ck).audio == AUDIO
    save_checkpoint(tmp_path, torch.nn.ModuleDict({"encoder": enc}), ck)
    back = load_encoder(tmp_path).eval()
    mel = torch.randn(1, 32, 80)
    assert torch.equal(back(mel).last, enc(mel).last)


def test_paper_scale_meta():
    from duotok.config import load_params
    p = load_params(ROOT / "params.yaml", profile=ROOT / "params/paper.yaml")
    c = p.ssl.encoder
    with torch.device("meta"):
        big = MusicEncoder(c, p.audio)
        out = big(torch.empty(1, 128, 3000))
    n = count_parameters(big)
    print(f"paper-scale encoder parameters: {n:,}")
    assert c.layers == 24 and c.lower_layers == 12 and c.width == 1024 and c.upper_layers == 12
    assert 290e6 < n < 320e6 and out.last.shape == (1, 750, 1024)


def test_front_end_is_gain_invariant_and_floored():
    "A gain adds the same log factor to every bin and to the local level: the features do not move, clamp included."
    e = MusicEncoder(CFG, AUDIO)
    mel = torch.randn(2, 32, 300) * 3 - 4
    x = e.front_end(mel)
    for db in (-30.0, -6.0, -1.0, 3.0, 20.0):
        assert torch.allclose(e.front_end(mel + db * DB_TO_NATS), x, atol=1e-5), db
    assert x.min() >= -CFG.level_floor_db * DB_TO_NATS - 1e-6                   # the relative floor
    silence = torch.full((1, 32, 50), math.log(1e-12))                              # below the gate: stays at the floor
    assert torch.allclose(e.front_end(silence), torch.full_like(silence, -CFG.level_floor_db * DB_TO_NATS))
    # the level is local: the mean over a centred window, edges averaged over the frames that exist
    lv = local_level(torch.zeros(1, 4, 10), 3)
    assert torch.allclose(lv, torch.zeros(1, 10), atol=1e-6)


def test_front_end_config_is_checked():
    with pytest.raises(ValueError, match="gain-invariant"):
        MusicEncoder(dataclasses.replace(CFG, level_floor_db=60.0, level_gate_db=-70.0), AUDIO)
    with pytest.raises(ConfigError, match="lower_attention_window"):
        MusicEncoder(dataclasses.replace(CFG, lower_attention_window=-1), AUDIO)


def test_fit_normalization_standardises_the_front_end():
    e = MusicEncoder(CFG, AUDIO)
    mels = torch.randn(6, 32, 200) * 2 - 3
    e.fit_normalization(mels)
    z = e.normalize(mels)
    assert torch.allclose(z.mean((0, 2)), torch.zeros(32), atol=1e-3) and torch.allclose(z.std((0, 2)), torch.ones(32), atol=2e-2)
    e2 = MusicEncoder(CFG, AUDIO); e2.fit_normalization(iter(list(mels)))           # an iterable of (n_mels, F) gives the same
    assert torch.allclose(e2.mel_mean, e.mel_mean, atol=1e-5)


def test_attention_mask_band_and_padding():
    m = torch.ones(2, 12, dtype=torch.bool); m[1, 5:] = False
    a = attention_mask(m, 12, window=2)
    assert a.shape == (2, 1, 12, 12) and a.any(-1).all()                           # no query row is empty
    assert not a[0, 0, 0, 3] and a[0, 0, 0, 2] and not a[1, 0, 4, 5] and a[1, 0, 11, 11]
    assert attention_mask(None, 12, 0) is None and attention_mask(m, 12, 0).shape == (2, 1, 1, 12)
    assert attention_mask(None, 3, 2) is None                                      # the band covers everything


def test_receptive_field_is_exact():
    "Windows with receptive_field_tokens of context give the whole input's lower-half features; a shift shifts them."
    torch.manual_seed(0)
    e = MusicEncoder(dataclasses.replace(CFG, lower_attention_window=3), AUDIO).eval()
    rf = e.receptive_field_tokens
    assert rf == 2 * 3 + math.ceil((3 + e.level_window // 2) / 4)
    assert MusicEncoder(dataclasses.replace(CFG, lower_attention_window=0), AUDIO).receptive_field_tokens is None
    mel = torch.randn(1, 32, 3000, generator=torch.Generator().manual_seed(1)) - 2
    with torch.no_grad():
        whole = e.lower(mel)
        win = torch.cat([f for _, f in encode_windows(e.lower, mel, 60, rf)], 1)
        assert (win - whole).abs().max() < 1e-4
        sh = e.lower(mel[..., 400:])                                                # 4 s later = 100 tokens
        assert (sh[:, rf:] - whole[:, 100 + rf:]).abs().max() < 1e-4
        # the upper half attends globally: it is not part of the exactness claim
        assert e.encode_chunked(mel, chunk_s=2.4, layer=1).shape == whole.shape
