__version__ = "0.1.0"

# Hand-kept (nbdev generates every other module). The public API, imported on first use (PEP 562), so
# `import duotok` stays cheap for the CLI and for stage processes: `from duotok import DuoTok` loads
# duotok.tokenizer (and torch) only then. `_LAZY` is a literal table that duotok.stage.module_imports
# reads, so `from duotok import DuoTok` in a stage counts duotok/tokenizer.py as a DVC dependency.
_LAZY = {
    "DuoTok": "duotok.tokenizer",          # the packaged tokenizer: from_pretrained(dir), encode, decode
    "DualTokens": "duotok.tokenizer",      # two token streams + rate + codebook sizes; save / load .npz
    "Decoded": "duotok.tokenizer",         # what DuoTok.decode returns: vocals, accompaniment, mix, sample_rate
    "TokenFileError": "duotok.tokenizer",
    "load_params": "duotok.config",        # params.yaml (+ profile + overrides) -> validated Params
    "Params": "duotok.config",
    "ConfigError": "duotok.config",
    "load_audio": "duotok.audio",          # any audio file -> (array (channels, L), sample rate)
    "save_audio": "duotok.audio",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY: raise AttributeError(f"module 'duotok' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value                 # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
