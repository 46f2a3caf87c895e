"""Every ``convnn-train`` / ``convnn-profile`` / ``convnn-tables`` command written in README.md and
docs/*.md passes its argument check, so a renamed key, group option, experiment or table fails here.

Read at test time, whatever the pages hold now. The checks, one Hydra composition per command (two
for a sweep), nothing trained:

- ``convnn-train`` / ``convnn-profile``: Hydra's own argument parser (the flags), then the config
  composed in-process with the command's overrides (what ``--cfg job`` prints). With ``-m`` the jobs
  are expanded as the sweeper expands them (the experiment's rows x its params x the command's
  sweeps): the first job is composed and every job's group choices (``layer=``, ``data=``, ...) must
  exist. ``-m ... hydra.sweeper.dry_run=true`` itself runs in the slow test at the end.
- ``convnn-tables``: its argument parser (keys, table / figure / claims names, choices).

Conventions for writing commands in the docs (docs/cli.md says the same):

- Commands are read from indented code blocks, fenced blocks without a language or marked ``bash``,
  ``sh``, ``shell``, ``console`` or ``zsh`` (from the command name to the end of the line, joined
  over trailing backslashes; text after ``#``, ``&&``, ``;`` or ``|`` is not part of it), and inline
  code spans that hold a command with arguments (a bare ``convnn-train`` is a name). A ``text`` block
  (shown output, error examples) is not read.
- A value written ``<...>`` is a placeholder (``logger.entity=<entity>``,
  ``source=wandb:<entity>/<project>``): its key is checked, not its value. ``...`` stands for more
  arguments and is skipped. Paths need not exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import convnn.train.app  # noqa: F401 - registers the resolvers and the config schema
from convnn.paths import CONFIG_DIR
from convnn.report.cli import OPTIONS, parse_args
from convnn.runs.sweep import expand_jobs

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"convnn-train": "train", "convnn-profile": "profile", "convnn-tables": None}
PLACEHOLDER = "__placeholder__"
SHELLS = {"sh", "bash", "shell", "console", "zsh"}  # fenced blocks read as commands
OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "2>&1"}
TABLES_CHOICE = {
    "table": "table1",
    "figure": "fig3",
    "claims": "mini",
    "profile": "true",
    "dataset": "cifar10",
}
ABSENT = object()


class CommandError(Exception):
    """A documented command that does not pass its check (one line)."""


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def command_argv(text: str) -> list[str] | None:
    """``[program, *arguments]`` of the command in a line of code, placeholders replaced by
    :data:`PLACEHOLDER`; ``None`` when it holds no command with arguments."""
    if not re.search(rf"(^|\s)({'|'.join(PROGRAMS)})(\s|$)", text):
        return None
    text = re.sub(r"<[A-Za-z][^<>\n]*?>", PLACEHOLDER, text)
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as e:
        raise CommandError(f"cannot split {text.strip()!r}: {e}") from None
    start = next((i for i, t in enumerate(tokens) if t in PROGRAMS), None)
    if start is None:  # the program name only in a comment
        return None
    argv = []
    for token in tokens[start:]:
        if token in OPERATORS:
            break
        if token != "...":
            argv.append(token.rstrip(";"))
    return argv if len(argv) > 1 else None


def commands_in(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every code line or inline code span that holds a command."""
    found, fence, lines, i = [], None, text.splitlines(), 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.lstrip()[3:].strip() or "sh"
        elif fence is not None and fence not in SHELLS:
            pass  # output, YAML, Python...: not commands
        elif fence is not None or (line.startswith("    ") and "`" not in line):
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            found.append((number, line))
        else:
            found += [(number, span) for span in re.findall(r"`([^`\n]+)`", line)]
        i += 1
    return [(n, code) for n, code in found if re.search(rf"(^|\s)({'|'.join(PROGRAMS)})(\s|$)", code)]


def documented() -> list[pytest.param]:
    """One test case per distinct command of the docs, named by where it first appears."""
    params: dict[object, pytest.param] = {}
    for path in doc_files():
        if path.is_file():
            for number, code in commands_in(path.read_text()):
                try:
                    key: object = tuple(command_argv(code) or ())
                except CommandError:
                    key = code
                where = f"{path.relative_to(ROOT)}:{number}"
                params.setdefault(key, pytest.param(code, id=f"{where} {code.strip()[:60]}"))
    return list(params.values())


def _value_has_placeholder(override: str) -> bool:
    return PLACEHOLDER in override.partition("=")[2]


def _group_option_exists(options: dict[str, list[str]], key: str, value: str) -> bool:
    """``key=value`` names an existing option (``experiment=paper/table1``: ``table1`` of the group
    ``experiment/paper``); ``options`` caches the groups' options."""
    group, _, option = f"{key}/{value}".rpartition("/")
    if group not in options:
        options[group] = GlobalHydra.instance().config_loader().get_group_options(group)
    return option in options[group]


def check_hydra_command(config_name: str, args: list[str]) -> None:
    """Hydra's flags, the composed config (``--cfg job``) and, with ``-m``, the sweep's jobs."""
    try:
        flags = get_args_parser().parse_args(args)
    except SystemExit:
        raise CommandError(f"Hydra's argument parser refuses {shlex.join(args)}") from None
    if flags.shell_completion or flags.info or flags.hydra_help:
        return
    keys_only = [o for o in flags.overrides if _value_has_placeholder(o)]
    overrides = [o for o in flags.overrides if not _value_has_placeholder(o)]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        try:
            parsed = parser.parse_overrides(overrides)
            base = [o.input_line for o in parsed if not (flags.multirun and o.is_sweep_override())]
            cfg = compose(config_name, overrides=base, return_hydra_config=True)
            if flags.multirun:
                _check_jobs(config_name, cfg, parsed, parser)
        except (HydraException, OmegaConfBaseException) as e:
            raise CommandError(" ".join(str(e).split())[:400]) from None
        choices = cfg.hydra.runtime.choices
        for override in keys_only:
            key = override.partition("=")[0].lstrip("+~")
            if key not in choices and OmegaConf.select(cfg, key, default=ABSENT) is ABSENT:
                raise CommandError(f"{override.replace(PLACEHOLDER, '<...>')}: no key or group {key!r}")
    GlobalHydra.instance().clear()


def _check_jobs(config_name: str, cfg, parsed: list, parser: OverridesParser) -> None:
    """The sweep's jobs as the paper sweeper expands them: the first composes, every group choice exists."""
    sweeper = cfg.hydra.sweeper
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    rows = OmegaConf.to_container(sweeper.rows) if sweeper.get("rows") else None
    task = [o.input_line for o in parsed if not o.key_or_group.startswith("hydra")]
    jobs = expand_jobs(rows, [*params, *task], parser)
    hydra_overrides = [o.input_line for o in parsed if o.key_or_group.startswith("hydra")]
    compose(config_name, overrides=[*hydra_overrides, *jobs[0]])
    options: dict[str, list[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            if key in cfg.hydra.runtime.choices and not _group_option_exists(options, key, value):
                raise CommandError(f"job {' '.join(job)}: no option {value!r} in group {key!r}")


def check_tables_command(args: list[str]) -> None:
    """``convnn-tables``' own parsing; a placeholder name is replaced by an allowed one."""
    if args in (["--help"], ["-h"], ["-sc", "install=bash"]):
        return
    checked = []
    for arg in args:
        key, _, value = arg.partition("=")
        if PLACEHOLDER in value and key in OPTIONS:
            value = TABLES_CHOICE.get(key, value)
        checked.append(f"{key}={value}" if "=" in arg else arg)
    try:
        parse_args(checked)
    except ValueError as e:
        raise CommandError(str(e)) from None


def check(code: str) -> None:
    """Check the command in a line of code (:class:`CommandError` if it fails)."""
    argv = command_argv(code)
    if argv is None:
        return
    program, args = argv[0], argv[1:]
    if PROGRAMS[program] is None:
        check_tables_command(args)
    else:
        check_hydra_command(PROGRAMS[program], args)


DOCUMENTED = documented()


@pytest.mark.parametrize("code", DOCUMENTED)
def test_documented_command_passes_its_argument_check(code: str) -> None:
    try:
        check(code)
    except CommandError as e:
        pytest.fail(f"{code.strip()}\n{e}")


def test_the_docs_hold_commands_of_every_program() -> None:
    """The extraction finds the README's commands and each program somewhere (else this test is void)."""
    readme = [code for number, code in commands_in((ROOT / "README.md").read_text()) if command_argv(code)]
    assert readme, "no convnn-train / convnn-profile / convnn-tables command found in README.md"
    programs = {command_argv(p.values[0])[0] for p in DOCUMENTED if command_argv(p.values[0])}
    assert programs == set(PROGRAMS)


@pytest.mark.parametrize(
    "code",
    [
        "convnn-train model=vgg11 layer=branching layer.ratoi=0.5",  # a renamed key
        "convnn-train layer=branchy",  # a group option that does not exist
        "convnn-train -m experiment=paper/table9 hydra.sweeper.dry_run=true",
        "convnn-train -m layer=conv2d,convnnn seed=0,1",  # the second job's option
        "convnn-train --cfgg job",
        "convnn-train logger=wandb logger.entitty=<entity>",  # a placeholder's key is still checked
        "convnn-profile model=vit_tiny layer.kk=3",
        "convnn-tables table=table9 source=runs/paper/table9",
        "convnn-tables tabel=table1",
        "convnn-tables figure=fig3 sauce=<runs>",
    ],
)
def test_a_broken_command_fails_the_check(code: str) -> None:
    with pytest.raises(CommandError):
        check(code)


def test_the_extraction_follows_the_conventions() -> None:
    text = "\n".join(
        [
            "Run `convnn-train experiment=quickstart` first; `convnn-tables` is a name.",
            "```bash",
            "OMP_NUM_THREADS=1 convnn-train -m experiment=mini/table1 \\",
            "    seed=0   # a comment `convnn-train foo=1`",
            "convnn-tables table=table1 source=wandb:<entity>/<project> && ls results",
            "# convnn-train -m experiment=mini/table2  (a shell comment, not a command)",
            "```",
            "```text",
            "$ convnn-tables table=table9   (an error example)",
            "```",
            "    convnn-profile ... model=vgg11",
        ]
    )
    found = [(n, command_argv(code)) for n, code in commands_in(text)]
    assert [(n, argv) for n, argv in found if argv] == [
        (1, ["convnn-train", "experiment=quickstart"]),
        (3, ["convnn-train", "-m", "experiment=mini/table1", "seed=0"]),
        (5, ["convnn-tables", "table=table1", f"source=wandb:{PLACEHOLDER}/{PLACEHOLDER}"]),
        (11, ["convnn-profile", "model=vgg11"]),
    ]
    for _, argv in found:
        if argv:
            check(shlex.join(argv))


def _sweeps() -> list[pytest.param]:
    seen: dict[str, pytest.param] = {}
    for p in DOCUMENTED:
        argv = command_argv(p.values[0])
        if (
            argv
            and argv[0] == "convnn-train"
            and {"-m", "--multirun"} & set(argv)
            and PLACEHOLDER not in shlex.join(argv)  # a placeholder cannot run
        ):
            args = [a for a in argv[1:] if not a.startswith("hydra.sweeper.dry_run=")]
            seen.setdefault(shlex.join(args), pytest.param(args, id=p.id))
    return list(seen.values())


@pytest.mark.slow
@pytest.mark.parametrize("args", _sweeps())
def test_documented_sweeps_pass_the_sweepers_dry_run(args: list[str], tmp_path: Path) -> None:
    """The real dry run of every documented sweep: every job composed, its layer built (meta device)."""
    done = subprocess.run(
        ["convnn-train", *args, "hydra.sweeper.dry_run=true", f"out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert " jobs to launch" in done.stdout.splitlines()[0] and "failed" not in done.stdout
