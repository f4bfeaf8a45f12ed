"""Token stability per invariance (issue 16) on a small trained toy tokenizer: the encoder is trained with BEST-RQ on
synthetic songs for a few seconds, the codebooks are fitted to its features, and the measured agreement under gain,
a 2 s shift and 4 s windows on a 3-minute song is asserted; the first release's front end (per-bin standardised raw
log-mel, full attention), trained the same way, is the control that fails the same checks."""
import dataclasses

import numpy as np
import pytest
import torch

from _helpers import audio, section
from duotok import stability as S
from duotok.config import EncoderConfig, checkpoint_config
from duotok.models.codebook import CodebookModel
from duotok.ssl import build_bestrq
from duotok.tokenizer import DuoTok, TokenEncoder, stream_log_mel

torch.set_num_threads(1)
AUDIO = audio(n_mels=32, codebook_size=64)
SONGS = [S.synthetic_song(24.0, seed=i, name=f"train{i}") for i in range(4)]
LONG = S.synthetic_song(180.0, seed=99, name="long")              # the 3-minute song of the acceptance checks


def train_toy(level: str, window: int, steps: int = 40, seed: int = 0) -> DuoTok:
    "BEST-RQ on 4 s mix segments of SONGS (`steps` Adam steps), then codebooks fitted to the stems' lower-half features."
    enc = EncoderConfig(width=32, layers=2, lower_layers=1, heads=2, conv_channels=16, dropout=0.0, level=level,
                        lower_attention_window=window)
    mels = torch.cat([stream_log_mel(s.vocals + s.acc, s.sr, AUDIO)[:, :2400].reshape(32, 6, 400).transpose(0, 1) for s in SONGS])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ssl = build_bestrq(section("ssl", encoder=enc, rpq_codebook_size=64, rpq_dim=8), AUDIO, train=[{"mel_mix": m} for m in mels])
        opt = torch.optim.AdamW(ssl.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        losses = []
        for step in range(steps):
            b = mels[torch.randint(0, len(mels), (8,), generator=g)]
            loss = ssl(b, generator=g).losses["mlm/ce"]
            opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), "the toy encoder did not train"
        cfg = checkpoint_config("codebook", section("codebook"), AUDIO, encoder=enc, code_dim=8, vocab=["_", "a"], model_id=f"toy-{level}")
        m = CodebookModel.from_config(cfg)
    m.encoder.load_state_dict(ssl.encoder.state_dict())
    with torch.no_grad():
        h = m.encoder.lower(torch.stack([stream_log_mel(x, s.sr, AUDIO)[:, :2400] for s in SONGS for x in (s.vocals, s.acc)]))
    m.quantizer.init_from_data(h, torch.tensor([0, 1] * len(SONGS)))
    return DuoTok(TokenEncoder(m.encoder, m.quantizer, cfg))


@pytest.fixture(scope="module")
def runs():
    "Stability of LONG under every perturbation, for the default front end and the first release's."
    out = {}
    for name, level, window in (("local", "local", 8), ("legacy", "none", 0)):
        tok = train_toy(level, window)
        m, _ = S.stability_part(tok, [LONG], "long")
        out[name] = (tok, m)
    return out


def agree(runs, name, pert, track): return runs[name][1][f"stability/long/{pert}/{track}"]


def test_codes_are_not_trivial(runs):
    "Agreement means something only if the tokens vary: many distinct codes per 20 s on both tracks."
    for name in runs:
        for t in S.TRACKS:
            assert runs[name][1][f"codes/long/{t}/distinct_per_20s"] >= 16, (name, t)


@pytest.mark.parametrize("pert,floor", [("gain_-1db", 0.99), ("gain_-6db", 0.99), ("gain_3db", 0.99)])
def test_gain(runs, pert, floor):
    "Level-invariant front end: a gain changes no token (up to float ties); the first release's front end changes many."
    for t in S.TRACKS:
        assert agree(runs, "local", pert, t) >= floor, (pert, t, agree(runs, "local", pert, t))
    assert min(agree(runs, "legacy", pert, t) for t in S.TRACKS) < 0.9, [agree(runs, "legacy", pert, t) for t in S.TRACKS]


def test_gain_over_a_wide_range(runs):
    "-30 dB and +12 dB: still the same tokens (the relative floor and the gate keep the front end exact)."
    tok, m = runs["local"]
    clean = tok.encode(LONG.vocals[: 48000 * 30], LONG.acc[: 48000 * 30], 48000)
    for db in (-30.0, 12.0):
        g = np.float32(10 ** (db / 20))
        x = tok.encode(LONG.vocals[: 48000 * 30] * g, LONG.acc[: 48000 * 30] * g, 48000)
        assert (x.vocals == clean.vocals).mean() >= 0.99 and (x.accompaniment == clean.accompaniment).mean() >= 0.99, db


def test_shift(runs):
    "A 2 s later start shifts the tokens by 50 (banded lower half): only the receptive field of the new start differs."
    rf = runs["local"][0].encoder.receptive_field_tokens
    for t in S.TRACKS:
        assert agree(runs, "local", "shift_2s", t) >= 1 - rf / (4500 - 50) - 0.01, (t, agree(runs, "local", "shift_2s", t))
        assert agree(runs, "local", "shift_2s", t) >= 0.8


def test_window(runs):
    "4 s windows (with the default context) give the tokens of the whole 3-minute song in one window."
    for t in S.TRACKS:
        assert agree(runs, "local", "window_4s", t) >= 0.99, (t, agree(runs, "local", "window_4s", t))
    # the first release's full attention: windows and the whole song disagree
    assert min(agree(runs, "legacy", "window_4s", t) for t in S.TRACKS) < 0.9


def test_noise_is_measured(runs):
    "30 dB-SNR white noise: tokens move (nothing makes them exactly invariant), but most of them stay."
    for t in S.TRACKS:
        a = agree(runs, "local", "noise_30db", t)
        assert 0.5 <= a <= 1.0, (t, a)
