"""The encode path's libsoxr resampler (`resample(..., method="soxr")`, `resample_blocks`) against torchaudio's sinc
resampler (`method="sinc"`, the previous front end): tones and the resulting log-mel."""
import numpy as np
import torch

from duotok.audio import log_mel, resample, resample_blocks

RNG = np.random.default_rng(0)
FREQS, PHASES = RNG.uniform(50, 0.4 * 24000, 20), RNG.uniform(0, 6, 20)


def tones(n, sr):
    t = np.arange(n) / sr
    return (sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(FREQS, PHASES)) / 20).astype(np.float32)


def test_soxr_tones_as_accurate_as_sinc():
    x = tones(3 * 48000, 48000)
    ref = tones(3 * 24000, 24000)
    m = 4800
    err = {k: np.abs(resample(x, 48000, 24000, method=k)[m:-m] - ref[m:-m]).max() for k in ("sinc", "soxr")}
    assert err["soxr"] < 1e-6 and err["soxr"] <= err["sinc"], err


def test_soxr_log_mel_matches_sinc_below_10_khz():
    import librosa
    x = tones(4 * 48000, 48000) + 0.05 * RNG.standard_normal(4 * 48000).astype(np.float32)
    mel = {k: log_mel(torch.from_numpy(resample(x, 48000, 24000, method=k)), 24000, 1024, 240, 128) for k in ("sinc", "soxr")}
    fc = torch.from_numpy(librosa.mel_frequencies(130, fmin=0, fmax=12000)[1:-1])
    d = (mel["soxr"] - mel["sinc"]).abs().amax(1)
    assert d[fc < 8000].max() < 0.01 and d[fc < 10000].max() < 0.1, d   # nats (0.01 nat = 0.04 dB)
    # above ~11 kHz torchaudio's rolloff (0.95 x Nyquist) attenuates; soxr's passband is wider, never weaker there
    assert (mel["soxr"] - mel["sinc"])[fc > 11000].mean() > 0


def test_resample_blocks_equals_whole_signal():
    x = (0.1 * RNG.standard_normal(2 * 44100 + 3)).astype(np.float32)
    whole = resample(x, 44100, 24000, method="soxr")
    got = np.concatenate(list(resample_blocks((x[i:i + 1000] for i in range(0, len(x), 1000)), 44100, 24000, len(whole))))
    assert np.array_equal(got, whole) and len(whole) == -(-len(x) * 24000 // 44100)
