"""Run a training stage with lyric-head variants that are not parameters (the recorded experiments of
docs/measurements.md, "The CTC blank plateau"). Environment variables:

  LR_MULT=heads.lyrics.=10      learning-rate factor for parameters with that name prefix (fit's lr_mult;
                                stage 3's lyric head is `heads.lyrics.`, stage 2's `model.heads.ctc.`)
  STARTS=asr/ctc=0.5            a loss term counts only after this fraction of the steps (warm-up schedule)
  CTC_NORM=tokens|nonempty      CTC normalisation: sum / all target chars of the batch, or per-char mean
                                over items with a non-empty target only (default: torch's per-char mean)

Usage (from an experiment folder holding params.yaml and outputs/<upstream stages>):
  LR_MULT=heads.lyrics.=10 STARTS=asr/ctc=0.5 python scripts/lyric_head_experiment.py duotok.stages.codebook \
      --no-track --set codebook.train.steps=300 --set codebook.lambdas.asr/frame=1.0
"""
import os
import runpy
import sys

import torch
import torch.nn.functional as F
from einops import rearrange

import duotok.heads as H
import duotok.models.codebook as MC
import duotok.models.finetune as MF
import duotok.train as T

_fit, _weighted = T.fit, T.weighted_loss
_state = {"n": 0, "steps": None}
_starts = {k: float(v) for k, v in (kv.split("=") for kv in os.environ.get("STARTS", "").split(",") if kv)}


def weighted_loss(out, lambdas):
    "weighted_loss with the STARTS schedule (counts training calls; fit calls it once per step)."
    if _state["steps"] is not None:
        frac = _state["n"] / _state["steps"]
        _state["n"] += 1
        lambdas = {k: (0.0 if frac < _starts.get(k, 0.0) else w) for k, w in lambdas.items()}
    return _weighted(out, lambdas)


def fit(*args, **kw):
    cfg = args[3] if len(args) > 3 else kw["cfg"]
    _state["steps"] = cfg.steps
    if os.environ.get("LR_MULT"):
        prefix, factor = os.environ["LR_MULT"].split("=")
        kw["lr_mult"] = {**(kw.get("lr_mult") or {}), prefix: float(factor)}
    return _fit(*args, **kw)


def ctc_loss(log_probs, targets, target_lengths, input_lengths=None):
    b, t, _ = log_probs.shape
    if input_lengths is None: input_lengths = torch.full((b,), t, dtype=torch.long)
    per = F.ctc_loss(rearrange(log_probs, "b t v -> t b v"), targets, input_lengths, target_lengths,
                     blank=0, reduction="none", zero_infinity=True)
    mode = os.environ["CTC_NORM"]
    if mode == "tokens": return per.sum() / target_lengths.sum().clamp(min=1)
    if mode == "nonempty":
        keep = target_lengths > 0
        return (per[keep] / target_lengths[keep]).mean() if keep.any() else log_probs.sum() * 0
    raise ValueError(f"CTC_NORM={mode!r}: use tokens or nonempty")


T.fit, T.weighted_loss = fit, weighted_loss
if os.environ.get("CTC_NORM"): H.ctc_loss = MF.ctc_loss = MC.ctc_loss = ctc_loss   # the modules that call it

if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__")
