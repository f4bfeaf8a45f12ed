"""A packaged tokenizer of random weights with every part (encoder, decoder + VAE, separator) and a small corpus of
song folders: shared by the product tests (tokenize, lm train, generate, mixes)."""
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from _helpers import ROOT

K = 16


def full_toy_package(d: Path, K: int = K) -> Path:
    "`d/pkg`: encoder (toy codebook model), decoder + VAE (tiny, untrained), separator (a toy stage-2 model)."
    from test_tokenizer import toy_encoder
    from duotok.checkpoint import save_checkpoint
    from duotok.config import EncoderConfig, checkpoint_config, load_params
    from duotok.diffusion import build_latent_decoder, make_scheduler
    from duotok.models.encoder import MusicEncoder
    from duotok.models.finetune import FinetuneModel
    from duotok.package import package
    from duotok.vae import build_vae, save_vae
    torch.manual_seed(0)
    toy_encoder(K=K).save(d / "cb")
    P = load_params(ROOT / "params.yaml", [f"audio.codebook_size={K}", "decoder.width=32", "decoder.layers=1",
                                           "decoder.sampling_steps=2", "vae.latent_dim=8", "vae.width=16", "vae.layers=1"])
    save_checkpoint(d / "dec", build_latent_decoder(P.decoder, 8, (K, K), P.audio),
                    checkpoint_config("decoder", P.decoder, P.audio, latent_dim=8, codebook_sizes=[K, K],
                                      scheduler=dict(make_scheduler().config)), name="denoiser")
    save_vae(d / "vae", build_vae(P.vae, P.audio), P.vae, P.audio)
    enc = MusicEncoder(EncoderConfig(width=16, layers=2, lower_layers=1, heads=2, conv_channels=8), P.audio)
    FinetuneModel(enc, P.finetune, ["_", "a"]).save(d / "ft")
    return package(d / "pkg", d / "cb", d / "dec", d / "vae", finetune_dir=d / "ft")


def write_song(folder: Path, secs: float, seed: int, roles=("vocals", "drums", "bass", "other"), sr: int = 24000) -> Path:
    "Song folder of `roles` stems: tones + noise of `secs` seconds at `sr` (mono wav)."
    folder.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(seed)
    t = np.arange(int(sr * secs)) / sr
    for k, role in enumerate(roles):
        x = 0.2 * np.sin(2 * np.pi * (110 + 37 * seed + 50 * k) * t) + 0.05 * r.standard_normal(len(t))
        sf.write(folder / f"{role}.wav", x.astype("float32"), sr)
    return folder


def tree(root: Path) -> dict[str, bytes]:
    "Every file under `root` (hidden ones too) -> its bytes."
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}
