"""The README's commands: every `nanoseek ...` line of its bash blocks parses with today's CLI, every command named in
it exists and has a --help with an example. (The quick start's speedrun itself runs in test_speedrun.py, with the
smoke recipe; the full one takes ~12 minutes.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nanoseek.cli.main import COMMANDS, build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_commands(text: str) -> list[str]:
    """`nanoseek ...` commands of the ```bash blocks: continuation lines joined, comments dropped, `a && b` split."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("nanoseek "):
                    out.append(part)
    return out


def test_readme_quick_start_is_two_commands_set_up_then_run():
    text = README.read_text()
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2
    assert commands[0].startswith("pip install torch==2.13.0 && pip install -e . && nanoseek speedrun")
    assert commands[1].startswith("pip install torch==2.13.0") and commands[1].endswith("python -m pytest -q")


def test_readme_test_command_builds_llama_cpp_like_ci():
    """Command 2 compiles llama-cpp-python with the flags CI sets (without them the build takes far longer), and the
    README says how long the first install takes."""
    text = README.read_text()
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    command2 = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")][1]
    ci = (README.parent / ".ci" / "run").read_text()
    for flag in re.findall(r'export (CMAKE_\w+)="\$\{\w+:-([^}]+)\}"', ci):
        name, value = flag
        assert f"{name}={value}" in command2.replace('"', ""), (
            f"README command 2 lacks {name}={value} (.ci/run sets it)"
        )
    assert re.search(r"[Tt]he first time, command 2 takes about \d+-\d+ minutes to install", text), (
        "README must say how long the install takes"
    )


def test_every_readme_command_parses():
    parser = build_parser()
    commands = bash_commands(README.read_text())
    assert len(commands) >= 10
    checked = 0
    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        if argv[0] not in COMMANDS:  # a command another section documents before this CLI has it
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {cmd}")
        assert callable(args.func), cmd
        checked += 1
    assert checked >= 10


def test_every_command_in_the_readme_exists_and_its_help_has_an_example(capsys):
    text = README.read_text()
    named = set(re.findall(r"`nanoseek ([a-z]+)", text))
    assert named <= set(COMMANDS), f"README names commands the CLI lacks: {named - set(COMMANDS)}"
    assert set(COMMANDS) <= named, f"commands missing from the README: {set(COMMANDS) - named}"
    parser = build_parser()
    for cmd in [*COMMANDS, "tokenizer train", "tokenizer info"]:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*cmd.split(), "--help"])
        assert e.value.code == 0
        assert "example: nanoseek " in capsys.readouterr().out, f"`nanoseek {cmd} --help` has no example"
