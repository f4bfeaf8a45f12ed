"Encoder invariants: shapes and rates, padding masks, named halves, chunked inference, paper scale."
import pytest
import torch

from _helpers import ROOT, audio
from duotok.config import ConfigError, EncoderConfig
from duotok.core import count_parameters
from duotok.models.encoder import MusicEncoder, encoder_from_config, load_encoder, tokens_for_frames

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
    e = MusicEncoder(CFG, AUDIO)
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
