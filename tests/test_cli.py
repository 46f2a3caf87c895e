"""One CLI convention for convnn-train, convnn-profile and convnn-tables: key=value arguments, a
--help with options, experiments and three examples, bad input in one line with exit status 2,
tab completion, and convnn-tables' defaults (source = the experiment's runs folder, table=all)."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from convnn.cli import experiments
from convnn.report import cli as tables_cli
from convnn.runs.records import write_record
from convnn.train import app, profile
from convnn.train.config import TrainConfig
from convnn.train.help import KEY_TEXT, PAGES
from tests.faults import read_only
from tests.test_docs_commands import check
from tests.test_tables import record

PROGRAMS = {"convnn-train": app.main, "convnn-profile": profile.main, "convnn-tables": tables_cli.main}


def run_main(program: str, *args: str, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run ``program``'s entry point in-process with ``args``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [program, *args])
    try:
        PROGRAMS[program]()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def help_sections(text: str) -> dict[str, list[str]]:
    """``{section title: its lines}`` of a help page (``== title ==`` headings)."""
    sections: dict[str, list[str]] = {}
    title = ""
    for line in text.splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            title = line[3:-3]
            sections[title] = []
        elif title:
            sections[title].append(line)
    return sections


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_lists_options_experiments_and_three_checked_examples(program, monkeypatch, capsys):
    code, out, _ = run_main(program, "--help", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out.startswith(f"{program}: ") and "Usage: " in out
    sections = help_sections(out)
    (examples_title,) = [t for t in sections if t.startswith("Examples")]
    commands = [line.strip() for line in sections[examples_title] if line.strip().startswith(program)]
    assert len(commands) == 3
    for command in commands:
        check(command)  # the same check as the documented commands
    assert "exit status 2" in out and f'eval "$({program} -sc install=bash)"' in out
    if program == "convnn-tables":
        options = "\n".join(sections["Options (key=value)"])
        assert all(f"  {key} " in options for key in tables_cli.OPTIONS)  # note= included
        assert "note" in tables_cli.OPTIONS
        return
    listed = "\n".join(sections["Experiments (experiment=<name>)"])
    for name, description in experiments():
        assert f"  {name} " in listed and description.split()[0] in listed
    assert "layer: attention, branching, conv2d" in "\n".join(sections["Config groups (group=option)"])
    keys = "\n".join(next(v for t, v in sections.items() if t.startswith("Keys")))
    for f in dataclasses.fields(TrainConfig):
        assert f"  {f.name}" in keys


def test_every_schema_key_is_described_and_every_description_is_a_key():
    assert list(KEY_TEXT) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(PAGES) == {"convnn-train", "convnn-profile"}


def test_every_experiment_has_a_one_sentence_description():
    found = dict(experiments())
    assert {"quickstart", "mini/table1", "paper/table1", "paper/fig10"} <= set(found)
    assert all(text.endswith(".") and len(text) > 20 for text in found.values()), found
    assert found["paper/fig4"].startswith("Figure 4: VGG-11, the number of neighbours k in 1..12")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=nonexistent"], "invalid config: model='nonexistent'; allowed: ['resnet18'"),
        (
            ["layer.k=0"],
            "unknown key 'layer.k' (=0); allowed keys at 'layer': ['name', 'kernel_size', 'bias']",
        ),
        (
            ["layer=convnn", "layer.k=0"],
            "invalid config: model=vgg11 layer=convnn: k must be a positive integer",
        ),
        (["model=vit_tiny", "layer=conv2d"], "model 'vit_tiny' takes 'tokens' layers, but layer 'conv2d'"),
        (["epochs=1.5"], "epochs='1.5'; Value '1.5' of type 'float' could not be converted to Integer"),
        (["-m", "layer.ratio=0.1,0.2"], "-m: convnn-profile profiles one configuration"),
    ],
)
def test_convnn_profile_bad_input_is_one_line_and_exit_2(args, message, monkeypatch, capsys):
    code, out, err = run_main("convnn-profile", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("convnn-profile: error: "), err
    assert message in err and not out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "experiment=paper/table9"], "experiment='paper/table9'; allowed: ['quickstart', 'mini/"),
        (["-m", "layer.kernal=1,2", "hydra.sweeper.dry_run=true"], "unknown key 'layer.kernal' (=1)"),
        (["--multirun", "layer=conv2d,convnn", "layer.k=9"], "unknown key 'layer.k' (=9)"),  # the first job
    ],
)
def test_a_sweep_with_bad_input_is_one_line_and_exit_2(args, message, monkeypatch, capsys):
    code, out, err = run_main("convnn-train", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("convnn-train: error: invalid config: ")
    assert message in err and not out


def test_convnn_profile_takes_the_training_keys_and_experiments():
    """The same arguments as convnn-train: experiment=mini/table1 is the mini VGG-11 (budget_model)."""
    cfg = profile.compose_config(["experiment=mini/table1", "seed=3"])
    assert (cfg.model.name, cfg.model.width_mult, cfg.layer.name, cfg.seed) == ("vgg11", 0.25, "branching", 3)
    assert cfg.hydra.run.dir == "." if "hydra" in cfg else True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["table=table9"], "table='table9'; allowed: table1, table2, table3, table4, table5, resnet50, all"),
        (["figure=fig9"], "figure='fig9'; allowed: fig3, fig4"),
        (["table=table1", "table=table2"], "table= given twice ('table1' and 'table2')"),
        (["table=table1", "dataset=mnist"], "dataset='mnist'; allowed: cifar10, cifar100, imagenet"),
        (["table=table1", "epoch=0"], "epoch='0'; allowed: an epoch number >= 1"),
        (["figure=fig3", "epoch=2"], "epoch= applies to tables only (table=<name>)"),
        (["table=table1", "--verbose"], "bad argument '--verbose'; expected key=value with key in ['table'"),
        (["-sc", "install=fish"], "-sc install=fish: allowed: -sc install=bash"),
    ],
)
def test_convnn_tables_bad_input_is_one_line_and_exit_2(args, message, monkeypatch, capsys):
    code, _, err = run_main("convnn-tables", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("convnn-tables: error: ")
    assert message in err


def _runs(root: Path, table: str = "table4") -> Path:
    """Hand-made finished records of two Table 4 rows under ``root/paper/<table>``."""
    for i, (row, acc) in enumerate((("t4.c10.branching.p1", 80.0), ("t4.c10.conv2d.p1", 79.5))):
        write_record(root / "paper" / table / f"run{i}" / "results.json", record(row, 0, acc, 1.0, acc))
    return root


def test_source_defaults_to_the_experiments_runs_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVNN_RUNS_DIR", raising=False)
    code, _, err = run_main("convnn-tables", "table=table4", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "no runs folder runs/paper/table4 (the runs of table=table4)" in err
    _runs(tmp_path / "runs")
    code, out, _ = run_main("convnn-tables", "table=table4", monkeypatch=monkeypatch, capsys=capsys)
    text = (tmp_path / "results" / "reproduced" / "table4.md").read_text()
    assert code == 0 and "source=runs/paper/table4` at " in text and "2 of 10 rows have finished runs" in text
    # CONVNN_RUNS_DIR as in convnn-train (an absolute folder is named relative to the working directory),
    # and out_dir= above it
    _runs(tmp_path / "elsewhere")
    monkeypatch.setenv("CONVNN_RUNS_DIR", str(tmp_path / "elsewhere"))
    run_main("convnn-tables", "table=table4", "out=t", monkeypatch=monkeypatch, capsys=capsys)
    assert "source=elsewhere/paper/table4` at " in (tmp_path / "t" / "table4.md").read_text()
    code, _, err = run_main(
        "convnn-tables", "table=table4", "out_dir=none", monkeypatch=monkeypatch, capsys=capsys
    )
    assert code == 2 and "no runs folder none/paper/table4" in err


def test_table_all_writes_the_tables_whose_runs_are_present(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = (f"out_dir={tmp_path / 'runs'}", f"out={tmp_path / 'out'}")
    code, _, err = run_main("convnn-tables", "table=all", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "table=all: no runs of any table" in err
    _runs(tmp_path / "runs")
    code, out, err = run_main("convnn-tables", "table=all", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "table4.csv",
        "table4.md",
        "table4.tex",
    ]
    assert "no runs of table1 in" in err and "skipped" in err and "table4" not in err


@pytest.mark.slow
def test_table_all_of_one_source_writes_the_tables_with_a_matched_row(tmp_path, monkeypatch, capsys):
    """A ``source=`` holding several tables' runs (every paper row composed to match them)."""
    _runs(tmp_path / "runs")
    code, out, err = run_main(
        "convnn-tables", "table=all", f"source={tmp_path / 'runs'}", f"out={tmp_path / 'mixed'}",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert code == 0 and sorted(p.stem for p in (tmp_path / "mixed").iterdir()) == ["table4"] * 3


def test_an_unwritable_out_is_one_line(tmp_path, monkeypatch, capsys):
    _runs(tmp_path / "runs")
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro") as ro:
        code, _, err = run_main(
            "convnn-tables", "table=table4", f"out_dir={tmp_path / 'runs'}", f"out={ro / 'x'}",
            monkeypatch=monkeypatch, capsys=capsys,
        )  # fmt: skip
    assert code == 2 and f"out='{ro / 'x'}' is not writable" in err


def test_tab_completion(tmp_path, monkeypatch, capsys):
    """convnn-tables' bash completion completes keys, names and folders, with and without '=' as a
    word break (Hydra's completion, installed for convnn-train, removes it)."""
    code, script, _ = run_main("convnn-tables", "-sc", "install=bash", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    (tmp_path / "runs" / "paper").mkdir(parents=True)

    def complete(line: str, breaks: str) -> list[str]:
        shell = f"{script}\nCOMP_WORDBREAKS={shlex.quote(breaks)}; COMP_LINE={shlex.quote(line)}\n"
        shell += "COMP_POINT=${#COMP_LINE}\n"
        shell += '_convnn_tables; printf "%s\\n" "${COMPREPLY[@]}"'
        done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=tmp_path, check=True)
        return done.stdout.split()

    hydra_breaks, bash_breaks = " \t\n\"'><;|&(:", " \t\n\"'><=;|&(:"
    assert complete("convnn-tables tab", hydra_breaks) == [f"table={t}" for t in (*tables_cli.TABLES, "all")]
    assert complete("convnn-tables table=table", bash_breaks)[:2] == ["table1", "table2"]  # the value only
    assert complete("convnn-tables table=table1 source=ru", hydra_breaks) == ["source=runs/"]
    assert complete("convnn-tables table=table1 source=ru", bash_breaks) == ["runs/"]
    assert complete("convnn-tables table=table1 no", hydra_breaks) == ["note="]
    for program in ("convnn-train", "convnn-profile"):  # Hydra's own completion script
        code, out, _ = run_main(program, "-sc", "install=bash", monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0 and f"-F hydra_bash_completion {program}" in out
