"""Shared by the tests: the repository root, the default params, and small audio sections for toy models."""
import dataclasses
from pathlib import Path

from duotok.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")


def audio(**changes):
    "The default `audio` section with `changes` (e.g. `n_mels=16` for a small encoder front end)."
    return dataclasses.replace(PARAMS.audio, **changes)


def section(name: str, **changes):
    "A default params section (`ssl`, `finetune`, ...) with `changes`."
    return dataclasses.replace(getattr(PARAMS, name), **changes)
