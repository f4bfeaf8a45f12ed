"""Every command in README.md is tested, so a README command cannot rot.

The test extracts from README.md the fenced ```bash / ```sh / ```console blocks (one command per line,
backslash continuations joined, comments dropped), the ```python blocks, and the inline `code` spans whose
first word is a program (`COMMAND_WORDS`). Each command must be listed in exactly one of

- `RUN`: executed as written (in a temporary copy of the repository, or in a temporary folder with a tiny
  input), exit status 0 and a check of what it printed;
- `CHECK`: only checked, because running it costs minutes or needs a GPU, a network or a trained model:
  `bash -n` parses it, `make` targets exist (`make -n`), modules, scripts, CLI subcommands and every flag
  used exist (`--help` of that exact subcommand), `--set` / `-S` keys are valid params keys with values of
  the right type (`load_params`), notebooks and their papermill parameters exist, files exist.

A command in neither list fails the test (classify a new README command here). Fenced blocks without a
language are diagrams, outputs and file layouts; one whose line starts with a program fails too (tag it
```bash). `test_checks_can_fail` shows each kind of check rejecting a broken variant.
"""
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
COMMAND_WORDS = {"make", "dvc", "python", "duotok", "papermill", "jupyter", "torchrun", "accelerate", "nbdev-export",
                 "nbdev-clean", "nbdev-test", "git", "rm", "conda", "pip", ".ci/run", "bash", "mlflow"}
SHELL_LANGS = {"bash", "sh", "console"}

# ---------------------------------------------------------------------------------------------- the lists
# executed as written (where: "copy" = a temporary copy of the repository, "tmp" = a temporary folder with a
# tiny input, "root" = the repository itself, read only); the value is what the output must contain
RUN = {
    "python scripts/sweep.py --help": ("root", "--dry-run"),
    "dvc metrics show": ("copy", ""),
    "dvc exp show --drop '.*' --keep 'Experiment|State|kbps|lm/dual/overall/ppl_1024$|lm/v2a/acc/ppl_1024$|"
    "recon/(vocals|acc)/mel_l1$|finetune\\.noise\\.p'": ("copy", "finetune.noise.p"),
    "python -m duotok.corpus validate data/songs": ("tmp", "2 song"),
    "duotok info song.npz": ("tmp", "tokens"),
}
# only checked (see the module docstring for what is checked)
CHECK = {
    # set-up and the two commands: minutes to an hour
    "make repro", "make test", "make lab", "make mlflow-ui", "make dvc-graph", ".ci/run",
    "conda env create -f environment.yml", "git clone . /tmp/x && cd /tmp/x && make repro",
    "jupyter lab --ip 127.0.0.1 --no-browser --allow-root --LabApp.news_url=None "
    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate nbs",
    "nbdev-export && nbdev-clean",                                     # scripts/check_nbdev.py runs both
    "python scripts/dvc_graph.py",                     # 10 s of imports; tests/test_dvc_graph.py runs its code
    # the whole pipeline or one training stage
    "dvc repro", "dvc exp run", "dvc exp show", "accelerate launch", "dvc exp run -S codebook.beta=0.3",
    "dvc repro experiments/ablate/dvc.yaml",                          # ~2 h; tests/test_ablations.py runs its parts
    "dvc status dvc.yaml", "dvc status",                               # tests/test_pipeline.py runs the first
    "dvc exp run --queue -S finetune.noise.p=0.5 -S finetune.noise.mode=additive",
    "dvc exp run --queue -S 'finetune.noise.p=0.0,0.2,0.5'", "dvc exp run --queue -S ...", "dvc queue start -j 1",
    "dvc exp run -S render.songs_dir=/path/to/musdb18hq", "dvc commit <stage>", "dvc add data && dvc push",
    "python -m duotok.stages.ssl --set ssl.train.steps=100", "python -m duotok.stages.ssl --restart",
    "rm -r outputs/.resume/ssl",
    "papermill nbs/33_stage_finetune.ipynb out.ipynb -p run_stage True -p overrides '[\"finetune.noise.p=0.5\"]'",
    # the quick start: set-up takes minutes the first time; tests/test_demo.py runs the same code on a toy package
    "make demo", "make pretrained", "duotok demo --song my_song/ -o outputs/demo_mine", "dvc pull pretrained/default.dvc",
    # need a trained package (outputs/decoder/package) or take minutes
    "duotok encode --model outputs/decoder/package --vocals v.wav --accompaniment a.wav -o song.npz",
    "duotok decode song.npz --model outputs/decoder/package -o decoded/",
    "python bench/bench_encoder.py", "python bench/bench_encode.py", "python bench/bench_decode.py",
    "python -m duotok.bench", "make bench",                 # the Speed section: minutes on 2 cores (tests/test_bench.py runs --quick)
    # tokens to music: need a trained package and LMs
    "duotok tokenize outputs/render/songs -o data/tokens --model outputs/decoder/package",
    "duotok lm train data/tokens -o lm/",
    "duotok generate --vocals vocal.wav --model outputs/decoder/package --lm lm/ -o out/",
    "duotok encode --model outputs/decoder/package --mix song.wav -o song.npz",
    # the paper profile: an hour on CPU or a GPU
    "make paper", "make test-slow", "python scripts/paper_plan.py", "duotok tokenize",
    # the scale simulation: about two hours on one core
    "python bench/scale_sim.py",
    # several processes / nodes / GPUs
    "torchrun --standalone --nproc_per_node=N -m duotok.stages.finetune",
    "accelerate launch --multi_gpu --num_processes N -m duotok.stages.finetune",
    "torchrun --nnodes=NNODES --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 "
    "--rdzv_id=duotok-finetune -m duotok.stages.finetune",
    "accelerate launch -m duotok.stages.finetune",
    "torchrun --standalone --nproc_per_node=N -m duotok.stages.finetune --set finetune.train.mixed_precision=fp16",
}
# ```python blocks of the README: "run" or "check" (compiles, and its `from duotok import ...` names exist)
PYTHON: dict[str, str] = {
    # the quick start: needs the pulled package (tests/test_demo.py runs encode + decode on a toy package)
    'from pathlib import Path\nfrom duotok import DuoTok, load_audio, save_audio\n\n'
    'tok = DuoTok.from_pretrained("pretrained/default")          # after make demo (or dvc pull pretrained/default.dvc)\n'
    'song = sorted(Path("pretrained/default/example").iterdir())[0]\n'
    'vocals, sr = load_audio(song / "vocals.flac")\n'
    'accompaniment, _ = load_audio(song / "accompaniment.flac", sr=sr)\n'
    'tokens = tok.encode(vocals, accompaniment, sr)               # DualTokens: 2 streams x 25 tokens/s\n'
    'audio = tok.decode(tokens)                                   # .vocals, .accompaniment, .mix at 48 kHz\n'
    'save_audio("decoded_mix.wav", audio.mix, audio.sample_rate)': "check",
}
PLACEHOLDERS = {"<stage>": "ssl", "...": "codebook.beta=0.3"}     # README placeholders -> a value to check with


# ---------------------------------------------------------------------------------------------- extraction
def readme_snippets(text: str) -> tuple[list[str], list[str], list[str]]:
    "(shell commands, python blocks, problems) of a README text."
    cmds, pys, problems, outside = [], [], [], []
    lines, i = text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if not m:
            outside.append(lines[i]); i += 1; continue
        lang, body, i = m.group(1).lower(), [], i + 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]): body.append(lines[i]); i += 1
        i += 1
        if lang in SHELL_LANGS: cmds += shell_commands(body, console=lang == "console")
        elif lang == "python": pys.append("\n".join(body))
        elif lang in ("", "text"):
            for l in body:
                if l.split() and l.split()[0] in COMMAND_WORDS:
                    problems.append(f"a command in an untagged block (tag it ```bash): {l.strip()}")
        else: problems.append(f"a ```{lang} block: add its language to tests/test_readme.py")
    for span in re.findall(r"`([^`\n]+)`", "\n".join(outside)):
        words = span.split()
        if words[0] in COMMAND_WORDS and (len(words) > 1 or "/" in words[0]):    # `duotok`, `torchrun`: names
            cmds.append(span.strip())
    return list(dict.fromkeys(cmds)), pys, problems


def shell_commands(body: list[str], console: bool = False) -> list[str]:
    "The commands of a shell block: continuations joined, `$ ` prompts and comments dropped."
    out, cur = [], ""
    for l in body:
        if console:
            if not l.startswith("$ ") and not cur: continue          # output lines
            l = l[2:] if l.startswith("$ ") else l
        if not cur and l.lstrip().startswith("#"): continue
        cur += l.rstrip()[:-1] + " " if l.rstrip().endswith("\\") else l
        if not l.rstrip().endswith("\\"):
            cur = re.sub(r"\s+#\s.*$", "", cur).strip()              # a trailing `  # comment`
            if cur: out.append(re.sub(r"\s+", " ", cur))
            cur = ""
    return out


SHELL, PY, PROBLEMS = readme_snippets(README.read_text())


# ---------------------------------------------------------------------------------------------- checking
@functools.cache
def help_text(*argv: str) -> str:
    "stdout + stderr of `argv --help` (cached); raises if it exits non-zero."
    r = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env())
    if r.returncode: raise AssertionError(f"`{' '.join(argv)} --help` exits {r.returncode}: {r.stderr[-500:]}")
    return r.stdout + r.stderr


def _is_subcommand(word: str, parent_help: str) -> bool:
    "`word` is listed as a subcommand (`{a,word,b}`, an indented `word  help` line, or an alias `(word)`)."
    w = re.escape(word)
    return bool(re.search(rf"[{{,]{w}[,}}]|^\s+{w}(\s|$)|\({w}\)", parent_help, re.M))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true", "COLUMNS": "200"}


def _flags_in(words: list[str], helptext: str, what: str) -> None:
    "Every option in `words` appears in `helptext` as an option."
    for w in words:
        if not w.startswith("-") or w in ("-", "--"): continue
        flag = w.split("=", 1)[0]
        if not re.search(rf"(^|[\s\[,]){re.escape(flag)}([\s\]=,]|$)", helptext, re.M):
            raise AssertionError(f"{what}: no option {flag} (see `{what} --help`)")


def _check_override(kv: str, what: str) -> None:
    "`section.key=value` (a grid `v1,v2` for `dvc exp run -S`) is a params key taking that value."
    from duotok.config import load_params
    key, _, raw = kv.partition("=")
    values = raw.split(",") if what.startswith("dvc") and "," in raw else [raw]
    for v in values: load_params(ROOT / "params.yaml", [f"{key}={v}"])


def _split_opts(argv: list[str], takes_value: set[str]) -> tuple[list[str], list[str]]:
    "(options with their values, positionals) of an argv tail."
    opts, pos, i = [], [], 0
    while i < len(argv):
        w = argv[i]
        if w.startswith("-"):
            opts.append(w)
            if "=" not in w and w in takes_value and i + 1 < len(argv): opts.append(argv[i + 1]); i += 1
        else: pos.append(w)
        i += 1
    return opts, pos


def check_simple(argv: list[str]) -> None:
    "Check one simple command (no `&&`): its program, subcommand, flags and values exist."
    prog, rest = argv[0], argv[1:]
    if prog == "cd": return
    if prog == "make":
        for t in rest:
            r = subprocess.run(["make", "-n", t], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"make: no target {t!r}: {r.stderr.strip()}"
    elif prog == "dvc":
        sub = []
        while rest and not rest[0].startswith("-") and _is_subcommand(rest[0], help_text(str(BIN / "dvc"), *sub)):
            sub.append(rest.pop(0))
        assert sub, f"dvc: no subcommand {rest[:1]}"
        h = help_text(str(BIN / "dvc"), *sub)
        _flags_in(rest, h, f"dvc {' '.join(sub)}")
        for i, w in enumerate(rest):
            if w in ("-S", "--set-param") and i + 1 < len(rest): _check_override(rest[i + 1], "dvc")
            if w in ("--keep", "--drop") and i + 1 < len(rest): re.compile(rest[i + 1])
        if sub == ["commit"]:
            stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
            assert all(s in stages for s in rest if not s.startswith("-")), f"dvc commit: no stage {rest}"
    elif prog in ("python", "torchrun", "accelerate"):
        if prog == "accelerate":
            assert rest, "accelerate: no subcommand"
            h = help_text(str(BIN / "accelerate"), rest[0]); what, rest = f"accelerate {rest[0]}", rest[1:]
        elif prog == "torchrun": h, what = help_text(str(BIN / "torchrun")), "torchrun"
        else: h, what = "-m", "python"
        launcher = rest[:rest.index("-m")] if "-m" in rest else []
        if prog != "python": _flags_in([w for w in launcher if w.startswith("-")], h, what)
        if "-m" in rest:
            mod, args = rest[rest.index("-m") + 1], rest[rest.index("-m") + 2:]
            sub = []              # `python -m duotok.corpus validate ...`: one --help call tells (its usage names it)
            if args and not args[0].startswith("-"):
                usage = help_text(sys.executable, "-m", mod, args[0]).split("\n\n")[0]
                if f" {args[0]} " in f"{usage} ": sub = [args.pop(0)]
            _check_program([sys.executable, "-m", mod, *sub], args, f"python -m {mod} {' '.join(sub)}".strip())
        elif prog == "python":
            script = ROOT / rest[0]
            assert script.is_file(), f"python: no file {rest[0]}"
            compile(script.read_text(), str(script), "exec")
            if rest[1:]: _check_program([sys.executable, str(script)], rest[1:], f"python {rest[0]}")
    elif prog == "duotok":
        assert rest and _is_subcommand(rest[0], help_text(str(BIN / "duotok"))), f"duotok: no subcommand {rest[:1]}"
        sub = rest[:1]                              # nested subcommands: `duotok lm train ...`
        while len(rest) > len(sub) and not rest[len(sub)].startswith("-") \
                and _is_subcommand(rest[len(sub)], help_text(str(BIN / "duotok"), *sub)):
            sub = rest[:len(sub) + 1]
        _check_program([str(BIN / "duotok"), *sub], rest[len(sub):], f"duotok {' '.join(sub)}")
    elif prog == "papermill":
        h = help_text(str(BIN / "papermill"))
        opts, pos = _split_opts(rest, {"-p", "-k", "--cwd", "-f", "-y", "-r"})
        _flags_in(opts, h, "papermill")
        nb = ROOT / pos[0]
        assert nb.is_file(), f"papermill: no notebook {pos[0]}"
        params = subprocess.run([str(BIN / "papermill"), "--help-notebook", str(nb)], capture_output=True, text=True,
                                timeout=120).stdout
        for i, w in enumerate(rest):
            if w == "-p": assert re.search(rf"^\s*{re.escape(rest[i + 1])}:", params, re.M), \
                f"papermill: {pos[0]} has no parameter {rest[i + 1]}:\n{params}"
    elif prog == "jupyter":
        recipe = re.search(r"^lab:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
        recipe = " ".join(recipe.replace("\\\n", " ").split()).split("&& ", 1)[-1]
        assert recipe == " ".join(argv), f"README's jupyter command differs from `make lab`:\n{recipe}"
    elif prog == "rm":
        for p in (w for w in rest if not w.startswith("-")):
            parent = p.rstrip("/").rsplit("/", 1)[0]
            assert any(parent in f.read_text() for f in (ROOT / "duotok").rglob("*.py")), f"rm: no code writes {parent}"
    elif prog == "conda":
        assert rest[:2] == ["env", "create"] and yaml.safe_load((ROOT / rest[rest.index("-f") + 1]).read_text())["dependencies"]
    elif prog == ".ci/run":
        assert os.access(ROOT / ".ci/run", os.X_OK), ".ci/run is not executable"
    elif prog == "git": assert rest[0] in ("clone",), f"git {rest[0]}: not classified"
    elif prog in ("nbdev-export", "nbdev-clean"): help_text(str(BIN / prog))
    else: raise AssertionError(f"no checker for program {prog!r}")


def _check_program(argv: list[str], args: list[str], what: str) -> None:
    "`argv --help` succeeds, lists every flag in `args`; `--set` values are valid overrides."
    h = help_text(*argv)
    _flags_in(args, h, what)
    for i, w in enumerate(args):
        if w == "--set" and i + 1 < len(args): _check_override(args[i + 1], what)


def check_command(cmd: str) -> None:
    "`bash -n` parses `cmd` (placeholders filled in), then each simple command is checked."
    for k, v in PLACEHOLDERS.items(): cmd = cmd.replace(k, v)
    r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    assert r.returncode == 0, f"bash -n: {r.stderr}"
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    part: list[str] = []
    for w in [*lex, ";"]:
        if w in ("&&", "||", ";", "|"):
            if part: check_simple(part)
            part = []
        else: part.append(w)


# ---------------------------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    "A git repository holding the files of this working tree that git tracks or would track."
    d = tmp_path_factory.mktemp("readme") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (d / f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT / f, d / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for c in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run([*git, *c], cwd=d, check=True, capture_output=True)
    return d


def tiny_inputs(d: Path) -> None:
    "The inputs the `tmp` commands name: a 2-song recipe corpus in data/songs, a token file song.npz."
    import numpy as np
    from duotok import DualTokens
    from duotok.corpus import generate_corpus
    generate_corpus(d / "data" / "songs", n_songs=2)
    g = np.random.default_rng(0)
    DualTokens(g.integers(0, 256, 100), g.integers(0, 256, 100), 25, (256, 256), "readme").save(d / "song.npz")


def run_command(cmd: str, where: str, expect: str, repo: Path, tmp: Path) -> str:
    cwd = {"root": ROOT, "copy": repo, "tmp": tmp}[where]
    env = {**_env(), "PATH": f"{BIN}:{os.environ['PATH']}"}
    if where != "root": env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlruns.db'}"
    r = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=300, env=env,
                       executable="/bin/bash")
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"`{cmd}` exits {r.returncode}:\n{out[-3000:]}"
    assert expect in out, f"`{cmd}`: {expect!r} not in its output:\n{out[-3000:]}"
    return out


# ---------------------------------------------------------------------------------------------- tests
def test_every_readme_command_is_classified():
    assert not PROBLEMS, PROBLEMS
    unknown = [c for c in SHELL if c not in RUN and c not in CHECK]
    assert not unknown, ("README commands in neither RUN nor CHECK of tests/test_readme.py (classify them):\n  "
                         + "\n  ".join(unknown))
    stale = [c for c in [*RUN, *CHECK] if c not in SHELL]
    assert not stale, "listed in tests/test_readme.py but no longer in README.md (remove them):\n  " + "\n  ".join(stale)
    assert not set(RUN) & CHECK
    assert [p for p in PY if p not in PYTHON] == [], "README ```python blocks not in PYTHON (classify them)"


@pytest.mark.parametrize("cmd", sorted(c for c in SHELL if c not in RUN), ids=lambda c: c[:60])
def test_checked_command(cmd):
    "CHECK commands, and unclassified ones too (so a broken flag is named beside the missing classification)."
    check_command(cmd)


def test_run_commands(repo_copy, tmp_path):
    "Run every RUN command (each is first checked like the others)."
    tiny_inputs(tmp_path)
    for cmd, (where, expect) in RUN.items():
        if cmd not in SHELL: continue                       # reported by test_every_readme_command_is_classified
        check_command(cmd)
        out = run_command(cmd, where, expect, repo_copy, tmp_path)
        if cmd.startswith("dvc exp show"):                  # the README's narrow table: a few columns, every one kept
            args = shlex.split(cmd)
            keep = re.compile(args[args.index("--keep") + 1])
            csv = run_command(cmd + " --csv", where, "", repo_copy, tmp_path).splitlines()[0].split(",")
            assert all(keep.search(c) for c in csv) and len(csv) <= 12, csv


def test_python_blocks():
    "Each ```python block compiles and imports only public names; the `run` ones execute."
    import duotok
    for block in PY:
        code = compile(block, "README.md", "exec")
        for names in re.findall(r"^\s*from duotok import (.+)$", block, re.M):
            assert all(n.strip() in duotok.__all__ for n in names.split(",")), names
        if PYTHON.get(block) == "run": exec(code, {})


def test_papermill_needs_no_kernel_option(tmp_path):
    "The README's papermill lines pass no `-k`: a cleaned notebook's kernel spec names an installed kernel."
    r = subprocess.run([str(BIN / "papermill"), str(ROOT / "nbs" / "index.ipynb"), str(tmp_path / "out.ipynb"),
                        "--cwd", str(ROOT / "nbs")], capture_output=True, text=True, timeout=300,
                       env={**_env(), "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("bad, msg", [
    ("dvc repro -S render.songs_dir=/x", "no option -S"),                     # -S exists only on `dvc exp run`
    ("dvc exp run -S codebook.betta=0.3", "betta"),                           # not a params key
    ("dvc exp run -S codebook.beta=abc", "codebook.beta"),                    # wrong type
    ("dvc exp show --only-changed --kep x", "no option --kep"),
    ("make reproduce", "no target"),
    ("python -m duotok.stages.ssl --sett ssl.train.steps=1", "no option --sett"),
    ("duotok encode --vocal v.wav", "no option --vocal"),
    ("duotok tokenise x", "no subcommand"),
    ("papermill nbs/32_stage_finetune.ipynb out.ipynb", "no notebook"),
    ("papermill nbs/33_stage_finetune.ipynb out.ipynb -p run_stages True", "no parameter run_stages"),
    ("torchrun --nproc-per-nodes=2 -m duotok.stages.finetune", "no option"),
    ("python bench/bench_missing.py", "no file"),
    ("echo 'unclosed", "bash -n"),
])
def test_checks_can_fail(bad, msg):
    with pytest.raises(Exception, match=re.escape(msg)):
        check_command(bad)
