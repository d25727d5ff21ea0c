"""Docs that test themselves (after sqlite-utils' test_docs.py).

The reference documents are written by hand, but what they must cover is read from the
code: every `gpud` subcommand and option, every HTTP route, every exit code and every
setting. Adding one without documenting it fails here, naming what is missing.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import pytest

from gpud.api import ROUTES
from gpud.cli import EXIT, cli
from gpud.config import Config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI_MD = ROOT / "docs" / "cli.md"
API_MD = ROOT / "docs" / "api.md"

COMMANDS = sorted(cli.all_commands().items())  # the lazy ones too (#12)


def _read(path: Path) -> str:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return path.read_text(encoding="utf-8")


def _headings(text: str, level: int) -> list[str]:
    prefix = "#" * level + " "
    return [line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)]


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section, up to the next heading of level 1 or 2."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert match is not None, f"no '## {heading}' section"
    return match.group(1)


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_command_has_help(name: str, command: click.Command) -> None:
    assert (command.help or "").strip(), f"`gpud {name}` has no help text"


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_command_has_heading_in_cli_md(name: str, command: click.Command) -> None:
    assert f"gpud {name}" in _headings(_read(CLI_MD), 2), (
        f"docs/cli.md has no '## gpud {name}' heading"
    )


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_is_documented(name: str, command: click.Command) -> None:
    text = _read(CLI_MD)
    section = _section(text, f"gpud {name}")
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        for opt in (*param.opts, *param.secondary_opts):
            # In the command's own section, as a whole option (not "--json" inside "--jsonl").
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", section), (
                f"option {opt} of `gpud {name}` is not in its section of docs/cli.md"
            )


def _subcommands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name, sub in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        if isinstance(sub, click.Group):
            out.extend(_subcommands(sub, path))
        else:
            out.append((path, sub))
    return out


NESTED = [
    x for name, c in COMMANDS if isinstance(c, click.Group) for x in _subcommands(c, f"gpud {name}")
]


def _subsection(text: str, heading: str) -> str:
    """The body of the `### heading` section, up to the next heading of level 1 to 3."""
    match = re.search(rf"^### {re.escape(heading)}\s*$(.*?)(?=^#{{1,3}} |\Z)", text, re.M | re.S)
    assert match is not None, f"docs/cli.md has no '### {heading}' heading"
    return match.group(1)


@pytest.mark.parametrize(("path", "command"), NESTED, ids=[p for p, _ in NESTED])
def test_every_subcommand_and_its_options_are_documented(path: str, command: click.Command) -> None:
    """`gpud admin user add` and friends: help text, a ### heading, every option."""
    assert (command.help or "").strip(), f"`{path}` has no help text"
    section = _subsection(_read(CLI_MD), path)
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", section), (
                    f"option {opt} of `{path}` is not in its section of docs/cli.md"
                )


def test_every_route_is_documented() -> None:
    text = _read(API_MD)
    headings = _headings(text, 3)
    for method, path in ROUTES:
        assert f"{method} {path}" in headings, f"docs/api.md has no '### {method} {path}' heading"
    assert "/openapi.json" in text


def test_every_exit_code_is_in_the_table() -> None:
    section = _section(_read(CLI_MD), "Exit codes")
    documented = set()
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells and cells[0].isdigit():
            documented.add(int(cells[0]))
    missing = sorted(set(EXIT.values()) - documented)
    assert not missing, f"exit codes missing from the table in docs/cli.md: {missing}"
    unknown = sorted(documented - set(EXIT.values()))
    assert not unknown, f"docs/cli.md documents exit codes gpud.cli.EXIT lacks: {unknown}"


def test_readme_names_the_setup_commands() -> None:
    text = _read(README)
    for command in ("./scripts/serve", "./scripts/test"):
        assert command in text, f"README.md does not mention {command}"


def test_readme_lists_every_setting() -> None:
    text = _read(README)
    for f in dataclasses.fields(Config):
        assert re.search(rf"`{re.escape(f.name)}`", text), (
            f"setting {f.name} (gpud.config.Config) is not in README.md"
        )
        env = "GPUD_" + f.name.upper()
        assert env in text, f"README.md does not name the environment variable {env}"


def test_docs_link_targets_exist() -> None:
    """Relative links in the docs point at files that exist."""
    for doc in (
        README,
        CLI_MD,
        API_MD,
        ROOT / "docs" / "architecture.md",
        ROOT / "CHANGELOG.md",
        ROOT / "docs" / "operations.md",
    ):
        text = _read(doc)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
