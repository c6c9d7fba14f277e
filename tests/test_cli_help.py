"""Every argument of every subcommand says what it is in ``--help``; ``help(evomerge)`` names
the Python entry points with an example that runs."""

from __future__ import annotations

import argparse
import doctest

import evomerge
from evomerge.cli import _parser


def parsers(p: argparse.ArgumentParser, name: str = "evomerge"):
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


def test_every_argument_of_every_subcommand_has_help_text():
    missing = [
        f"{name}: {'/'.join(a.option_strings) or a.dest}"
        for name, p in parsers(_parser())
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert not missing, missing
    names = [name for name, _ in parsers(_parser())]
    assert {"evomerge search", "evomerge results", "evomerge toy build"} <= set(names)


def test_the_package_docstring_names_the_entry_points_and_its_example_runs():
    doc = evomerge.__doc__ or ""
    for name in ("run_search", "export_run", "open_run", "Recipe", "run_summary"):
        assert name in doc, name
    tests = doctest.DocTestFinder().find(evomerge, "evomerge")
    examples = [e for t in tests for e in t.examples]
    assert examples, "no runnable example in the package docstring"
    result = doctest.DocTestRunner().run(tests[0])
    assert result.failed == 0
