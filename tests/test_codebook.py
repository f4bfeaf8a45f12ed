"""Stage 3 on toy sizes: built from a (random, tiny) stage-2 FinetuneModel saved and reloaded from its checkpoint;
the lower half stays frozen and unchanged (and the check that says so can fail); checkpoint -> TokenEncoder;
namespaced losses; routing of targets; the model id follows the configuration."""
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from _helpers import ROOT, audio, section
from duotok.config import ConfigError, EncoderConfig, load_params
from duotok.models.codebook import (FrozenSnapshot, LowerCache, codebook_validate, dual_batch, model_from_finetune)
from duotok.models.encoder import MusicEncoder
from duotok.models.finetune import FinetuneModel
from duotok.tokenizer import TokenEncoder
from duotok.tracking import NullTracker

N_MELS, F = 16, 80
AUDIO = audio(n_mels=N_MELS, codebook_size=16)
VOCAB = ["_", "a", "b", "c", "d", "e", " "]
CFG = section("codebook", train=dataclasses.replace(section("codebook").train, steps=12, batch_size=4, lr=1e-3,
                                                    warmup_steps=2, val_every=0, ckpt_every=0, log_every=4))


def tiny_finetune(tmp_path):
    torch.manual_seed(0)
    enc = MusicEncoder(EncoderConfig(width=32, layers=2, lower_layers=1, heads=2, ffn_mult=2, conv_channels=16), AUDIO)
    FinetuneModel(enc, section("finetune", bottleneck_dim=8), VOCAB).save(tmp_path / "finetune")
    return FinetuneModel.from_checkpoint(tmp_path / "finetune")       # rebuilt from its own config


def segments(n, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pat = g.integers(0, 5, F // 8).repeat(8)
        ids = np.zeros(5, np.int64); L = int(g.integers(1, 5)); ids[:L] = g.integers(1, 7, L)
        T = F // 4
        out.append({"mel_vocals": (np.eye(N_MELS)[pat * 3].T * 3 + 0.3 * g.standard_normal((N_MELS, F))).astype("float32"),
                    "mel_acc": (np.eye(N_MELS)[pat + 1].T * 2 + 0.3 * g.standard_normal((N_MELS, F))).astype("float32"),
                    "chroma_vocals": np.eye(12)[pat].T.astype("float32"),
                    "chroma_acc": np.eye(12)[(pat + 4) % 12].T.astype("float32"),
                    "lyric_ids": ids, "lyric_len": np.int64(L),
                    "lyric_frames": ids[:L].repeat(-(-T // L))[:T],    # the lyric ids spread evenly, as the corpus does
                    "segment": f"s{i}/0", "song": f"s{i}"})
    return out


def test_model_from_finetune_parts_and_freezing(tmp_path):
    ft = tiny_finetune(tmp_path)
    m = model_from_finetune(ft, CFG, AUDIO)
    # branches start from the stage-2 bottleneck (code_dim read from it), heads from the stage-2 heads, encoder copied
    assert m.quantizer.code_dim == ft.cfg.bottleneck_dim == 8 and m.vocab == VOCAB
    for t in ("vocals", "acc"):
        assert torch.equal(m.quantizer.branches[t].proj_in[1].weight, ft.bottleneck.proj_in[1].weight)
        assert torch.equal(m.quantizer.branches[t].proj_out.weight, ft.bottleneck.proj_out.weight)
    assert torch.equal(m.heads.mel.up.net[0].weight, ft.heads["mel"].up.net[0].weight)
    assert m.encoder is not ft.encoder
    m.train()
    assert not m.encoder.subsampler.training and not m.encoder.lower_blocks.training and m.encoder.upper_blocks.training
    assert not any(p.requires_grad for p in m.encoder.lower_blocks.parameters())
    assert all(p.requires_grad for p in m.encoder.upper_blocks.parameters())
    with pytest.raises(ConfigError, match="audio.hop_length"):      # an audio section that does not match stage 2
        model_from_finetune(ft, CFG, dataclasses.replace(AUDIO, hop_length=480))
    assert "code_dim" not in {f.name for f in dataclasses.fields(CFG)}         # never declared twice


def test_dual_batch_targets_follow_the_stem():
    b = dual_batch(default_collate(segments(3)))
    assert b["mel"].shape == (6, N_MELS, F) and b["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(b["chroma"][4], torch.as_tensor(segments(3)[1]["chroma_acc"]))
    assert b["lyric_len"][3:].sum() == 0 and (b["lyric_len"][:3] > 0).all()       # accompaniment: empty lyric
    assert b["lyric_frames"].shape == (6, F // 4) and b["lyric_frames"][3:].sum() == 0


def test_losses_baselines_and_no_cross_track_gradient(tmp_path):
    m = model_from_finetune(tiny_finetune(tmp_path), CFG, AUDIO)
    batch = default_collate(segments(4))
    out = m(batch)                                                      # forward(batch) is the objective
    assert {"vq/commit", "vq/codebook", "mel/l1", "chroma/l1", "asr/ctc", "asr/frame"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    assert "asr/frame" not in m({k: v for k, v in batch.items() if k != "lyric_frames"})
    b = dual_batch(batch)
    o = m.outputs(b["mel"], b["label"])
    o.feats[b["label"] == 1].sum().backward()                                        # accompaniment items only
    for n, p in m.quantizer.branches["vocals"].named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, n
    assert m.quantizer.branches["acc"].proj_out.weight.grad.abs().sum() > 0
    met = codebook_validate(m, DataLoader(segments(6), batch_size=3, collate_fn=default_collate))
    assert 0 < met["baseline/asr_cer_mostfreq"] < 1 and met["baseline/asr_cer_empty"] == 1.0
    assert abs(met["asr/cer_over_baseline"] - met["asr/cer"] / met["baseline/asr_cer_mostfreq"]) < 1e-9


def test_frozen_check_can_fail(tmp_path):
    m = model_from_finetune(tiny_finetune(tmp_path), CFG, AUDIO)
    snap = FrozenSnapshot(m, dual_batch(default_collate(segments(2)))["mel"])
    assert snap.changes(m) == []
    m.encoder.subsampler.conv1.weight.requires_grad_(True)
    assert "subsampler requires grad" in snap.changes(m)
    m.freeze_lower()
    with torch.no_grad(): m.encoder.lower_blocks[0].ffn[0].weight.mul_(2)
    changes = snap.changes(m)
    assert "lower_blocks.0.ffn.0.weight" in changes and "lower-half outputs on the probe batch" in changes
    with pytest.raises(AssertionError, match="cached"):
        FrozenSnapshot(m, snap.mel, h_cached=snap.h + 1)


def test_stage_freezes_lower_and_writes_a_token_checkpoint(tmp_path):
    from duotok.models.codebook import CodebookModel
    from duotok.stages.codebook import run
    ft = tiny_finetune(tmp_path)
    lower_before = {k: v.clone() for k, v in ft.encoder.lower_blocks.state_dict().items()}
    p = load_params(ROOT / "params.yaml", ["audio.n_mels=16", "audio.codebook_size=16", "codebook.train.steps=12",
                                           "codebook.train.batch_size=4", "codebook.train.lr=0.001", "codebook.train.val_every=0",
                                           "codebook.train.ckpt_every=0", "codebook.train.log_every=4", "codebook.train.warmup_steps=2"])
    val = segments(8, seed=1)
    met = run(p, NullTracker(), {"train": segments(24), "val": val}, finetune=ft, out_dir=tmp_path / "codebook")
    assert met["check/no_nan"] and met["check/frozen_unchanged"] and met["steps"] == 12
    m2, cfg = CodebookModel.from_checkpoint(tmp_path / "codebook")
    for k, v in m2.encoder.lower_blocks.state_dict().items():
        assert torch.equal(v, lower_before[k]), k
    for t in ("vocals", "acc"):
        assert 0 < met[f"val/usage/{t}_used_frac"] <= 1 and met[f"val/usage/{t}_perplexity"] >= 1
        assert met[f"val/usage/{t}_dead"] == 16 * (1 - met[f"val/usage/{t}_used_frac"])
    assert met["bits_per_second"] == 25 * 2 * 4
    from duotok.heads import BLANK_BIAS_GRID                    # the lyric head's blank bias, fitted on train
    assert met["val/asr/blank_bias"] in BLANK_BIAS_GRID and "val/asr/cer_bias0" in met and "val/asr/cer" in met
    # the model id is a hash of the configuration (same config -> same id, no git sha inside)
    assert cfg["model_id"] == met["model_id"] == m2.checkpoint_config(asr_blank_bias=cfg["asr_blank_bias"])["model_id"]
    assert cfg["code_dim"] == 8 and cfg["vocab"] == VOCAB and cfg["codebook"] == dataclasses.asdict(p.codebook)
    # the checkpoint rebuilds the token encoder without stage 2
    te = TokenEncoder.from_checkpoint(tmp_path / "codebook")
    mv = torch.stack([torch.as_tensor(s["mel_vocals"]) for s in val])
    ma = torch.stack([torch.as_tensor(s["mel_acc"]) for s in val])
    iv, ia = te.encode_mels(mv, ma)
    assert torch.equal(iv, te.encode_mels(mv, ma)[0]) and te.model_id == met["model_id"]   # deterministic
    h = m2.encoder.lower(torch.cat([mv, ma]))
    ids = m2.quantizer.encode(h, torch.tensor([0] * 8 + [1] * 8))
    assert (ids[:8] == iv).float().mean() > 0.99 and (ids[8:] == ia).float().mean() > 0.99


def test_lower_cache_equals_encoder(tmp_path):
    m = model_from_finetune(tiny_finetune(tmp_path), CFG, AUDIO)
    ds = segments(5)
    c = LowerCache(ds, m.encoder, batch_size=2)
    it = c[3]
    with torch.no_grad():
        h = m.encoder.lower(torch.as_tensor(ds[3]["mel_vocals"])[None])[0]
    assert torch.allclose(it["h_vocals"], h, atol=1e-5) and it["segment"] == "s3/0"
