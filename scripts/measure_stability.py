"""Token stability, distinct codes and the vocal pitch chain of a packaged tokenizer, as `evaluate` measures them
(`duotok.evaluation.stability_splits`, `duotok.stability.vae_pitch`, `pitch_probe_part`), outside the pipeline.

    python scripts/measure_stability.py --package outputs/decoder/package --out stability.json
    python scripts/measure_stability.py --package /path/to/first-release/package --legacy   # a pre-issue-16 package

`--legacy` reads a package written before the encoder had a front-end section (issue 16): its `encoder` config gains
`level: none` and `lower_attention_window: 0`, i.e. exactly what that encoder computed, and it encodes with the
package's own window settings. The songs are the preprocess manifest's `test` (and `shift`) splits, read from the
render stage's folders. `--no-decode` skips the decoded-vocal and VAE links (stability and the probe only)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def load_tokenizer(package: str, legacy: bool = False, codebook: str | None = None, **kw):
    """A `DuoTok` from `package` (or, encode side only, from the `codebook` stage's checkpoint folder); `legacy`: patch
    a pre-issue-16 encoder config to the first release's front end."""
    from duotok.tokenizer import DuoTok, TokenEncoder
    if codebook:
        return DuoTok(TokenEncoder.from_checkpoint(codebook), **kw)
    if not legacy:
        return DuoTok.from_pretrained(package, **kw)
    from duotok.checkpoint import load_checkpoint
    from duotok.models.encoder import encoder_from_config
    from duotok.quantize import quantizer_from_config
    from duotok.tokenizer import token_state_dict
    d = Path(package) / "encoder"
    sd, cfg = load_checkpoint(d)
    cfg["encoder"] = {"level": "none", "level_window_s": 2.0, "level_floor_db": 35.0, "level_gate_db": -80.0,
                      "lower_attention_window": 0, **cfg["encoder"]}
    te = TokenEncoder(encoder_from_config(cfg), quantizer_from_config(cfg), cfg)
    te.load_state_dict(token_state_dict(sd), strict=False)
    enc = cfg.get("encode", {})
    return DuoTok(te, Path(package) / "decoder", **{**{k: enc[k] for k in ("chunk_s", "context_s", "batch_windows") if k in enc}, **kw})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="outputs/decoder/package")
    ap.add_argument("--legacy", action="store_true")
    ap.add_argument("--codebook", default=None, help="a codebook checkpoint folder instead of a package (implies --no-decode)")
    ap.add_argument("--chunk-s", type=float, default=None, help="encode windows (s); default: the package's / DuoTok's")
    ap.add_argument("--prep-root", default="outputs/preprocess"); ap.add_argument("--render-root", default="outputs/render")
    ap.add_argument("--seconds", type=float, default=240.0, help="seconds of songs per split (as evaluate.stability_s)")
    ap.add_argument("--pitch-segments", type=int, default=8); ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-probe", action="store_true"); ap.add_argument("--sampling-steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from duotok import evaluation as E
    from duotok import metrics as M
    from duotok import stability as S
    torch.set_grad_enabled(False)
    tok = load_tokenizer(a.package, a.legacy, a.codebook, **({"chunk_s": a.chunk_s} if a.chunk_s is not None else {}))
    a.no_decode = a.no_decode or bool(a.codebook)
    t0 = time.time()
    m, rows, notes = E.stability_splits(tok, a.prep_root, a.render_root, a.seconds, 48000)
    m["time/stability_s"] = round(time.time() - t0, 1)
    if not a.no_probe:
        t0 = time.time(); m.update(E.pitch_probe_part(tok.encoder, a.prep_root, a.render_root)); m["time/probe_s"] = round(time.time() - t0, 1)
    if not a.no_decode and a.pitch_segments:
        t0 = time.time()
        tok.decoder.steps = a.sampling_steps
        items = E.attach_score_f0(E.load_test_audio(a.prep_root, "test", a.pitch_segments), a.render_root, 48000)
        rec, _, _ = E.reconstruction_part(tok, items, 48000, a.pitch_segments)
        m.update({k: v for k, v in rec.items() if k.startswith("recon/vocals/") or k.startswith("recon/acc/mel")})
        m.update(S.vae_pitch(tok.decoder.vae, items, 48000, a.pitch_segments))
        m["time/pitch_s"] = round(time.time() - t0, 1)
    for n in notes: print("note:", n, file=sys.stderr)
    print(E.stability_markdown(m))
    if a.out: Path(a.out).write_text(json.dumps(m, indent=1, sort_keys=True))
    return m


if __name__ == "__main__":
    main()
