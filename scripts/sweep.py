#!/usr/bin/env python
"""Papermill sweep over a parameter grid of a stage or report notebook, logged under one MLflow parent run.

Each grid point executes the notebook once with papermill; the executed notebook, the grid point and the
resulting metrics are logged as a nested MLflow child run under one parent run named `sweep:<name>`.

Grid keys with a dot (`finetune.noise.p`) are params.yaml overrides: they are passed to the notebook as its
`overrides` list parameter (the stage runner `nbs/reports/run_stage.ipynb` forwards them as `--set`). Keys
without a dot are notebook parameters set directly (for example the report's `n_examples`).

Examples (from the repository root):

    # stage 2 noise probability, 3 points (each run rewrites outputs/finetune; `dvc checkout` restores it)
    python scripts/sweep.py --name noise-p --param stage=finetune \\
        --grid finetune.noise.p=0.0,0.3,0.6 --grid finetune.train.steps=20

    # report notebook parameters
    python scripts/sweep.py --name report --notebook nbs/reports/report.ipynb --grid n_examples=1,2

    # only print the grid and the equivalent DVC experiment commands
    python scripts/sweep.py --name noise-p --param stage=finetune --grid finetune.noise.p=0.0,0.3,0.6 --dry-run

The same grid as DVC experiments (results that will be cited; needs a git commit; runs the stage and all its
downstream stages in isolated experiment workspaces):

    dvc exp run --queue -S finetune.noise.p=0.0 -S finetune.train.steps=20
    dvc exp run --queue -S finetune.noise.p=0.3 -S finetune.train.steps=20
    dvc exp run --queue -S finetune.noise.p=0.6 -S finetune.train.steps=20
    dvc queue start -j 1
    dvc exp show --drop '.*' --keep 'Experiment|State|kbps|lm/dual/overall/ppl_1024$|lm/v2a/acc/ppl_1024$|recon/(vocals|acc)/mel_l1$|finetune\\.noise\\.p'
    # or, in one line, DVC's own grid syntax: dvc exp run --queue -S 'finetune.noise.p=0.0,0.3,0.6'
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_grid(items: list[str]) -> dict[str, list]:
    "['a.b=1,2', 'c=x'] -> {'a.b': [1, 2], 'c': ['x']} (values YAML-parsed)."
    grid: dict[str, list] = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"sweep: --grid needs KEY=V1,V2,..., got {it!r}")
        k, vs = it.split("=", 1)
        grid[k.strip()] = [yaml.safe_load(v) for v in vs.split(",")]
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    "Cartesian product of the grid as a list of {key: value}."
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def notebook_parameters(point: dict, fixed: dict) -> dict:
    "Split a grid point into papermill parameters: dotted keys become the `overrides` list."
    params = dict(fixed)
    ov = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items() if "." in k]
    if ov:
        params["overrides"] = list(params.get("overrides", [])) + ov
    params.update({k: v for k, v in point.items() if "." not in k})
    return params


# The columns `dvc exp show` keeps by default (it has ~550 otherwise): the experiment, its state, the bitrate and
# the headline results of eval/metrics.json; the swept params are added. README "Experiments" uses the same.
EXP_SHOW_KEEP = r"Experiment|State|kbps|lm/dual/overall/ppl_1024$|lm/v2a/acc/ppl_1024$|recon/(vocals|acc)/mel_l1$"


def hydra_value(v) -> str:
    "A value as DVC's `-S key=value` (Hydra override grammar) reads it back: YAML scalars, JSON-style lists."
    if isinstance(v, str):
        return v if v and all(c.isalnum() or c in "_-./" for c in v) else json.dumps(v)
    return json.dumps(v)


def exp_show_command(keys) -> str:
    "`dvc exp show` narrowed to the headline columns + the params in `keys`."
    extra = "".join("|" + re.escape(k) for k in keys)
    return "dvc exp show --drop '.*' --keep " + shlex.quote(EXP_SHOW_KEEP + extra)


def dvc_commands(points: list[dict]) -> list[str]:
    """The equivalent `dvc exp run --queue` commands (dotted keys only), then `dvc queue start` and a readable
    `dvc exp show`. Keys with a `/` (loss weights such as `finetune.lambdas.asr/ctc`) cannot be set with `-S`
    (Hydra's grammar has no `/` in keys): such a point is printed as a comment saying so."""
    cmds, keys = [], []
    for p in points:
        dotted = {k: v for k, v in p.items() if "." in k}
        bad = [k for k in dotted if "/" in k]
        if bad:
            cmds.append(f"# not expressible with dvc exp run -S (key with '/'): {bad}; edit params.yaml and run `dvc exp run`")
            continue
        if dotted:
            cmds.append("dvc exp run --queue " + " ".join("-S " + shlex.quote(f"{k}={hydra_value(v)}") for k, v in dotted.items()))
            keys += [k for k in dotted if k not in keys]
    return cmds + (["dvc queue start -j 1", exp_show_command(keys)] if keys else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="sweep name (MLflow parent run sweep:<name>, output folder)")
    ap.add_argument("--notebook", default="nbs/reports/run_stage.ipynb", help="notebook to execute per grid point")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="grid axis (repeatable)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="fixed notebook parameter")
    ap.add_argument("--out", default=None, help="folder for executed notebooks (default sweeps/<name>)")
    ap.add_argument("--stage-metrics", default=None, help="metrics.json to read after each point "
                    "(default outputs/<stage>/metrics.json when a `stage` parameter is set)")
    ap.add_argument("--root", default=None, help="project folder the stages run in (default: this repository); a copy "
                    "of the repository with its own outputs/ keeps the main workspace untouched")
    ap.add_argument("--dry-run", action="store_true", help="print the grid and the DVC commands, run nothing")
    args = ap.parse_args(argv)

    grid = parse_grid(args.grid)
    fixed = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}
    work = Path(args.root).resolve() if args.root else ROOT
    if args.root:
        fixed.setdefault("root", str(work))
    points = grid_points(grid) if grid else [{}]
    out = Path(args.out or ROOT / "sweeps" / args.name)
    print(f"sweep {args.name}: {len(points)} point(s) of {args.notebook}")
    for i, p in enumerate(points):
        print(f"  [{i}] {notebook_parameters(p, fixed)}")
    print("equivalent DVC experiments:\n  " + "\n  ".join(dvc_commands(points) or ["(no params.yaml keys in the grid)"]))
    if args.dry_run:
        return 0

    import mlflow
    import papermill as pm
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from duotok.tracking import start_run

    out.mkdir(parents=True, exist_ok=True)
    stage = fixed.get("stage")
    metrics_path = Path(args.stage_metrics) if args.stage_metrics else (work / "outputs" / stage / "metrics.json" if stage else None)
    summary = []
    with start_run(f"sweep:{args.name}", {"notebook": args.notebook, "grid": json.dumps(grid), "fixed": json.dumps(fixed)},
                   tags={"sweep": args.name}, root=ROOT) as parent:
        for i, p in enumerate(points):
            params = notebook_parameters(p, fixed)
            nb_out = out / f"{i:03d}.ipynb"
            t0 = time.time()
            status, metrics = "ok", {}
            with start_run(f"sweep:{args.name}/{i}", {"point": json.dumps(p), **{f"grid.{k}": v for k, v in p.items()}},
                           nested=True, tags={"sweep": args.name, "mlflow.parentRunId": parent.run_id}, root=ROOT) as child:
                try:
                    pm.execute_notebook(str(ROOT / args.notebook), str(nb_out), parameters=params, cwd=str(work),
                                        kernel_name="python3", language="python", progress_bar=False)
                except Exception as err:  # keep the sweep going; the failed notebook is still logged
                    status = f"failed: {type(err).__name__}"
                    print(f"  [{i}] {status}: {err}", file=sys.stderr)
                if status == "ok" and metrics_path is not None and metrics_path.exists():
                    metrics = json.loads(metrics_path.read_text())
                    child.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
                child.log_metrics({"sweep/wall_s": time.time() - t0}, step=0)
                child.set_tags({"status": status})
                if nb_out.exists():
                    child.log_artifact(nb_out, "notebooks")
            summary.append({"i": i, **p, "status": status, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
            print(f"  [{i}] {status} in {time.time() - t0:.0f} s")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        parent.log_artifact(out / "summary.json")
    print(f"sweep {args.name}: done -> {out}/summary.json (MLflow parent run sweep:{args.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
