"""Stage 3 on toy sizes: built from a (random, tiny) stage-2 FinetuneModel saved and reloaded from its checkpoint;
the lower half stays frozen and unchanged; checkpoint -> TokenEncoder; namespaced losses; routing of targets."""
import dataclasses

import numpy as np
import pytest
import torch

from duotok.config import CodebookConfig, TrainConfig
from duotok.models.finetune import FinetuneModel
from duotok.stages.codebook import (CodebookModel, LowerCache, _collate_default, codebook_loss, dual_batch, load_codebook_model,
                                    model_from_finetune, train_codebook)
from duotok.tokenizer import TokenEncoder
from duotok.tracking import NullTracker

N_MELS, F = 16, 80


def tiny_finetune(tmp_path):
    cfg = {"kind": "finetune",
           "encoder": {"n_mels": N_MELS, "width": 32, "layers": 2, "lower_layers": 1, "heads": 2, "ffn_mult": 2,
                       "dropout": 0.0, "conv_channels": 16, "frame_rate": 100, "downsample": 4, "rope_base": 10000.0},
           "bottleneck_dim": 8,
           "noise": {"p": 0.2, "sigma": 1.0, "mode": "replace", "sigma_mode": "match", "granularity": "frame",
                     "warmup_steps": 0, "enabled": True},
           "heads": {"vocab_size": 7, "n_mels": N_MELS, "hidden": 16}}
    ft = FinetuneModel.from_config(cfg)
    ft.save(tmp_path / "finetune")
    return FinetuneModel.from_checkpoint(tmp_path / "finetune")       # rebuilt from its own config


def segments(n, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pat = g.integers(0, 5, F // 8).repeat(8)
        ids = np.zeros(5, np.int64); L = int(g.integers(1, 5)); ids[:L] = g.integers(1, 7, L)
        out.append({"mel_vocals": (np.eye(N_MELS)[pat * 3].T * 3 + 0.3 * g.standard_normal((N_MELS, F))).astype("float32"),
                    "mel_acc": (np.eye(N_MELS)[pat + 1].T * 2 + 0.3 * g.standard_normal((N_MELS, F))).astype("float32"),
                    "chroma_vocals": np.eye(12)[pat].T.astype("float32"),
                    "chroma_acc": np.eye(12)[(pat + 4) % 12].T.astype("float32"),
                    "lyric_ids": ids, "lyric_len": np.int64(L), "segment": f"s{i}/0", "song": f"s{i}"})
    return out


def with_frames(segs, T):
    "Segments + an aligned character per token frame (the lyric ids spread evenly, as the corpus does)."
    return [{**s, "lyric_frames": np.asarray(s["lyric_ids"][:int(s["lyric_len"])]).repeat(-(-T // int(s["lyric_len"])))[:T]}
            for s in segs]


CFG = CodebookConfig(code_dim=8, beta=0.25, gradient="straight_through", init_from_bottleneck=True, transform="mlp", data_init=True,
                     train_proj_in=False, cache_lower=True, asr_blank_bias=None,
                     train=TrainConfig(steps=12, batch_size=4, lr=1e-3, warmup_steps=2, weight_decay=0.0, grad_clip=1.0,
                                       val_every=0, ckpt_every=0, log_every=4, seed=0, mixed_precision="no", num_workers=0),
                     lambdas={"vq/commit": 1.0, "vq/codebook": 1.0, "mel/l1": 1.0, "chroma/l1": 1.0, "asr/ctc": 0.1})
AUDIO = {"sample_rate": 48000, "encoder_sample_rate": 24000, "n_fft": 1024, "hop_length": 240, "n_mels": N_MELS,
         "token_rate": 25}


def test_model_from_finetune_parts_and_freezing(tmp_path):
    ft = tiny_finetune(tmp_path)
    m = model_from_finetune(ft, 8, 16)
    # branches start from the stage-2 bottleneck, heads from the stage-2 heads, encoder copied (not shared)
    for t in ("vocals", "acc"):
        assert torch.equal(m.quantizer.branches[t].proj_in[1].weight, ft.bottleneck.proj_in[1].weight)
        assert torch.equal(m.quantizer.branches[t].proj_out.weight, ft.bottleneck.proj_out.weight)
    assert torch.equal(m.heads.mel.up.net[0].weight, ft.heads["mel"].up.net[0].weight)
    assert m.encoder is not ft.encoder
    m.train()
    assert not m.encoder.subsampler.training and not m.encoder.lower_blocks.training and m.encoder.upper_blocks.training
    assert not any(p.requires_grad for p in m.encoder.lower_blocks.parameters())
    assert all(p.requires_grad for p in m.encoder.upper_blocks.parameters())
    with pytest.raises(ValueError, match="bottleneck has dim 8"):
        model_from_finetune(ft, 16, 16)


def test_dual_batch_targets_follow_the_stem():
    b = dual_batch(_collate_default(segments(3)))
    assert b["mel"].shape == (6, N_MELS, F) and b["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(b["chroma"][4], torch.as_tensor(segments(3)[1]["chroma_acc"]))
    assert b["lyric_len"][3:].sum() == 0 and (b["lyric_len"][:3] > 0).all()       # accompaniment: empty lyric


def test_frame_targets_and_ctc_baselines(tmp_path):
    from duotok.stages.codebook import _mostfreq_cer, codebook_validate
    m = model_from_finetune(tiny_finetune(tmp_path), 8, 16)
    T = -(-F // 4)
    segs = with_frames(segments(3), T)
    b = dual_batch(_collate_default(segs))
    assert b["lyric_frames"].shape == (6, T) and b["lyric_frames"][3:].sum() == 0          # accompaniment: no lyric
    assert torch.equal(b["lyric_frames"][1], torch.as_tensor(segs[1]["lyric_frames"]))
    out = codebook_loss(m, _collate_default(segs))
    assert torch.isfinite(out["asr/frame"]) and out["asr/frame"] > 0
    assert "asr/frame" not in codebook_loss(m, _collate_default(segments(3)))
    assert abs(_mostfreq_cer([[1, 1, 2], [1, 3]]) - 2 / 5) < 1e-9                           # "111", "11" vs refs
    met = codebook_validate(m, torch.utils.data.DataLoader(segs, batch_size=3, collate_fn=_collate_default))
    assert 0 < met["baseline/asr_cer_mostfreq"] < 1
    assert abs(met["asr/cer_over_baseline"] - met["asr/cer"] / met["baseline/asr_cer_mostfreq"]) < 1e-9


def test_losses_namespaced_and_no_cross_track_gradient(tmp_path):
    m = model_from_finetune(tiny_finetune(tmp_path), 8, 16)
    ds = segments(4)
    batch = _collate_default(ds)
    out = codebook_loss(m, batch)
    assert {"vq/commit", "vq/codebook", "mel/l1", "chroma/l1", "asr/ctc"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    b = dual_batch(batch)
    o = m(b["mel"], b["label"])
    o.feats[b["label"] == 1].sum().backward()                                        # accompaniment items only
    for n, p in m.quantizer.branches["vocals"].named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, n
    assert m.quantizer.branches["acc"].proj_out.weight.grad.abs().sum() > 0


def test_train_freezes_lower_and_writes_a_token_checkpoint(tmp_path):
    ft = tiny_finetune(tmp_path)
    m = model_from_finetune(ft, 8, 16)
    lower_before = {k: v.clone() for k, v in m.encoder.lower_blocks.state_dict().items()}
    val = segments(8, seed=1)
    met = train_codebook(m, segments(24), val, CFG, tmp_path / "codebook", NullTracker(), AUDIO, "toy")
    assert met["check/no_nan"] and met["check/frozen_unchanged"] and met["steps"] == 12
    for k, v in m.encoder.lower_blocks.state_dict().items():
        assert torch.equal(v, lower_before[k]), k
    for t in ("vocals", "acc"):
        assert 0 < met[f"val/usage/{t}_used_frac"] <= 1 and met[f"val/usage/{t}_perplexity"] >= 1
        assert met[f"val/usage/{t}_dead"] == 16 * (1 - met[f"val/usage/{t}_used_frac"])
    assert met["bits_per_second"] == 25 * 2 * 4
    from duotok.heads import BLANK_BIAS_GRID                    # the lyric head's blank bias, fitted on train
    assert met["val/asr/blank_bias"] in BLANK_BIAS_GRID and "val/asr/cer_bias0" in met and "val/asr/cer" in met
    # the checkpoint rebuilds the stage-3 model and the token encoder without stage 2
    m2, cfg = load_codebook_model(tmp_path / "codebook")
    te = TokenEncoder.from_checkpoint(tmp_path / "codebook")
    mv = torch.stack([torch.as_tensor(s["mel_vocals"]) for s in val])
    ma = torch.stack([torch.as_tensor(s["mel_acc"]) for s in val])
    iv, ia = te.encode_mels(mv, ma)
    assert torch.equal(iv, te.encode_mels(mv, ma)[0])                                   # deterministic
    h = m2.encoder.lower(torch.cat([mv, ma]))
    ids = m2.quantizer.encode(h, torch.tensor([0] * 8 + [1] * 8))
    assert (ids[:8] == iv).float().mean() > 0.99 and (ids[8:] == ia).float().mean() > 0.99


def test_lower_cache_equals_encoder(tmp_path):
    m = model_from_finetune(tiny_finetune(tmp_path), 8, 16)
    ds = segments(5)
    c = LowerCache(ds, m.encoder, batch_size=2)
    it = c[3]
    with torch.no_grad():
        h = m.encoder.lower(torch.as_tensor(ds[3]["mel_vocals"])[None])[0]
    assert torch.allclose(it["h_vocals"], h, atol=1e-5) and it["segment"] == "s3/0"
