"""Token files, TokenEncoder, tokenize_split and DuoTok.encode on a toy random encoder (no stage outputs)."""
import json
import math

import numpy as np
import pytest
import torch

from _helpers import PARAMS, audio
from duotok.config import EncoderConfig, checkpoint_config
from duotok.models.codebook import CodebookModel
from duotok.tokenizer import DualTokens, DuoTok, TokenEncoder, TokenFileError, package_encoder, tokenize_split


def toy_encoder(n_mels=128, K=64, model_id="toy") -> TokenEncoder:
    "A token encoder of random weights built, as the real one is, from a codebook-stage checkpoint config."
    cfg = checkpoint_config("codebook", PARAMS.codebook, audio(n_mels=n_mels, codebook_size=K), code_dim=8, vocab=["_"],
                            encoder=EncoderConfig(width=32, layers=2, lower_layers=1, heads=2, conv_channels=16))
    m = CodebookModel.from_config(cfg)
    return TokenEncoder(m.encoder, m.quantizer, {**cfg, "model_id": model_id})


# ---- DualTokens --------------------------------------------------------------------------------------
def test_roundtrip_and_bitrate(tmp_path):
    t = DualTokens(np.arange(50) % 64, np.arange(50) % 32, 25, (64, 32), "m")
    back = DualTokens.load(t.save(tmp_path / "x.npz"))
    assert np.array_equal(back.vocals, t.vocals) and np.array_equal(back.accompaniment, t.accompaniment)
    assert back.vocals.dtype == np.int64 and back.model_id == "m" and back.duration_s == 2.0
    paper = DualTokens(np.zeros(3, int), np.zeros(3, int), 25, (32768, 32768))
    assert paper.bits_per_second == 2 * 25 * math.log2(32768) == 750 and paper.kbps == 0.75


def test_shards(tmp_path):
    items = [DualTokens(np.full(10, i), np.full(10, i), 25, (16, 16)) for i in range(3)]
    sh = DualTokens.stack(items, segment=["a", "b", "c"])
    back = DualTokens.load(sh.save(tmp_path / "s.npz"))
    assert back.is_shard and len(back) == 3 and back.segment == ["a", "b", "c"] and back[2].vocals[0] == 2
    with pytest.raises(TokenFileError, match="does not match"):
        DualTokens.stack([items[0], DualTokens(np.zeros(9, int), np.zeros(9, int), 25, (16, 16))])
    with pytest.raises(TokenFileError, match="'segment' has 2 ids"):
        DualTokens(np.zeros((3, 4), int), np.zeros((3, 4), int), 25, (16, 16), segment=["a", "b"])


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.update(vocals=np.array([0, 70])), r"'vocals' ids must be in \[0, 64\)"),
    (lambda d: d.update(acc=np.array([0, -1])), r"'acc' ids must be in \[0, 32\)"),
    (lambda d: d.update(acc=np.array([0, 1, 2])), "must be aligned"),
    (lambda d: d.update(vocals=np.array([0.5, 1.0])), "integer ids"),
    (lambda d: d.update(vocals=np.zeros((1, 1, 2), int), acc=np.zeros((1, 1, 2), int)), r"\(T,\) or \(N, T\)"),
    (lambda d: d.pop("acc"), r"missing field\(s\) \['acc'\]"),
    (lambda d: d.update(header=np.array("not json")), "not JSON"),
    (lambda d: d.update(header=np.array(json.dumps({"format": "other"}))), "header format"),
])
def test_load_validates_with_clear_errors(tmp_path, mutate, msg):
    d = {"vocals": np.array([0, 1]), "acc": np.array([0, 1]),
         "header": np.array(json.dumps({"format": "duotok-tokens", "version": 1, "token_rate": 25,
                                        "codebook_sizes": [64, 32]}))}
    mutate(d)
    np.savez(tmp_path / "bad.npz", **d)
    with pytest.raises(TokenFileError, match=msg) as e:
        DualTokens.load(tmp_path / "bad.npz")
    assert "bad.npz" in str(e.value)


def test_load_missing_and_garbage(tmp_path):
    with pytest.raises(TokenFileError, match="no such token file"):
        DualTokens.load(tmp_path / "nope.npz")
    (tmp_path / "g.npz").write_bytes(b"garbage")
    with pytest.raises(TokenFileError, match="not a readable"):
        DualTokens.load(tmp_path / "g.npz")


# ---- TokenEncoder ------------------------------------------------------------------------------------
def test_encode_mels_deterministic_and_routed(tmp_path):
    te = toy_encoder()
    mv, ma = torch.randn(2, 128, 400), torch.randn(2, 128, 400)
    iv, ia = te.encode_mels(mv, ma)
    assert iv.shape == ia.shape == (2, 100) and iv.dtype == torch.long and ia.max() < 64
    assert torch.equal(iv, te.encode_mels(mv, ma)[0])
    # routing: vocal ids come from the vocal branch alone; swapping stems changes which codebook is used
    h = te.encoder.lower(mv)
    assert torch.equal(iv, te.quantizer.branches["vocals"].encode(h))
    # batch composition does not change an item's tokens (beyond float noise)
    iv1, _ = te.encode_mels(mv[:1], ma[:1])
    assert (iv1[0] == iv[0]).float().mean() > 0.99
    # the frozen encoder has no trainable parameter and stays in eval mode
    te.train()
    assert not te.training and not any(p.requires_grad for p in te.parameters())
    with pytest.raises(ValueError, match="must be \\(B, 128, F\\)"):
        te.encode_mels(torch.randn(2, 64, 400), torch.randn(2, 64, 400))
    with pytest.raises(ValueError, match="same shape"):
        te.encode_mels(mv, ma[:, :, :396])


def test_checkpoint_roundtrip_keeps_only_token_weights(tmp_path):
    te = toy_encoder()
    te.save(tmp_path / "enc")
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "enc" / "model.safetensors")).keys()
    assert not any(k.startswith(("encoder.upper_blocks", "encoder.norm_out")) for k in keys)
    te2 = TokenEncoder.from_checkpoint(tmp_path / "enc")
    mv, ma = torch.randn(1, 128, 200), torch.randn(1, 128, 200)
    assert all(torch.equal(a, b) for a, b in zip(te.encode_mels(mv, ma), te2.encode_mels(mv, ma)))
    (tmp_path / "bad").mkdir()
    with pytest.raises(Exception, match="missing"):
        TokenEncoder.from_checkpoint(tmp_path / "bad")


def test_tokenize_split_order_and_shapes():
    te = toy_encoder(n_mels=16)
    ds = [{"mel_vocals": np.random.randn(16, 400).astype("float32"),
           "mel_acc": np.random.randn(16, 400).astype("float32"), "segment": f"s{i}"} for i in range(5)]
    out = tokenize_split(te, ds, batch_size=2)
    assert out.vocals.shape == out.accompaniment.shape == (5, 100) and out.segment == [f"s{i}" for i in range(5)]
    assert out.model_id == "toy" and out.codebook_sizes == (64, 64) and out.token_rate == 25
    one = te.encode_mels(torch.tensor(ds[4]["mel_vocals"])[None], torch.tensor(ds[4]["mel_acc"])[None])
    assert (out.vocals[4] == one[0][0].numpy()).mean() > 0.99
    with pytest.raises(KeyError, match="lacks 'mel_acc'"):
        tokenize_split(te, [{"mel_vocals": ds[0]["mel_vocals"]}])


# ---- DuoTok ------------------------------------------------------------------------------------------
@pytest.fixture
def duotok(tmp_path):
    toy_encoder().save(tmp_path / "codebook")
    package_encoder(tmp_path / "codebook", tmp_path / "pkg", chunk_s=2.0, context_s=0.5, batch_windows=3)
    return DuoTok.from_pretrained(tmp_path / "pkg")


def test_package_layout_and_bitrate(duotok, tmp_path):
    info = json.loads((tmp_path / "pkg" / "tokenizer.json").read_text())
    assert info["codebook_sizes"] == [64, 64] and info["bits_per_second"] == 25 * (6 + 6) and info["model_id"] == "toy"
    assert (tmp_path / "pkg" / "encoder" / "model.safetensors").exists()
    assert duotok.chunk_s == 2.0 and duotok.batch_windows == 3
    assert "bit/s" in duotok.describe()
    with pytest.raises(FileNotFoundError, match="not a packaged"):
        DuoTok.from_pretrained(tmp_path / "codebook")


def test_encode_any_length_deterministic(duotok):
    g = torch.Generator().manual_seed(0)
    for seconds, sr in [(0.01, 48000), (3.3, 48000), (7.0, 44100)]:
        L = int(seconds * sr)
        v, a = 0.1 * torch.randn(L, generator=g), 0.1 * torch.randn(L, generator=g)
        t = duotok.encode(v, a, sr)
        assert t.n_tokens == max(1, math.ceil(L * 25 / sr))
        assert abs(t.n_tokens - seconds * 25) <= 1
        t2 = duotok.encode(v.numpy(), a.numpy(), sr)
        assert np.array_equal(t.vocals, t2.vocals) and np.array_equal(t.accompaniment, t2.accompaniment)


def test_encode_downmix_resample_and_windows(duotok):
    g = torch.Generator().manual_seed(1)
    v = 0.1 * torch.randn(48000 * 5, generator=g)
    a = 0.1 * torch.randn(48000 * 5, generator=g)
    mono = duotok.encode(v, a, 48000)
    stereo = duotok.encode(torch.stack([v, v]), torch.stack([a, a]).T.contiguous(), 48000)   # (C, L) and (L, C)
    assert np.array_equal(mono.vocals, stereo.vocals) and np.array_equal(mono.accompaniment, stereo.accompaniment)
    from duotok.audio import resample
    at24 = duotok.encode(resample(v, 48000, 24000, method="soxr"), resample(a, 48000, 24000, method="soxr"), 24000)
    assert at24.n_tokens == mono.n_tokens and (at24.vocals == mono.vocals).mean() > 0.8
    # windows: each window only sees its own context; token count and alignment match full context
    full = DuoTok(duotok.encoder, chunk_s=0).encode(v, a, 48000)
    assert full.n_tokens == mono.n_tokens
    with pytest.raises(ValueError, match="differ in length"):
        duotok.encode(v, a[:48000], 48000)
    with pytest.raises(ValueError, match="NaN"):
        duotok.encode(v * float("nan"), a, 48000)
    with pytest.raises(ValueError, match="floating-point"):
        duotok.encode(np.zeros(1000, np.int16), np.zeros(1000, np.int16), 48000)


def test_decode_checks_tokens_and_needs_decoder(duotok, tmp_path):
    with pytest.raises(TokenFileError, match="this tokenizer has"):
        duotok.decode(DualTokens(np.zeros(5, int), np.zeros(5, int), 25, (512, 512)))
    with pytest.raises(FileNotFoundError, match="no decoder"):
        duotok.decode(DualTokens(np.zeros(5, int), np.zeros(5, int), 25, (64, 64)))


def test_decode_delegates_to_token_decoder(duotok, monkeypatch):
    calls = {}

    class FakeDecoder:
        sample_rate = 48000
        def decode(self, iv, ia):
            calls["shape"] = (tuple(iv.shape), tuple(ia.shape))
            return torch.zeros(iv.shape[0], iv.shape[1] * 1920), torch.ones(ia.shape[0], ia.shape[1] * 1920)

    duotok._decoder = FakeDecoder()
    out = duotok.decode(DualTokens(np.zeros(5, int), np.zeros(5, int), 25, (64, 64)))
    assert calls["shape"] == ((1, 5), (1, 5)) and out.vocals.shape == (9600,) and out.mix.mean() == 1.0
    assert out.sample_rate == 48000


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_encode_info_and_errors(duotok, tmp_path, capsys):
    from duotok.audio import save_audio
    from duotok.cli import main
    pkg = tmp_path / "pkg"
    g = np.random.default_rng(0)
    v, a = (0.1 * g.standard_normal(48000 * 3)).astype("float32"), (0.1 * g.standard_normal(48000 * 3)).astype("float32")
    save_audio(tmp_path / "v.wav", v, 48000); save_audio(tmp_path / "a.wav", a, 48000)
    assert main(["encode", "--model", str(pkg), "--vocals", str(tmp_path / "v.wav"), "--accompaniment",
                 str(tmp_path / "a.wav"), "-o", str(tmp_path / "t.npz"), "-q"]) == 0
    t = DualTokens.load(tmp_path / "t.npz")
    assert t.n_tokens == 75
    # the CLI gives the same tokens as the API (the wav is 16-bit, so encode what was written)
    from duotok.audio import load_audio
    direct = duotok.encode(load_audio(tmp_path / "v.wav")[0], load_audio(tmp_path / "a.wav")[0], 48000)
    assert np.array_equal(direct.vocals, t.vocals)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "t.npz")]) == 0
    assert "75 tokens" in capsys.readouterr().out
    assert main(["info", str(pkg)]) == 0
    assert "bit/s" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.npz")]) == 2
    assert "no such token file" in capsys.readouterr().err
    assert main(["encode", "--model", str(pkg), "--song", str(tmp_path / "nosong"), "-o", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("sr, dur", [(48000, 2.3), (44100, 1.71), (16000, 1.5), (24000, 2.0)])
def test_stream_log_mel_equals_whole_signal(sr, dur):
    from duotok.audio import log_mel, resample
    from duotok.tokenizer import stream_log_mel
    aud = PARAMS.audio
    x = 0.1 * torch.randn(2, int(sr * dur), generator=torch.Generator().manual_seed(0))
    ref = log_mel(resample(x.mean(0), sr, 24000, method="soxr"), 24000)
    got = stream_log_mel(x.numpy(), sr, aud, block_s=0.37)
    # bins ~80 dB below this signal's level (empty above 8 kHz at 16 kHz input) hold float rounding; the encoder floors
    # them relative to the level (35 dB below it), so compare above 1e-8
    floor = math.log(1e-8)
    assert got.shape == ref.shape and (got.clamp_min(floor) - ref.clamp_min(floor)).abs().max() < 1e-3


def test_windows_reproduce_segments_or_the_whole_song(duotok):
    """With 4 s windows and no context a song's tokens equal the tokens of its 4 s segments cut and featurised like
    the preprocess stage does (up to the 2 edge frames of each segment); with the default context (the receptive
    field) windows of any length give the whole-song tokens."""
    from duotok.audio import log_mel
    d = DuoTok(duotok.encoder, chunk_s=4.0, context_s=0.0)
    g = torch.Generator().manual_seed(3)
    v, a = 0.1 * torch.randn(24000 * 12, generator=g), 0.1 * torch.randn(24000 * 12, generator=g)
    tok = d.encode(v, a, 24000)
    cut = lambda x, k: log_mel(x[k * 96000:(k + 1) * 96000], 24000)[:, :400]
    iv, ia = d.encoder.encode_mels(torch.stack([cut(v, k) for k in range(3)]), torch.stack([cut(a, k) for k in range(3)]))
    assert (iv.reshape(-1).numpy() == tok.vocals).mean() > 0.9 and (ia.reshape(-1).numpy() == tok.accompaniment).mean() > 0.9
    whole, win = DuoTok(duotok.encoder, chunk_s=0).encode(v, a, 24000), DuoTok(duotok.encoder, chunk_s=2.0).encode(v, a, 24000)
    assert DuoTok(duotok.encoder).context_tokens == duotok.encoder.receptive_field_tokens
    assert (win.vocals == whole.vocals).mean() > 0.99 and (win.accompaniment == whole.accompaniment).mean() > 0.99
