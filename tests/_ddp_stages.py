"""Every training stage's objective under N processes (run by tests/test_distributed.py).

    torchrun --nproc_per_node=2 --standalone tests/_ddp_stages.py OUT        # 2 processes, per-process batch B
    python tests/_ddp_stages.py OUT --single                                 # 1 process, batch 2 x B (same global batch)

Each stage's objective is built with the library pieces its stage uses (`duotok.stages.<name>` wires the same
ones) at toy size on synthetic data, and trained with the shared `duotok.train.fit` for a few steps through
`duotok.data.make_loader`. A recording wrapper stores every process's weighted loss per step; after training the
processes exchange their loss curves (the global curve is their mean: equal per-process batches, per-item mean
losses) and their parameters. `duotok.distributed.on_rank0` is exercised once at the end. Writes OUT/<mode>.json.

Randomness inside the objectives that would differ between one and two processes is switched off where the
stage exposes a switch (BEST-RQ masks every frame with zero noise, no dropout, no bottleneck noise, no decoder
condition dropout, crops as long as the items): the ssl, finetune, codebook and LM objectives are then
deterministic; the VAE samples its posterior (std ~0.007 at init) and flow matching draws timesteps and noise.
"""
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from duotok.config import EncoderConfig, NoiseConfig, load_params
from duotok.data import make_loader
from duotok.distributed import objective_loss, on_rank0, rank, world_size
from duotok.tracking import NullTracker
from duotok.train import fit, weighted_loss

# `duotok.train.fit` steps the LR schedule once per optimizer step whatever the number of processes
# (`Accelerator(step_scheduler_with_optimizer=False)`); the 2-process curves below would leave the 1-process curve
# right after warmup otherwise.

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
OUT, SINGLE = Path(sys.argv[1]), "--single" in sys.argv
B = 2 if not SINGLE else 4                      # per-process batch; the global batch is 4 in both modes
STEPS, N = 4, 16                                # 4 steps inside one epoch of 16 items (an even number of batches)
P = load_params(ROOT / "params.yaml", profile=ROOT / "params/toy.yaml")
AUDIO = dataclasses.replace(P.audio, n_mels=16)
ENC = EncoderConfig(width=32, layers=2, lower_layers=1, heads=2, ffn_mult=2, dropout=0.0, conv_channels=16)
VOCAB = ["_", "a", "b", "c", " "]


def train_cfg(**kw):
    # fp32: the curves are compared to float precision; under bf16 autocast a half batch's and a full batch's weight
    # gradients are rounded to bf16 at other partial sums (relative ~1e-3), which says nothing about DDP
    return dataclasses.replace(P.ssl.train, steps=STEPS, batch_size=B, val_every=0, ckpt_every=0, log_every=1000,
                               warmup_steps=1, mixed_precision="no", **kw)


class Recorder(torch.nn.Module):
    "Wraps an objective: `forward(batch)` = `loss_fn(inner, batch)`, and remembers the weighted loss of each step."
    def __init__(self, inner, loss_fn, lambdas):
        super().__init__()
        self.inner, self.loss_fn, self.lambdas, self.curve = inner, loss_fn, lambdas, []
    def forward(self, batch):
        out = self.loss_fn(self.inner, batch)
        if self.training: self.curve.append(float(weighted_loss(out, self.lambdas).detach()))
        return out


def train(name, objective, loss_fn, dataset, lambdas, tmp, cfg=None, on_step=None, collate=None):
    rec = Recorder(objective, loss_fn, dict(lambdas))
    cfg = cfg or train_cfg()
    res = fit(rec, objective_loss, make_loader(dataset, B, True, cfg.seed, collate_fn=collate, name=name), cfg,
              Path(tmp) / name, NullTracker(), dict(lambdas), on_step=on_step, progress=False)
    params = torch.cat([p.detach().flatten() for p in res.model.parameters()])
    curves, weights = [rec.curve], [params]
    if world_size() > 1:
        curves, weights = [None] * world_size(), [None] * world_size()
        dist.all_gather_object(curves, rec.curve); dist.all_gather_object(weights, params)
    return {"curve": [sum(c[s] for c in curves) / len(curves) for s in range(STEPS)],
            "rank_curves": curves, "steps": res.step, "num_processes": res.num_processes,
            "rank_weight_diff": max(float((w - weights[0]).abs().max()) for w in weights),
            "weight_norm": float(params.norm()), "weights": params[:1000].tolist() + params[-1000:].tolist()}


def main():
    from duotok.synthetic import mix_segments, stem_segments
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if world_size() > 1: tmp = on_rank0(lambda: tmp)       # one scratch folder for the resumable states
        # ssl: BEST-RQ (masks every frame, zero-variance noise: deterministic)
        from duotok.ssl import bestrq_loss, build_bestrq
        s = dataclasses.replace(P.ssl, encoder=ENC, mask_prob=1.0, mask_noise_std=0.0, rpq_codebook_size=16)
        torch.manual_seed(0)
        results["ssl"] = train("ssl", build_bestrq(s, AUDIO), bestrq_loss, mix_segments(N, 16, 41, seed=0), s.lambdas, tmp)
        # finetune: the four heads, progressive freezing, no bottleneck noise
        from duotok.models.finetune import FinetuneModel, FinetuneObjective, enabled_heads
        from duotok.noise import ProgressiveFreezer
        from duotok.models.encoder import MusicEncoder
        f = dataclasses.replace(P.finetune, bottleneck_dim=8, noise=NoiseConfig(enabled=False))
        torch.manual_seed(0)
        ft = FinetuneModel(MusicEncoder(ENC, AUDIO), f, VOCAB)
        freezer = ProgressiveFreezer(ft.freeze_units(), STEPS, f.freeze)
        lam = {**f.lambdas, "asr/ctc": 0.5}                            # the paper's CTC term on too
        def on_step(step, rec):
            rec.inner.model.noise.set_step(step)
            return freezer.apply(step)
        results["finetune"] = train("finetune", FinetuneObjective(ft, enabled_heads(lam)), objective_loss,
                                    mix_segments(N, 16, 41, seed=1), lam, tmp, on_step=on_step)
        # codebook: frozen lower half, data-initialised SimVQ codebooks, heads (the model's forward is the objective)
        from duotok.models.codebook import LowerCache, init_codebooks, model_from_finetune
        c = dataclasses.replace(P.codebook, train=train_cfg())
        cb = model_from_finetune(ft, c, dataclasses.replace(AUDIO, codebook_size=16))
        data = LowerCache(stem_segments(N, 16, 80, seed=2, vocab_size=len(VOCAB)), cb.encoder)
        init_codebooks(cb, data, seed=0, batch_size=B)
        results["codebook"] = train("codebook", cb, objective_loss, data, c.lambdas, tmp)
        # vae: the STFT VAE, crops as long as the items (no crop randomness)
        from duotok.vae import StemCrops, VAEObjective, build_vae, synthetic_stems
        v = dataclasses.replace(P.vae, latent_dim=8, width=16, layers=1)
        torch.manual_seed(0)
        crops = StemCrops(synthetic_stems(N // 2, 0.2, seed=3), crop=9600)
        results["vae"] = train("vae", VAEObjective(build_vae(v, P.audio), dict(v.lambdas)), objective_loss, crops, v.lambdas, tmp)
        # decoder: flow matching on token / latent chunks (whole segments), no condition dropout
        import numpy as np
        from duotok.diffusion import FlowMatchingObjective, TokenLatentChunks, build_latent_decoder, make_scheduler
        from duotok.tokenizer import DualTokens
        g = np.random.default_rng(4)
        toks = DualTokens(g.integers(0, 16, (N // 2, 25)), g.integers(0, 16, (N // 2, 25)), 25, (16, 16))
        lat = g.standard_normal((N // 2, 2, 8, 50)).astype(np.float32)
        d = dataclasses.replace(P.decoder, cond_dropout=0.0)
        torch.manual_seed(0)
        model = build_latent_decoder(d, 8, (16, 16), P.audio)
        results["decoder"] = train("decoder", FlowMatchingObjective(model, make_scheduler(), d.cond_dropout), objective_loss,
                                   TokenLatentChunks(toks, lat, 25, model.upsample), d.lambdas, tmp)
        # the two token LMs of the evaluate stage
        from duotok import lm as L
        va, aa = L.synthetic_streams(N, 12, 16, seed=5)
        for proto in L.PROTOCOLS:
            seqs = L.build_sequences(va, aa, (16, 16), proto, prompt=2)
            results[f"lm_{proto}"] = train(f"lm_{proto}", L.LMObjective(L.new_lm(P.evaluate.lm, (16, 16), 0)), objective_loss,
                                           seqs, {"lm/ce": 1.0}, tmp)
        got = on_rank0(lambda: {"rank": rank(), "world": world_size()})     # computed on rank 0, returned on every rank
        received = [got]
        if world_size() > 1:
            received = [None] * world_size(); dist.all_gather_object(received, got)
        results["on_rank0"] = received
    if rank() == 0:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / ("single.json" if SINGLE else "ddp.json")).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
