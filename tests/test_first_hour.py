"""What a newcomer meets in the first hour: the run directory re-used with another model,
wrong shard paths, `dide-data inspect`, the help, version and --print-config of every
command, one-line errors from dide-eval / dide-submit / export / Predictor, and the
console messages.  Console-level tests call each command's main(argv) and read its exit
code and stderr."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_ARCH, tiny_overrides

from dide_scale.config import load_config, shipped_configs
from dide_scale.train import main as pretrain_main

WIDE_ARCH = TINY_ARCH.replace("width: 32", "width: 64")


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def tree(d: Path) -> dict[str, str]:
    """Every file under ``d`` with a hash of its bytes (what "nothing written" compares)."""
    return {str(p.relative_to(d)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(demo_shards, tmp_path_factory):
    """A finished 4-step tiny VQA run: checkpoints, export/, best/, config.yaml."""
    out = tmp_path_factory.mktemp("first_hour") / "run"
    assert pretrain_main(["--config", "debug", *tiny_overrides(demo_shards, out)]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- a re-used run directory --------------------------------------------------------------
def test_a_changed_model_shape_is_refused_before_anything_is_written(finished_run, demo_shards, capsys):
    before = tree(finished_run)
    argv = ["--config", "debug", *tiny_overrides(demo_shards, finished_run, **{"student.arch": WIDE_ARCH})]
    assert pretrain_main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("dide-pretrain: error: train.output_dir=")
    assert "student.arch.width 32 -> 64" in line  # the key that differs, with both values
    assert "new train.output_dir" in line and "--start-over" in line  # the two ways out
    assert tree(finished_run) == before  # not a byte: no lease, no config.yaml, no logs
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert line.replace(str(finished_run), "runs/debug") in readme.splitlines()  # the README shows it as it is


@pytest.mark.parametrize("override, key", [("train.task=snli_ve", "train.task 'vqa' -> 'snli_ve'"),
                                           ("data.num_answers=12", "data.num_answers 16 -> 12"),
                                           ("student.kind=fusion", "student.kind 'dual' -> 'fusion'")])
def test_a_changed_task_or_head_is_refused(finished_run, demo_shards, capsys, override, key):
    k, v = override.split("=")
    assert pretrain_main(["--config", "debug", *tiny_overrides(demo_shards, finished_run, **{k: v})]) == 2
    assert key in one_line(capsys.readouterr().err)


def test_the_training_entry_point_refuses_it_too(finished_run, demo_shards):
    """dide-demo and tools/bench_stages call train.run directly, past the CLI's preflight."""
    from dide_scale import distributed
    from dide_scale.engine import build_ds_config
    from dide_scale.rundir import RunDirMismatch
    from dide_scale.train import run
    before = tree(finished_run)
    cfg = load_config("debug", tiny_overrides(demo_shards, finished_run, **{"student.arch": WIDE_ARCH}))
    with pytest.raises(RunDirMismatch, match="student.arch.width 32 -> 64"):
        run(cfg, distributed.detect(), build_ds_config(cfg, 1))
    assert tree(finished_run) == before


def test_start_over_moves_the_old_run_aside_and_trains_the_new_model(finished_run, demo_shards, tmp_path):
    from dide_scale.models.saved import load_pretrained
    run_dir = copy_run(finished_run, tmp_path / "run")
    old_export = tree(run_dir / "export")
    argv = ["--config", "debug", "--start-over", *tiny_overrides(demo_shards, run_dir, **{"student.arch": WIDE_ARCH})]
    assert pretrain_main(argv) == 0
    (aside,) = (run_dir / "superseded").iterdir()
    assert (aside / "checkpoints" / "step_00000004" / "COMPLETE.json").exists()  # moved, not deleted
    assert tree(aside / "export") == old_export and (aside / "best" / "best.json").exists()
    assert yaml.safe_load((aside / "config.yaml").read_text())["student"]["arch"]["width"] == 32
    # the directory now agrees with itself: config, checkpoints, export all of the new model
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["student"]["arch"]["width"] == 64
    assert load_pretrained(run_dir / "export").shape.width == 64
    assert load_pretrained(run_dir / "best").shape.width == 64
    assert load_pretrained(aside / "export").shape.width == 32
    log = (run_dir / "logs" / "rank000.log").read_text()
    assert "resuming at step" not in log and f"moved aside into {aside}" in log
    assert not (run_dir / "lease.json").exists()


def start_over_on_ranks(args: dict) -> dict:
    from dide_scale.train import main
    return {"code": main(args["argv"])}


@pytest.mark.distributed
def test_start_over_on_two_ranks(finished_run, demo_shards, tmp_path):
    """Rank 0 moves the old run aside holding the lease; rank 1 waits for it before reading
    the directory (it must not find, and resume, the old checkpoints)."""
    from dist_utils import run_ranks

    from dide_scale.models.saved import load_pretrained
    run_dir = copy_run(finished_run, tmp_path / "run")
    argv = ["--config", "debug", "--start-over", *tiny_overrides(demo_shards, run_dir, **{
        "student.arch": WIDE_ARCH, "train.global_batch_size": 8, "train.micro_batch_size": 4})]
    assert [r["code"] for r in run_ranks("test_first_hour:start_over_on_ranks", 2, {"argv": argv}, tmp_path)] == [0, 0]
    (aside,) = (run_dir / "superseded").iterdir()
    assert (aside / "checkpoints" / "step_00000004").is_dir()
    assert load_pretrained(run_dir / "export").shape.width == 64
    for rank in (0, 1):
        assert "resuming at step" not in (run_dir / "logs" / f"rank{rank:03d}.log").read_text()


def test_other_changes_resume_and_say_so(finished_run, demo_shards, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    teacher = tmp_path / "no_teacher_needed"
    argv = ["--config", "debug", *tiny_overrides(demo_shards, run_dir, **{"train.max_steps": 6,
                                                                         "teacher.path": str(teacher)})]
    assert pretrain_main(argv) == 0
    log = (run_dir / "logs" / "rank000.log").read_text()
    assert "resuming at step 4" in log
    assert "resuming with the new ones:" in log and "train.max_steps 4 -> 6" in log
    # a teacher that no loss uses is said to be unused, not silently ignored
    assert f"teacher.path={teacher} is set but every distillation loss is 0" in log
    assert not (run_dir / "superseded").exists()


def test_the_end_of_a_run_says_where_the_models_went(finished_run):
    log = (finished_run / "logs" / "rank000.log").read_text()
    assert f"the final weights (step 4) are in {finished_run / 'export'}" in log
    assert "the best on the dev split (accuracy " in log and f"in {finished_run / 'best'}" in log


def test_which_keys_decide_the_model():
    from dide_scale.rundir import differences, flatten
    base = flatten(load_config("debug").to_dict())

    def diff(**changes):
        new = {**base, **{k.replace("__", "."): v for k, v in changes.items()}}
        return differences(base, new)
    assert diff(student__arch__depth=3)[0] == ["student.arch.depth 2 -> 3"]
    assert diff(optim__lr=1.0, train__max_steps=99) == ([], ["optim.lr 0.0005 -> 1.0", "train.max_steps 10 -> 99"])
    assert diff(student__arch__drop_path=0.1)[0] == []  # a rate, not a shape
    assert diff(train__output_dir="elsewhere") == ([], [])
    fusion = {**base, "student.kind": "fusion", "loss.token_nce": 0.0}
    assert differences(fusion, {**fusion, "loss.token_nce": 1.0})[0] == ["loss.token_nce 0.0 -> 1.0"]  # projections
    assert differences(fusion, {**fusion, "loss.attn_mse": 1.0})[0] == []
    itm = {**base, "train.task": "itm"}
    assert differences(itm, {**itm, "data.num_answers": 99})[0] == []  # no answer head under ITM
    old = {k: v for k, v in base.items() if k != "student.arch.depth"}  # a record from before a key existed
    assert differences(old, {**base, "student.arch.depth": 5}) == ([], [])


# -- shard paths -----------------------------------------------------------------------
def test_a_folder_or_a_glob_as_shards_is_refused_in_one_line(demo_shards, tmp_path, capsys):
    from dide_scale.data.shards import shard_pattern
    run_dir = tmp_path / "run"
    pattern = shard_pattern(demo_shards / "train")
    for shards, says in ((f"{demo_shards}/train", "is a folder, not a shard"),
                         (f"{demo_shards}/train/", "is a folder, not a shard"),
                         (str(demo_shards), "is a folder, not a shard"),
                         (f"{demo_shards}/train/*.tar", "shell globs are not expanded")):
        assert pretrain_main(["--config", "debug", *tiny_overrides(demo_shards, run_dir,
                                                                   **{"data.train_shards": shards})]) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("dide-pretrain: error: data.train_shards: ") and says in line, line
        assert line.endswith(f"e.g. {pattern}"), line  # the brace form of those very shards
    assert not run_dir.exists()


def test_missing_demo_shards_name_the_command_that_writes_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert pretrain_main([]) == 2  # the shipped default: --config debug, reading runs/demo_data
    assert one_line(capsys.readouterr().err).endswith("(write the demo shards first: "
                                                      "`dide-data demo --out runs/demo_data`)")
    assert not (tmp_path / "runs").exists()


def test_the_demo_command_writes_what_the_debug_config_reads():
    """The README's quick start: `dide-data demo --out runs/demo_data` with its defaults covers
    every shard data.train_shards / data.val_shards of the debug config name."""
    import braceexpand

    from dide_scale.data.cli import build_parser
    args = build_parser().parse_args(["demo", "--out", "runs/demo_data"])
    cfg = load_config("debug")
    for spec, n in ((cfg.data.train_shards, args.train), (cfg.data.val_shards, args.val)):
        written = {f"{Path(spec).parent}/{i:05d}.tar" for i in range(-(-n // args.per_shard))}
        assert set(braceexpand.braceexpand(spec)) <= written
        assert spec.startswith(f"runs/demo_data/{args.tasks}/")


# -- dide-data ---------------------------------------------------------------------------
def test_inspect_takes_brace_patterns_and_fails_on_errors(demo_shards, tmp_path, capsys):
    from dide_scale.data.cli import main as data_main
    assert data_main(["inspect", f"{demo_shards}/train/{{00000..00003}}.tar"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["samples"] for r in rows] == [64] * 4 and rows[0]["members"] == ["jpg", "json", "txt"]
    for arg, says in ((str(tmp_path / "nope.tar"), "no such shard file"),
                      (f"{demo_shards}/train", "is a folder"),
                      (f"{demo_shards}/train/*.tar", "shell globs are not expanded")):
        assert data_main(["inspect", arg]) == 1
        assert says in one_line(capsys.readouterr().err)
    # a shard cut short, and a count that differs from sizes.json
    bad = tmp_path / "bad"
    shutil.copytree(demo_shards / "train", bad)
    data = (bad / "00001.tar").read_bytes()
    (bad / "00001.tar").write_bytes(data[: len(data) // 2])
    sizes = json.loads((bad / "sizes.json").read_text())
    (bad / "sizes.json").write_text(json.dumps({**sizes, "00002.tar": 65}))
    assert data_main(["inspect", f"{bad}/{{00000..00003}}.tar"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "00001.tar" in err[0] and "00002.tar: 64 samples, but sizes.json says 65" in err[1]


def test_demo_shows_progress_and_draws_the_same_data(tmp_path, capsys):
    from dide_scale.data.cli import main as data_main
    from dide_scale.data.demo import generate_split
    assert data_main(["demo", "--out", str(tmp_path / "cli"), "--train", "40", "--val", "8", "--per-shard", "16"]) == 0
    err = capsys.readouterr().err
    assert "100%" in err and "40/40" in err  # tqdm's bar, one per split
    generate_split(tmp_path / "plain", 40, 0, "vqa", samples_per_shard=16)  # no bar
    assert samples(tmp_path / "cli" / "vqa" / "train") == samples(tmp_path / "plain")  # the draws did not move


def samples(d: Path) -> list[dict]:
    """Every sample's members (tar headers carry the write time, so not the tar bytes)."""
    from dide_scale.data.pipeline import iter_raw_samples
    return [{k: v for k, v in raw.items() if k != "__url__"} for p in sorted(d.glob("*.tar"))
            for raw in iter_raw_samples(str(p))]


COMMANDS = {"dide-pretrain": "dide_scale.train", "dide-finetune": "dide_scale.finetune",
            "dide-eval": "dide_scale.evaluate", "dide-data": "dide_scale.data.cli",
            "dide-submit": "dide_scale.launch.submit", "dide-demo": "dide_scale.demo",
            "dide-export": "dide_scale.export"}


def test_every_command_is_a_console_script():
    """setup.cfg installs each command above as the main (or cli) of its module."""
    import configparser
    import importlib
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert sorted(scripts) == sorted(COMMANDS)
    for prog, target in scripts.items():
        module, func = target.split(":")
        assert module == COMMANDS[prog] and func in ("main", "cli"), (prog, target)
        assert callable(getattr(importlib.import_module(module), func)), target


@pytest.mark.parametrize("prog", COMMANDS)
def test_every_option_of_every_command_has_help(prog, monkeypatch):
    """Each command's own parser (and each dide-data subcommand's), taken as its main() is
    about to parse: every option says what it is, and the help reads as prose (no
    "(default: None)", no reST quotes)."""
    import argparse
    import importlib

    class Parsed(Exception):
        pass
    seen = []

    def catch(self, *a, **k):
        seen.append(self)
        raise Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Parsed):
        importlib.import_module(COMMANDS[prog]).main([])
    (parser,) = seen
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [parser] + [sp for a in subs for sp in a.choices.values()]
    for ap in parsers:
        assert ap.prog.startswith(prog), ap.prog
        # a subcommand's help is its line in the list, not the list's own
        actions = [a for a in ap._actions if a not in subs] + [c for a in subs for c in a._choices_actions]
        for action in actions:
            if action.help != argparse.SUPPRESS:
                assert action.help, f"{ap.prog} {action.option_strings or action.dest} has no help"
        text = ap.format_help()
        for noise in ("(default: None)", "(default: False)", "``"):
            assert noise not in text, f"{ap.prog} --help says {noise}"


# -- help, version, --print-config ---------------------------------------------------------
def test_help_lists_the_shipped_configs_and_finetune_describes_itself(capsys):
    from dide_scale.finetune import main as finetune_main
    with pytest.raises(SystemExit) as e:
        pretrain_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in shipped_configs():
        assert f"\n  {name} " in out, name
    assert "--print-config" in out and "--start-over" in out and "--version" in out
    with pytest.raises(SystemExit):
        finetune_main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: dide-finetune") and "fine-tune an exported student" in out
    assert "dide-pretrain" not in out


@pytest.mark.parametrize("command", ["dide_scale.train", "dide_scale.evaluate", "dide_scale.data.cli",
                                     "dide_scale.launch.submit", "dide_scale.export", "dide_scale.demo"])
def test_every_command_has_version(command, capsys):
    import importlib
    from importlib.metadata import version
    with pytest.raises(SystemExit) as e:
        importlib.import_module(command).main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"dide_scale {version('dide_scale')} (python ")


def test_print_config_shows_every_key_value_and_docstring(tmp_path, capsys):
    from dide_scale.config import DataConfig
    from dide_scale.configdoc import field_docs
    assert pretrain_main(["--config", "debug", "train.max_steps=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    want = load_config("debug", ["train.max_steps=3"])
    assert yaml.safe_load(out) == want.to_dict()  # every key, with its resolved value
    f = tmp_path / "printed.yaml"
    f.write_text(out)
    assert load_config(str(f)) == want  # and it loads back as a config
    lines = out.splitlines()
    i = lines.index("  image_longer: 32")
    doc = " ".join(line.strip().lstrip("# ") for line in lines[i - 2:i])
    assert doc == " ".join(field_docs(DataConfig)["image_longer"].split())  # the docstring above its key


def test_dide_submit_prints_the_jobs_config(capsys):
    from dide_scale.launch import submit
    assert submit.main(["--cluster", "local", "--tasks-per-node", "2", "--config", "debug", "train.max_steps=3",
                        "--print-config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == load_config("debug", ["train.max_steps=3"], world_size=2).to_dict()
    assert out.startswith("# dide-submit --config debug train.max_steps=3\n")


def test_every_config_key_has_a_docstring():
    from dide_scale.configdoc import missing_docs
    assert missing_docs() == []


# -- one-line errors ---------------------------------------------------------------------
def test_export_help_and_errors(tmp_path, capsys):
    from dide_scale.export import main as export_main
    with pytest.raises(SystemExit) as e:
        export_main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: dide-export")
    assert export_main([str(tmp_path)]) == 2
    assert "not a run directory" in one_line(capsys.readouterr().err)


def test_dide_eval_errors_are_one_line(finished_run, demo_shards, tmp_path, capsys):
    from dide_scale.evaluate import main as eval_main
    model = str(finished_run / "export")
    for argv, says in (
            (["--model", model, "--shards", f"{demo_shards}/val/{{00000..00003}}.tar"], "--shards: 3 of 4 shards"),
            (["--model", model, "--shards", f"{demo_shards}/val"], "--shards: "),
            (["--model", str(tmp_path / "exprt"), "--shards", f"{demo_shards}/val/00000.tar"], "expected a model "
                                                                                               "directory")):
        assert eval_main(argv) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("dide-eval: error: ") and says in line, line


def test_predictor_on_a_bad_path_raises_one_line(finished_run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from dide_scale.inference import Predictor
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network in a test
    for path, says in ((str(finished_run / "exprt"), "expected a model directory"),
                       ("./exprt", "expected a model directory"),
                       (str(tmp_path), "expected a model directory"),
                       ("nobody-here/no-such-model", "the Hugging Face Hub cannot give a repository")):
        with pytest.raises(FileNotFoundError) as e:
            Predictor.from_pretrained(path)
        assert "\n" not in str(e.value) and says in str(e.value), str(e.value)
        assert e.value.__cause__ is None and (e.value.__suppress_context__ or e.value.__context__ is None), \
            "a chained hub traceback"
    assert Predictor.from_pretrained(str(finished_run / "export")).model.task == "vqa"


def test_dide_submit_runs_the_preflight_before_submitting(demo_shards, tmp_path, capsys):
    from dide_scale.launch import submit
    run_dir = tmp_path / "run"
    argv = ["--cluster", "local", "--config", "debug",
            *tiny_overrides(demo_shards, run_dir, **{"data.train_shards": f"{demo_shards}/train/{{00000..00009}}.tar"})]
    assert submit.main(argv) == 2
    assert "data.train_shards: 6 of 10 shards" in one_line(capsys.readouterr().err)
    assert not run_dir.exists()  # nothing submitted, no submitit folder


def test_dide_submit_refuses_a_changed_model_and_starts_over_before_submitting(finished_run, demo_shards, tmp_path):
    from dide_scale.launch import submit
    from dide_scale.rundir import RunDirMismatch
    run_dir = copy_run(finished_run, tmp_path / "run")
    argv = ["--cluster", "local", "--config", "debug", *tiny_overrides(demo_shards, run_dir,
                                                                       **{"student.arch": WIDE_ARCH})]
    with pytest.raises(RunDirMismatch, match="student.arch.width 32 -> 64"):
        submit.check_before_submitting(submit.build_parser().parse_args(argv), 1)
    cfg = submit.check_before_submitting(submit.build_parser().parse_args(["--start-over", *argv]), 1)
    assert cfg.student.arch.width == 64
    (aside,) = (run_dir / "superseded").iterdir()
    assert (aside / "checkpoints").is_dir() and not (run_dir / "checkpoints").exists()
    assert not (run_dir / "lease.json").exists()


# -- console noise ---------------------------------------------------------------------------
def test_library_warnings_are_silenced(finished_run, tmp_path, monkeypatch):
    """transformers' "model of type ``" on loading an exported folder's tokenizer, and torch's
    CUDA_HOME line without a CUDA runtime: said by the libraries alone, not once we load."""
    import logging

    import torch
    import torch.utils.cpp_extension as cpp_extension
    from transformers import AutoTokenizer

    from dide_scale import console
    from dide_scale.data.transforms import load_tokenizer
    said = []

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())
    loggers = [logging.getLogger(n) for n in ("transformers.configuration_utils", "torch.utils.cpp_extension")]
    for lg in loggers:
        monkeypatch.setattr(lg, "filters", [])  # as before any command ran in this process
        lg.addHandler(Keep())
    monkeypatch.setattr(console, "_QUIETED", False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    export = str(finished_run / "export")
    try:
        AutoTokenizer.from_pretrained(export)
        cpp_extension._find_cuda_home()
        noise = ["to instantiate a model of type ``"] + ([] if torch.cuda.is_available() else
                                                         ["No CUDA runtime is found"])
        assert all(any(n in m for m in said) for n in noise), said  # the libraries do say it
        said.clear()
        load_tokenizer.cache_clear()
        load_tokenizer(export)
        cpp_extension._find_cuda_home()
        assert not said, said
    finally:
        for lg in loggers:
            lg.handlers = [h for h in lg.handlers if not isinstance(h, Keep)]
        load_tokenizer.cache_clear()
