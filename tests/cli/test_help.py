"""--help a newcomer can read: every command described, every option explained with its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from robustlab.cli import build_parser, main

COMPUTING = (
    "demo",
    "train",
    "eval",
    "attack",
    "transfer",
    "exits",
    "hpm",
    "sloth",
    "compress",
    "prune",
    "quantize",
    "uap",
    "monitor",
    "scan",
    "detect fit",
    "detect score",
    "detect eval",
)


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser, by name; a command with steps (detect) by each step's name."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out: dict[str, argparse.ArgumentParser] = {}
    for name, p in sub.choices.items():
        steps = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for step in steps:
            out.update({f"{name} {s}": q for s, q in step.choices.items()})
        if not steps:
            out[name] = p
    return out


def test_every_command_has_a_plain_one_line_description() -> None:
    commands = _commands()
    assert set(commands) == {*COMPUTING, "models", "report", "card", "runs", "compare", "poison"}
    for name, p in commands.items():
        text = p.description or ""
        assert text and "\n" not in text.strip() and "`" not in text, name


def test_every_option_has_help_and_says_its_default() -> None:
    for name, p in _commands().items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), (name, a.dest)
            flag = isinstance(a, argparse._StoreTrueAction)
            # a default that is not None is appended by the formatter; None must be said in words
            assert a.required or flag or a.default is not None or "default" in a.help, (
                name,
                a.dest,
            )


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("train", ["(default: resnet8)", "(default: standard)", "(default: the method's recipe)"]),
        ("eval", ["(default: all, at most 1000", "(default: mnist5k)", "(default: 0)"]),
        ("attack", ["(default: all)", "(default: pgd)"]),
        ("sloth", ["(default: 1)", "(default: 100)"]),
        ("report", ["(default: report.html)"]),
        ("models", ["(default: 28)", "(default: 10)", "(default: 1)"]),
    ],
)
def test_help_shows_the_defaults(
    command: str, shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    for text in shown:
        assert text in out, text


def test_attack_help_does_not_speak_of_eval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    assert "eval" not in capsys.readouterr().out


def test_the_common_options_of_the_readme() -> None:
    """--json on every command; --seed and --device on every command that computes."""
    for name, p in _commands().items():
        flags = {s for a in p._actions for s in a.option_strings}
        assert "--json" in flags, name
        if name in COMPUTING:
            assert {"--seed", "--device"} <= flags, name


def test_help_does_not_load_torch() -> None:
    code = (
        "import sys\n"
        "from robustlab.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
