"""dvc.yaml is honest about code and about params files.

Code: every package module a stage imports, transitively and including imports inside functions, is one
of its `deps` (else DVC would serve a stale output after that module changed), and no module it does not
import is (else DVC re-runs it for nothing). The params half (keys read vs `params:`) needs a run of the
stages: it is in tests/test_pipeline.py. `python scripts/dvc_graph.py --write` regenerates both.

Params files: `dvc exp run -S key=value` rewrites params.yaml through Hydra/OmegaConf + ruamel (YAML 1.2,
which drops the quotes of "no" and writes null as nothing); every section must load the same afterwards.
"""
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import yaml

from duotok.config import load_params

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dvc_graph", ROOT / "scripts" / "dvc_graph.py")
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)
STAGES = G.load_stages(ROOT)


def _regen_hint(name, spec):
    deps = "\n".join(f"      - {d}" for d in G.computed_deps(name, spec, ROOT))
    return f"regenerate with `python scripts/dvc_graph.py --write`; stage {name} should have\n    deps:\n{deps}"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_cover_every_module_it_imports(name):
    missing = G.missing_code_deps(name, STAGES[name], ROOT)
    assert not missing, f"dvc.yaml: stage {name} imports {missing} but does not depend on them; " + _regen_hint(name, STAGES[name])


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_list_no_module_it_does_not_import(name):
    code = set(G.code_deps(name, STAGES[name], ROOT))
    extra = [d for d in STAGES[name]["deps"] if G._is_code(str(d)) and d not in code]
    assert not extra, f"dvc.yaml: stage {name} depends on {extra}, which it never imports (spurious re-runs); " + \
        _regen_hint(name, STAGES[name])


def test_the_check_fails_when_a_dependency_is_removed():
    "The check above can fail: drop one module evaluate imports only inside a function, and it is named."
    spec = {**STAGES["evaluate"], "deps": [d for d in STAGES["evaluate"]["deps"] if d != "duotok/tokenizer.py"]}
    assert G.missing_code_deps("evaluate", spec, ROOT) == ["duotok/tokenizer.py"]
    folder = {**spec, "deps": spec["deps"] + ["duotok"]}          # a folder dep covers the modules inside it
    assert G.missing_code_deps("evaluate", folder, ROOT) == []


def test_report_depends_on_what_its_notebook_imports():
    nb_only = set(G.code_deps("report", STAGES["report"], ROOT)) - set(
        G.code_deps("report", {**STAGES["report"], "deps": []}, ROOT))
    assert "duotok/metrics.py" in nb_only, "nbs/reports/report.ipynb imports duotok.metrics inside a cell's function"


def _dvc_set(path: Path, *overrides: str) -> None:
    "Exactly what `dvc exp run -S` does to params.yaml."
    from dvc.utils.hydra import apply_overrides
    apply_overrides(str(path), list(overrides))


def _numeric_leaf(d: dict, prefix: str):
    for k, v in d.items():
        if "/" in k:      # Hydra's override grammar has no `/` in keys (lambdas like mlm/ce cannot be set with -S)
            continue
        if isinstance(v, dict):
            found = _numeric_leaf(v, f"{prefix}{k}.")
            if found: return found
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{prefix}{k}", v


@pytest.mark.parametrize("section", list(yaml.safe_load((ROOT / "params.yaml").read_text())))
def test_every_section_survives_a_dvc_exp_rewrite(tmp_path, section):
    "Set one number of the section with DVC's own writer: params.yaml still loads, only that key changed."
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    raw = yaml.safe_load(p.read_text())
    key, value = _numeric_leaf(raw[section], f"{section}.")
    new = value * 2      # doubling keeps the divisibility rules (hop | rate, heads | width) true
    _dvc_set(p, f"{key}={new}")
    assert p.read_text() != (ROOT / "params.yaml").read_text(), "DVC rewrote the file"
    before, after = load_params(ROOT / "params.yaml").flat(), load_params(p).flat()
    assert {k for k in before if before[k] != after[k]} == {key}, "only the key that was set changed"
    assert after[key] == new


def test_dvc_writes_mixed_precision_unquoted_and_it_still_loads(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    _dvc_set(p, "ssl.train.mixed_precision=bf16")
    text = p.read_text()
    assert re.search(r"mixed_precision: no\b(?! ?\")", text), "DVC drops the quotes of every other 'no' (the failure this guards)"
    assert yaml.safe_load(text)["vae"]["train"]["mixed_precision"] is False
    p2 = load_params(p)
    assert p2.ssl.train.mixed_precision == "bf16" and p2.vae.train.mixed_precision == "no"
    assert p2.finetune.train.mixed_precision == "auto"


def test_sweep_dry_run_prints_commands_dvc_can_parse():
    "Each `-S` of scripts/sweep.py's dvc commands parses with DVC's own Hydra grammar, back to the grid value."
    import shlex
    from hydra.core.override_parser.overrides_parser import OverridesParser
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    grid = {"finetune.noise.p": [0.0, 0.5], "finetune.noise.mode": ["additive"], "ssl.probe.grid": [[1e-3, 0.1]],
            "vae.pretrained": ["/data/my vae"], "finetune.asr_blank_bias": [None], "codebook.cache_lower": [False]}
    points = sweep.grid_points(grid)
    cmds = sweep.dvc_commands(points)
    assert len(cmds) == len(points) + 2 and cmds[-2] == "dvc queue start -j 1"
    parser = OverridesParser.create()
    for cmd, point in zip(cmds, points):
        args = shlex.split(cmd)
        assert args[:4] == ["dvc", "exp", "run", "--queue"]
        sets = [a for i, a in enumerate(args) if args[i - 1] == "-S"]
        parsed = {o.key_or_group: o.value() for o in parser.parse_overrides(sets)}
        assert parsed == {k: (list(v) if isinstance(v, tuple) else v) for k, v in point.items()}, (cmd, parsed)
    show = shlex.split(cmds[-1])
    assert show[:3] == ["dvc", "exp", "show"] and "finetune\\.noise\\.p" in show[-1]
    assert sweep.dvc_commands([{"finetune.lambdas.asr/ctc": 0.1}])[0].startswith("# not expressible")
