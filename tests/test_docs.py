"""The docs cannot rot: every command in README.md and docs/ names a script or module that exists and only flags
its parser accepts; every relative link (and its #anchor) points at something in the repository; every test a
page cites exists; and the README stays a guide (its length, the install command on its first screen)."""

from __future__ import annotations

import argparse
import contextlib
import re
import runpy
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXTERNAL = {"pytest", "pip", "venv"}  # modules of other projects the docs run (python -m pytest, ...)


def code_blocks(text: str) -> list[str]:
    """The shell lines of a page: its bash blocks, `\\`-continued lines joined, and inline `python ...` spans."""
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang in ("bash", "sh", ""):
            lines += body.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`((?:python|torchrun|bash) [^`]+)`", prose)
    return lines


def commands(text: str) -> list[list[str]]:
    """Each command of the page as its words: `python X.py ...`, `python -m MOD ...`, `torchrun ... X.py ...`."""
    out = []
    for line in code_blocks(text):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a line of prose in a code block
            continue
        for i, w in enumerate(words):
            if w in ("python", "python3", "torchrun", "bash"):
                out.append(words[i:])
                break
    return out


def target(words: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, script or module, its arguments) of a command; None for another project's tool."""
    rest = words[1:]
    if words[0] == "bash":
        return ("file", rest[0], rest[1:]) if rest and rest[0].endswith(".sh") else None
    if words[0] == "torchrun":  # torchrun's own options come before the script
        i = next(i for i, w in enumerate(rest) if w.endswith(".py"))
        return "script", rest[i], rest[i + 1:]
    if rest[:1] == ["-m"]:
        return None if rest[1] in EXTERNAL else ("module", rest[1], rest[2:])
    if rest and rest[0].endswith(".py"):
        return "script", rest[0], rest[1:]
    return None


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


@lru_cache(maxsize=None)
def parser_of(kind: str, name: str, leading: tuple[str, ...]) -> argparse.ArgumentParser:
    """The parser a command builds, caught at its first parse_args call (nothing after it runs)."""

    def catch(self, *args, **kwargs):
        raise _Captured(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = catch
    sys.argv = [name, *leading]
    try:
        with contextlib.redirect_stdout(None):
            if kind == "script":
                runpy.run_path(str(ROOT / name), run_name="__main__")
            else:
                runpy.run_module(name, run_name="__main__", alter_sys=True)
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv = saved
    raise AssertionError(f"{name} {' '.join(leading)} parsed no arguments")


def accepted_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= accepted_flags(sub)
    return flags


def all_commands():
    for page in PAGES:
        for words in commands(page.read_text()):
            found = target(words)
            if found is not None:
                yield pytest.param(page, found, id=f"{page.relative_to(ROOT)}: {' '.join(words)[:80]}")


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("page,found", list(all_commands()))
def test_every_command_in_the_docs_names_flags_its_parser_accepts(page, found, monkeypatch):
    monkeypatch.chdir(ROOT)
    kind, name, args = found
    if kind == "file":
        assert (ROOT / name).is_file(), f"{page.name}: {name} does not exist"
        return
    if kind == "script":
        assert (ROOT / name).is_file(), f"{page.name}: {name} does not exist"
    leading = ()
    if name == "train.py":  # its quickstart has a parser of its own; the rest asks for a --stage before parsing
        leading = ("quickstart",) if args[:1] == ["quickstart"] else ("--stage", "dit")
    parser = parser_of(kind, name, leading)
    flags = accepted_flags(parser)
    named = [a.strip("[]|").split("=")[0] for a in args if a.strip("[]|").startswith("--")]
    unknown = [f for f in named if f not in flags]
    assert not unknown, f"{page.relative_to(ROOT)}: {name} accepts no {unknown}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_into_the_repository_at_something_that_exists(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for link in LINK.findall(text):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto
        path, _, anchor = link.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_relative_to(ROOT), f"{page.name}: {link} leaves the repository"
        assert dest.exists(), f"{page.name}: {link} points at nothing"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: {link}: no heading #{anchor} in {dest.name}"


def test_every_test_the_docs_cite_exists():
    defined = {p.name: set(re.findall(r"^def (test_\w+)", p.read_text(), flags=re.M)) for p in (ROOT / "tests").glob("test_*.py")}
    everywhere = set().union(*defined.values())
    for page in PAGES:
        text = page.read_text()
        for file, name in re.findall(r"`tests/(test_\w+\.py)(?:::(test_\w+))?", text):
            assert file in defined, f"{page.name}: tests/{file} does not exist"
            assert not name or name in defined[file], f"{page.name}: tests/{file} has no {name}"
        for name in re.findall(r"`(test_\w+)`", text):
            assert name in everywhere, f"{page.name}: no test is named {name}"


def test_the_readme_is_a_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move the detail to docs/"
    assert any('pip install -e ".[dev]"' in line for line in lines[:40]), "the install command is not on the first screen"
    assert any(line.strip() == "python -m pytest" for line in lines[:60]), "the test command is not near the top"


def test_the_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1].strip() == "python -m pytest"


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_every_option_of_every_documented_command_has_help(monkeypatch):
    monkeypatch.chdir(ROOT)
    parsers = {}
    for page in PAGES:
        for words in commands(page.read_text()):
            found = target(words)
            if found is None or found[0] == "file" or found[1].startswith("bench/"):
                continue  # the benches' options are their docstrings' business
            kind, name, args = found
            leading = (("quickstart",) if args[:1] == ["quickstart"] else ("--stage", "dit")) if name == "train.py" else ()
            parsers[(name, leading[:1])] = parser_of(kind, name, leading)
    bare = {f"{name} {' '.join(lead)}".strip(): [a.option_strings[0] for a in p._actions
                                                 if a.option_strings and not a.help and not isinstance(a, argparse._HelpAction)]
            for (name, lead), p in parsers.items()}
    assert len(parsers) >= 10 and not {k: v for k, v in bare.items() if v}, bare


# One name for each idea across the commands; the old names stay as aliases for a while, never alone.
VOCABULARY = {"--guidance": {"--cfg"}, "--ckpt": {"--run", "--runs"}, "--videos-per-prompt": {"--num", "--k", "--seeds"}}


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
def test_one_name_per_option_across_the_commands(monkeypatch):
    monkeypatch.chdir(ROOT)
    scripts = [("script", "train.py", ("--stage", "dit")), ("script", "sample.py", ())]
    scripts += [("script", str(p.relative_to(ROOT)), ()) for p in sorted((ROOT / "bench").glob("*.py"))
                if p.name not in ("__init__.py", "common.py")]
    scripts += [("module", m, ()) for m in ("evaluation.generator", "evaluation.motion_score", "tokenizer.evaluate",
                                            "tokenizer.encode", "data.make_shards", "data.check_shards", "dit3d.to_diffusers")]
    wrong = []
    for kind, name, leading in scripts:
        for action in parser_of(kind, name, leading)._actions:
            for canonical, aliases in VOCABULARY.items():
                if aliases & set(action.option_strings) and action.option_strings[0] != canonical:
                    wrong.append(f"{name}: {action.option_strings} (say {canonical} first)")
    assert not wrong, wrong
