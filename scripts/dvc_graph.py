#!/usr/bin/env python
"""The `deps` and `params` of every stage in dvc.yaml, computed from the code instead of written by hand.

deps   = the stage's non-code deps as listed (upstream outputs, data, notebooks)
         + every package source file `duotok/stages/<name>.py` imports, transitively, including imports
           inside functions (`duotok.stage.import_closure`), + those the listed notebooks import.
params = the stage's own section, whole, + the keys of other sections the stage READ in its last run
         (`params_read` in `outputs/.runs/<name>.json`, recorded by `duotok.stage.stage_main`).

    python scripts/dvc_graph.py                 # print the computed lists and what dvc.yaml misses
    python scripts/dvc_graph.py --write         # rewrite deps/params in dvc.yaml (comments kept)
    python scripts/dvc_graph.py --toy --write   # first run the toy chain (~3 min) to record params_read
    python scripts/dvc_graph.py --runs /path/outputs/.runs   # params_read from another project's runs

`--toy` builds a throwaway copy of this repository (`toy_project`, also used by the tests), runs
`dvc repro` there with params/toy.yaml, and reads its run records. The toy profile takes the same code
paths as the default one (same branches of `vae.arch`, `*.lambdas`, ...); keys read only on a branch it
does not take would be missed, which is why a stage's own section is always declared whole.
Exit status 1 when dvc.yaml misses a dependency (and --write was not given).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stage_api(root: Path):
    "duotok.stage of the repository at `root` (not whichever duotok happens to be installed)."
    sys.path.insert(0, str(root))
    try:
        import duotok.stage as S
    finally:
        sys.path.pop(0)
    if Path(S.__file__).resolve().parents[1] != root.resolve():
        raise SystemExit(f"dvc_graph: imported duotok from {S.__file__}, not from {root} (set PYTHONPATH={root})")
    return S


def load_stages(root: Path = ROOT) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def _is_code(dep: str) -> bool:
    return dep.startswith("duotok/") or dep == "duotok"


def code_deps(name: str, spec: dict, root: Path = ROOT) -> list[str]:
    "The package source files stage `name` runs: its module's import closure + that of the notebooks it lists."
    S = _stage_api(root)
    pkg = S.package_dir()
    notebooks = [root / d for d in spec.get("deps", []) if str(d).endswith(".ipynb")]
    files = S.import_closure([pkg / "stages" / f"{name}.py", *notebooks])
    return sorted(str(f.relative_to(pkg.parent)) for f in files)


def computed_deps(name: str, spec: dict, root: Path = ROOT) -> list[str]:
    return [d for d in spec.get("deps", []) if not _is_code(str(d))] + code_deps(name, spec, root)


def missing_code_deps(name: str, spec: dict, root: Path = ROOT) -> list[str]:
    "Modules the stage imports that no `deps` entry covers (a file, or a folder above it)."
    listed = [str(d).rstrip("/") for d in spec.get("deps", [])]
    return [m for m in code_deps(name, spec, root) if not any(m == d or m.startswith(d + "/") for d in listed)]


def read_params(name: str, runs: Path) -> list[str] | None:
    "The params keys stage `name` read in its last run (None without a run record)."
    import json
    f = runs / f"{name}.json"
    if not f.exists():
        return None
    return json.loads(f.read_text()).get("params_read")


def computed_params(name: str, reads: list[str] | None, declared: list) -> list[str]:
    "Own section whole + the keys read from other sections; without a record, the declared list is kept."
    if reads is None:
        return list(declared)
    return [name] + sorted(k for k in reads if not (k == name or k.startswith(name + ".")))


def toy_project(dest: Path, root: Path = ROOT, n_songs: int = 3) -> Path:
    """A throwaway DVC + git project at `dest`: this repository's files (tracked and untracked-not-ignored,
    without the DVC store, data.dvc and dvc.lock), params.yaml = params.yaml + params/toy.yaml, and a
    generated `n_songs`-song corpus in data/songs tracked with `dvc add` (so that queued experiments,
    which run in a fresh copy, find it). Everything committed."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    skip = ("dvcstore/", "data.dvc", "dvc.lock")
    for f in files:
        if not f or f.startswith(skip) or not (root / f).is_file():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)
    S = _stage_api(root)
    from duotok.config import load_params_dict  # noqa: E402  (the repository's, imported by _stage_api)
    merged = load_params_dict(root / "params.yaml", profile=root / "params/toy.yaml")
    (dest / "params.yaml").write_text("# params.yaml + params/toy.yaml (toy project for tests)\n"
                                      + yaml.safe_dump(merged, sort_keys=False))
    (dest / ".dvc" / "config").write_text("[core]\n    analytics = false\n    autostage = true\n")
    env = {**os.environ, "PYTHONPATH": str(dest)}
    run = lambda *cmd: subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True, text=True)
    run(sys.executable, "-m", "duotok.corpus", "generate", "--n-songs", str(n_songs), "--seed", "0", "--out", "data/songs")
    run("git", "init", "-q", "-b", "main")
    run("git", "config", "user.email", "toy@duotok.invalid")
    run("git", "config", "user.name", "toy project")
    run(_dvc(), "add", "-q", "data")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "toy project")
    assert S is not None
    return dest


def _dvc() -> str:
    "The dvc next to this Python (the venv's), else the one on PATH."
    cand = Path(sys.executable).parent / "dvc"
    return str(cand) if cand.exists() else "dvc"


def write_dvc_yaml(stages: dict[str, tuple[list[str], list[str]]], root: Path = ROOT) -> None:
    "Replace deps/params of each stage in dvc.yaml (ruamel round trip: comments and order kept)."
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq
    y = YAML()
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    doc = y.load(path.read_text())
    for name, (deps, params) in stages.items():
        for key, val in (("deps", deps), ("params", params)):
            seq = CommentedSeq(val)
            if key == "params" and len(", ".join(val)) <= 100:   # short lists on one line, long ones one item a line
                seq.fa.set_flow_style()
            else:
                seq.fa.set_block_style()
            doc["stages"][name][key] = seq
    with open(path, "w") as f:
        y.dump(doc, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="repository (default: this one)")
    ap.add_argument("--runs", type=Path, default=None, help="run records to read params_read from "
                    "(default: <root>/outputs/.runs)")
    ap.add_argument("--toy", action="store_true", help="run the toy chain in a temp project first and use its records")
    ap.add_argument("--write", action="store_true", help="rewrite deps and params in dvc.yaml")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    runs = args.runs or root / "outputs" / ".runs"
    tmp = None
    if args.toy:
        tmp = Path(tempfile.mkdtemp(prefix="duotok-toy-"))
        proj = toy_project(tmp / "toy", root)
        print(f"[dvc_graph] toy chain in {proj} ...", flush=True)
        subprocess.run([_dvc(), "repro", "-q"], cwd=proj, check=True,
                       env={**os.environ, "PYTHONPATH": str(proj), "MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlruns.db'}"})
        runs = proj / "outputs" / ".runs"
    stages = load_stages(root)
    new, bad = {}, 0
    for name, spec in stages.items():
        deps = computed_deps(name, spec, root)
        params = computed_params(name, read_params(name, runs), spec.get("params", []))
        new[name] = (deps, params)
        miss = missing_code_deps(name, spec, root)
        reads = read_params(name, runs) or []
        S = _stage_api(root)
        unread = [k for k in reads if not S.covered(k, spec.get("params", []))]
        bad += bool(miss or unread)
        print(f"{name}:\n  deps: [{', '.join(deps)}]\n  params: [{', '.join(params)}]"
              + (f"\n  MISSING deps: {miss}" if miss else "") + (f"\n  MISSING params: {unread}" if unread else "")
              + ("" if (runs / f"{name}.json").exists() else f"\n  (no run record in {runs}: params as declared)"))
    if args.write:
        write_dvc_yaml(new, root)
        print(f"[dvc_graph] wrote {root / 'dvc.yaml'}")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if args.write or not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
