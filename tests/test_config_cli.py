"""The `fuyou` command line is generated from fuyou.config: every setting is one flag whose help shows
its default once, the parser's defaults are the dataclasses' own, and errors are one line."""
import ast
import dataclasses
import os
import re
import subprocess
import sys

import pytest

import fuyou
from fuyou import config
from fuyou.cli import COMMANDS, build_parser, main
from fuyou.cli.args import build, settings
from fuyou.config import CLI, SECTION, OptimConfig, StateConfig
from fuyou.planning.settings import PlanConfig

REQUIRED = {"export": {"store": "s", "to": "out"}, "profile": {"trace": "trace.json"}}  # values for the settings each command needs (export: --store or --run-dir)
# Fields that stay off the command line (library callers set them; the command sets PlanConfig.device from --device).
OFF_THE_COMMAND_LINE = {"OptimConfig.beta1", "OptimConfig.beta2", "OptimConfig.eps", "PlanConfig.device"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def required_argv(name):
    return [a for k, v in REQUIRED.get(name, {}).items() for a in (f"--{k}", v)]


def help_entries(text):
    """[(flag, its help entry joined on one line)] in the order --help lists them."""
    entries, current = [], None
    for line in text.splitlines():
        m = re.match(r"^  (--[a-z0-9-]+)", line)
        if m:
            current = [m.group(1), line]
            entries.append(current)
        elif current and line.startswith("      "):
            current[1] += " " + line.strip()
        else:
            current = None  # a group title or a blank line ends the entry
    return [(flag, " ".join(entry.split())) for flag, entry in entries]


def command_help(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_setting_is_one_flag_with_its_default_once(name, capsys, monkeypatch):
    text = command_help(name, capsys, monkeypatch)
    entries = help_entries(text)
    flags = [f for f, _ in entries if f != "--help"]
    items = list(settings(COMMANDS[name][0]))
    assert sorted(flags) == sorted(s.flag for s in items), "a flag is missing, doubled or not a setting"
    by_flag = dict(entries)
    for s in items:
        entry = by_flag[s.flag]
        assert s.spec.help.split()[0] in entry
        shown = re.findall(r"\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)", entry)
        meaningless = s.is_switch or s.field.default in (None, dataclasses.MISSING)
        if s.spec.shown is not None:
            assert shown == [" ".join(s.spec.shown.split())], entry
        elif meaningless:
            assert entry.count("default:") == 0, entry
        else:  # the default shown is the dataclass's, read back the way the flag reads it
            assert len(shown) == 1, entry
            assert (s.spec.parse or s.kind)(shown[0]) == s.field.default, entry
    for meaningless in ("(default: None)", "(default: True)", "(default: False)", "(default: ==SUPPRESS==)"):
        assert meaningless not in text


@pytest.mark.parametrize("name", list(COMMANDS))
def test_parser_defaults_are_the_dataclass_defaults(name):
    cls = COMMANDS[name][0]
    args = build_parser().parse_args([name, *required_argv(name)])
    given = REQUIRED.get(name, {})
    for s in settings(cls):
        if s.field.default is not dataclasses.MISSING and s.dest not in given:
            assert getattr(args, s.dest) == s.field.default, s.dest
        elif s.dest in given:
            assert getattr(args, s.dest) == given[s.dest], s.dest
    assert build(cls, args) == cls(**REQUIRED.get(name, {}))


def _fields_of(cls):
    for f in dataclasses.fields(cls):
        if SECTION in f.metadata:
            yield from _fields_of(f.metadata[SECTION])
        else:
            yield cls, f


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_field_is_a_setting_unless_kept_off_on_purpose(name):
    for cls, f in _fields_of(COMMANDS[name][0]):
        assert CLI in f.metadata or f"{cls.__name__}.{f.name}" in OFF_THE_COMMAND_LINE, f"{cls.__name__}.{f.name} has no flag"


def test_finetune_and_plan_share_the_batch_and_state_settings():
    def by_flag(cls):
        return {s.flag: s.field for s in settings(cls)}

    fine, plan = by_flag(COMMANDS["finetune"][0]), by_flag(COMMANDS["plan"][0])
    for flag in ("--batch-size", "--micro-batches", "--seq-len", "--weights", "--master", "--optim-states", "--device"):
        assert fine[flag] is plan[flag] or fine[flag].metadata[CLI] == plan[flag].metadata[CLI], flag
    for flag in ("--cache-mem", "--recompute", "--disk-mode", "--max-grad-norm"):  # the plan is made for the run's own defaults
        assert plan[flag].default == fine[flag].default, flag


def test_plan_with_fp8_weights(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FUYOU_CONFIG_DIR", str(tmp_path / "cfg"))
    assert main(["plan", "--device", "cpu", "--weights", "fp8", "--max-prefetch-depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "fp8 weights" in out and "chosen plan" in out and "--weights fp8" in out


def test_planner_reads_fp8_weights_as_one_byte_codes(monkeypatch, tmp_path):
    monkeypatch.setenv("FUYOU_CONFIG_DIR", str(tmp_path / "cfg"))
    from fuyou.planning.rates import load_rates
    from fuyou.planning.search import make_plan
    from fuyou.step.graph import bytes_per_step

    rates, _src = load_rates("cpu")
    plans = {w: make_plan(PlanConfig(state=StateConfig(weights=w), max_prefetch_depth=1, cache_mem_bytes=0), rates) for w in ("bf16", "fp8")}
    parts = {p.part for lay in plans["fp8"].shape.store.layouts.values() for p in lay.kinds["weights"].parts}
    assert {"codes", "scales"} <= parts
    read = {w: bytes_per_step(p.result.best.prediction.trace.events)["ssd read"] for w, p in plans.items()}
    assert read["fp8"] < read["bf16"]


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--gpu-mem", "lots"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuyou: error: ") and "4GiB" in err[0], err
    with pytest.raises(SystemExit):
        main(["plan", "--weights", "fp16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice" in err[0] and "fp8" in err[0], err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["finetune", "--disk-mode", "lean", "--max-grad-norm", "1"], "needs --disk-mode safe"),
        (["finetune", "--lr", "0"], "--lr"),
        (["finetune", "--resume", "--overwrite"], "contradict"),
        (["plan", "--ssd-bw", "0"], "--ssd-bw must be > 0"),
        (["probe", "--hidden", "30", "--heads", "4"], "divisible by --heads"),
    ],
)
def test_invalid_combination_is_one_line_before_anything_runs(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuyou: error: ") and match in err[0], err
    assert os.listdir(tmp_path) == []  # no store was created


def test_learning_rate_default_depends_on_where_the_weights_come_from():
    assert OptimConfig().with_default_lr(from_scratch=True).lr == config.LR_FROM_SCRATCH == 1e-3
    assert OptimConfig().with_default_lr(from_scratch=False).lr == config.LR_FINETUNE == 1e-5
    assert OptimConfig(lr=0.5).with_default_lr(from_scratch=True).lr == 0.5
    from fuyou.optim.schedule import lr_schedule

    with pytest.raises(ValueError, match="unset"):
        lr_schedule(OptimConfig())


def test_codec_names_are_the_codecs_fuyou_optim_implements():
    from fuyou.model.source import DEFAULT_PRESET, PRESETS
    from fuyou.optim import codecs, state

    assert config.WEIGHT_CODECS == tuple(state.WEIGHT_DTYPES)
    assert config.MASTER_CODECS == codecs.MASTER_CODECS and config.MOMENT_CODECS == codecs.STATE_CODECS
    assert config.DEFAULT_MODEL == DEFAULT_PRESET and config.DEFAULT_MODEL in PRESETS


def test_config_imports_nothing_of_fuyou():
    tree = ast.parse(open(config.__file__).read())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("fuyou"))]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith("fuyou")]
    assert modules == []


@pytest.mark.parametrize("module", ["fuyou", "fuyou.cli"])
def test_version(module):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fuyou {fuyou.__version__}", proc.stderr
