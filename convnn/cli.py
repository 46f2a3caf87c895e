"""What ``convnn-train``, ``convnn-profile`` and ``convnn-tables`` share.

All three take ``key=value`` arguments (the first two as Hydra overrides, ``convnn-tables`` parses its
own). Bad input stops with one line on stderr, ``<prog>: error: <what and what is allowed>``, and exit
status 2 (:func:`fail`; :func:`compose_or_fail` for Hydra's composition errors). Every ``--help`` has
one layout (:func:`help_page`): what the command does, its options, the experiments
(:func:`experiments`, from the header comments of ``experiments/``) and three examples.
"""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from convnn.paths import CONFIG_DIR, EXPERIMENTS_DIR
from convnn.runs.errors import EXIT_BAD_INPUT

WIDTH = 100  # help text width
MULTIRUN = ("-m", "--multirun")
DOCS = "docs/cli.md"

Rows = Sequence[tuple[str, str]]


def fail(prog: str, message: str) -> SystemExit:
    """Print ``<prog>: error: <message>`` as one line to stderr; the ``SystemExit`` (status 2) to raise."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return SystemExit(EXIT_BAD_INPUT)


def compose_or_fail(
    prog: str, config_name: str, args: Sequence[str], hydra: bool = False
) -> DictConfig | None:
    """Compose ``config_name`` (in ``configs/``) with the overrides ``args`` once, before Hydra does, so a
    composition error (an unknown key, a missing group option, a value of the wrong type) stops with
    one line (:func:`fail`). With ``-m`` the sweep's first job is composed (each sweep's first value;
    ``hydra`` overrides are Hydra's). Returns the config (with the ``hydra`` node only when ``hydra``);
    ``None`` when ``args`` hold other flags, or sweeps or ``hydra`` overrides without ``-m``: left to
    Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    multirun = [a for a in args if a in MULTIRUN]
    args = [a for a in args if a not in MULTIRUN]
    if any(a.startswith("-") for a in args):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        if any(o.key_or_group.startswith("hydra.searchpath") for o in parsed):
            return None  # configs found through another search path: only Hydra composes those
        if multirun:  # the first job: each sweep's first value, Hydra's own overrides left to it
            args = [
                f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
                if o.is_sweep_override()
                else o.input_line
                for o in parsed
                if not o.key_or_group.startswith("hydra")
            ]
    except (HydraException, TypeError, ValueError):  # an interval sweep has no first value
        return None
    if not multirun and any(o.is_sweep_override() or o.key_or_group.startswith("hydra") for o in parsed):
        return None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            try:
                return compose(config_name, overrides=args, return_hydra_config=hydra)
            except (HydraException, OmegaConfBaseException) as e:
                message = _composition_message(e, args, lambda o: compose(config_name, overrides=o))
                raise fail(prog, message) from None
    finally:
        GlobalHydra.instance().clear()


def _composition_message(error: Exception, args: list[str], compose: Callable[[list[str]], Any]) -> str:
    """One line for a Hydra composition error: a value of the wrong type (the schema), the unknown
    key or group option and what is allowed."""
    text = " ".join(str(error).split())
    cause = error.__cause__
    if getattr(cause, "full_key", None) and "could not be converted" in str(cause):
        value = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == cause.full_key), None)
        return f"invalid config: {cause.full_key}={value!r}; {str(cause).splitlines()[0]}"
    missing = re.search(
        r"Could not find '([^']+)'.*?Available options in '[^']+':(.*?)(Config search|$)", text
    )
    if missing:
        path, options = missing.group(1), missing.group(2).split()
        group, _, option = path.rpartition("/")
        given = [(k, v) for k, _, v in (a.partition("=") for a in args) if f"{k.lstrip('+~')}/{v}" == path]
        key, value = given[0] if given else (group, option)
        if key.lstrip("+~") == "experiment":  # its options lie in subfolders too
            options = [name for name, _ in experiments()]
        return f"invalid config: {key}={value!r}; allowed: {options}"
    unknown = re.search(r"Could not override '([^']+)'", text)
    if not unknown:
        return f"invalid config: {text}"
    key = unknown.group(1)
    value = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == key), None)
    rest = [a for a in args if a.split("=", 1)[0] != key]
    parent = key.rpartition(".")[0]
    try:
        cfg = compose(rest)
    except Exception:  # noqa: BLE001 - another override is broken too; then list nothing
        cfg = None
    node = OmegaConf.select(cfg, parent) if cfg is not None and parent else cfg
    where = f"'{parent}'" if parent else "the top level"
    allowed = f"; allowed keys at {where}: {list(node.keys())}" if isinstance(node, DictConfig) else ""
    return f"invalid config: unknown key '{key}' (={value}){allowed}"


def _natural(text: str) -> list[Any]:
    """Sort key that puts ``fig4`` before ``fig10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def description(path: Path) -> str:
    """The first sentence of a config file's header comment (the comment lines after ``@package``,
    up to its first indented example or ``Launch:`` line)."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if text.strip().startswith("@package"):
            continue
        if text.startswith("   ") or text.strip().startswith("Launch:"):
            break
        words.append(text.strip())
    joined = " ".join(words)
    sentence = re.match(r"(.+?[.!?])(\s|$)", joined)
    return sentence.group(1) if sentence else joined


def experiments(root: Path = EXPERIMENTS_DIR) -> list[tuple[str, str]]:
    """``(name, description)`` of every experiment file (``experiment=<name>``), top level first."""
    paths = sorted(root.rglob("*.yaml"), key=lambda p: (len(p.relative_to(root).parts), _natural(str(p))))
    return [(p.relative_to(root).with_suffix("").as_posix(), description(p)) for p in paths]


def rows_text(rows: Rows, indent: int = 2) -> str:
    """Two aligned columns (name, text), the text wrapped to the help width under itself."""
    column = min(max((len(name) for name, _ in rows), default=0), 26) + indent + 2
    lines = []
    for name, text in rows:
        first = f"{' ' * indent}{name}".ljust(column - 1) + " "
        if len(first) > column:  # a long name: its text on the next line
            lines.append(first.rstrip())
            first = " " * column
        lines.append(
            textwrap.fill(
                text, WIDTH, initial_indent=first, subsequent_indent=" " * column, break_on_hyphens=False
            )
            or first.rstrip()
        )
    return "\n".join(lines)


def help_page(prog: str, summary: str, usage: str, sections: Sequence[tuple[str, Rows | str]]) -> str:
    """A ``--help`` page: ``<prog>: <summary>``, the usage, then ``== <title> ==`` sections (rows of
    ``(name, text)`` or ready text), then how errors and tab completion work."""
    head = textwrap.fill(f"{prog}: {summary}", WIDTH, subsequent_indent="  ", break_on_hyphens=False)
    parts = [head, "", f"Usage: {usage}"]
    for title, body in sections:
        parts += ["", f"== {title} ==", body if isinstance(body, str) else rows_text(body)]
    parts += ["", footer(prog)]
    return "\n".join(parts)


def footer(prog: str) -> str:
    """The help pages' last lines: the error convention, tab completion, the reference page."""
    return "\n".join(
        [
            "Bad input stops with one line on stderr and exit status 2.",
            f'Tab completion (bash): eval "$({prog} -sc install=bash)". Reference: {DOCS}.',
        ]
    )


def examples(commands: Sequence[str]) -> str:
    """An ``Examples`` section body: one command per line."""
    return "\n".join(f"  {c}" for c in commands)
