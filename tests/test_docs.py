"""Every command shown in README.md and docs/*.md runs, as onnx-graphsurgeon's tests run its examples.

Each fenced bash block is split into commands (new lines and `&&`; a trailing backslash continues a
line) and run in order, one scratch folder per document, laid out like the repository root: the
code folders are linked in, the documents copied, so a command that rewrites a document (`--readme`)
or a figure (`--grid docs/samples.png`) rewrites the copy. An HTML comment on the line before a block
says how the test runs it, and nothing else does:

    <!-- test: --samples 2 --steps 4 -->    append these arguments to every command of the block
                                            (argparse keeps an option's last value), so a long
                                            benchmark runs as written at a size the test can afford
    <!-- test: skip (needs a GPU) -->       not run; the reason is required and reported

`fcpass ...` runs in this process (`fcpass.cli.main`), `python FILE ...` in a subprocess of this
interpreter with this checkout first on its path, `mkdir -p` as itself; `pip install` is checked, not run: every extra it
names exists in pyproject.toml and every package it names is one pyproject.toml depends on. Anything
else is an error naming the block, so a new kind of command is a decision, not a silent skip.
The README's first block, the main job, runs exactly as written, with no overrides.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fcpass.cli import main
from models.digits import ONNX

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKED = ("fcpass", "runtimes", "models", "tools", "tests", "pyproject.toml")
DIRECTIVE = re.compile(r"<!--\s*test:\s*(.*?)\s*-->")
SKIP = re.compile(r"skip\s*\((.+)\)")
SUBPROCESS_TIMEOUT_S = 600

needs_bundled = pytest.mark.skipif(not ONNX.exists(), reason="bundled model missing (run tools/train_digits.py)")


@dataclass
class Block:
    """One fenced bash block: where it is, its commands, and what the comment before it says."""

    doc: Path
    line: int
    commands: list[list[str]]
    extra: list[str] = field(default_factory=list)
    skip: str | None = None

    def where(self) -> str:
        return f"{os.path.relpath(self.doc, ROOT)}:{self.line}"


def split_commands(body: str) -> list[list[str]]:
    """The commands of a block's text: lines joined at a trailing backslash, then split at `&&`."""
    text = re.sub(r"\\\n", " ", body)
    commands = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            commands += [shlex.split(part) for part in line.split("&&") if part.strip()]
    return commands


def parse_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{os.path.relpath(doc, ROOT)}:{i + 1}: a bash block is not closed"
        block = Block(doc, i + 1, split_commands("\n".join(lines[i + 1:end])))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        directive = DIRECTIVE.fullmatch(before.strip())
        if directive:
            skip = SKIP.fullmatch(directive.group(1))
            if skip:
                block.skip = skip.group(1)
            else:
                assert not directive.group(1).startswith("skip"), f"{block.where()}: write `skip (REASON)`"
                block.extra = shlex.split(directive.group(1))
        blocks.append(block)
        i = end + 1
    return blocks


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower()


def check_pip_install(argv: list[str], where: str) -> None:
    """A `pip install` line names only extras and packages pyproject.toml declares."""
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    declared = {_requirement_name(s) for s in project["dependencies"]}
    declared |= {_requirement_name(s) for specs in extras.values() for s in specs}
    for arg in argv[2:]:
        if arg.startswith("-"):
            continue
        local = re.fullmatch(r"\.(?:\[(.*)\])?", arg)
        if local:
            missing = [e for e in filter(None, (local.group(1) or "").split(",")) if e not in extras]
            assert not missing, f"{where}: `pip install {arg}` names extras {missing} that pyproject.toml lacks"
        else:
            assert _requirement_name(arg) in declared, f"{where}: `pip install {arg}`: not a dependency in pyproject.toml"


def sandbox(tmp: Path) -> Path:
    """A folder that looks like the repository root to a command: code linked, documents copied."""
    for name in LINKED:
        (tmp / name).symlink_to(ROOT / name)
    (tmp / "docs").mkdir()
    for doc in DOCS:
        (tmp / doc.relative_to(ROOT)).write_text(doc.read_text())
    return tmp


def run_command(argv: list[str], where: str, cwd: Path) -> None:
    shown = shlex.join(argv)
    if argv[:2] == ["pip", "install"]:
        check_pip_install(argv, where)
    elif argv[:2] == ["mkdir", "-p"]:
        for name in argv[2:]:
            (cwd / name).mkdir(parents=True, exist_ok=True)
    elif argv[0] == "fcpass":
        assert main(argv[1:]) == 0, f"{where}: `{shown}` failed"
    elif argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S, check=False)
        assert done.returncode == 0, f"{where}: `{shown}` exited {done.returncode}:\n{done.stderr[-3000:]}"
    else:
        pytest.fail(f"{where}: `{shown}`: the docs test runs fcpass, python FILE.py, mkdir -p and pip install; "
                    "mark anything else `<!-- test: skip (REASON) -->`")


def run_blocks(blocks: list[Block], cwd: Path) -> dict[str, int]:
    counts = {"run": 0, "overridden": 0, "skipped": 0}
    for block in blocks:
        if block.skip:
            counts["skipped"] += len(block.commands)
            print(f"skipped {block.where()} ({block.skip}): " + "; ".join(map(shlex.join, block.commands)))
            continue
        for argv in block.commands:
            plain = argv[:2] in (["pip", "install"], ["mkdir", "-p"])
            start = time.perf_counter()
            run_command(argv if plain else argv + block.extra, block.where(), cwd)
            print(f"{time.perf_counter() - start:6.1f} s  {block.where()}  {shlex.join(argv[:3])}")
            counts["overridden" if block.extra else "run"] += 1
    return counts


def test_every_block_parses_and_says_how_it_runs() -> None:
    """Every block has commands, and every command is one the runner knows or is marked skipped."""
    for doc in DOCS:
        for block in parse_blocks(doc):
            assert block.commands, f"{block.where()}: an empty bash block"
            if block.skip:
                continue
            for argv in block.commands:
                known = argv[:2] in (["pip", "install"], ["mkdir", "-p"]) or argv[0] == "fcpass" or (
                    argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"))
                assert known, f"{block.where()}: `{shlex.join(argv)}` needs `<!-- test: skip (REASON) -->`"


def test_the_parser_reads_directives(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("<!-- test: --steps 4 -->\n```bash\nfcpass a \\\n  b && fcpass c\n# note\n```\n\n"
                   "<!-- test: skip (needs a GPU) -->\n\n```bash\nfcpass build m -o e\n```\n")
    first, second = parse_blocks(doc)
    assert first.commands == [["fcpass", "a", "b"], ["fcpass", "c"]] and first.extra == ["--steps", "4"]
    assert second.skip == "needs a GPU" and second.extra == []


@needs_bundled
def test_the_main_job_runs_as_the_readme_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    main_job = parse_blocks(README)[0]
    assert main_job.commands[0][:2] == ["pip", "install"], "README.md opens with the install and the main job"
    assert not main_job.extra and not main_job.skip, "the main job runs exactly as written"
    monkeypatch.chdir(sandbox(tmp_path))
    run_blocks([main_job], tmp_path)
    out = capsys.readouterr().out
    assert "speedup" in out and Path("digits.png").stat().st_size > 0


@needs_bundled
@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_the_commands_of_a_document_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = parse_blocks(doc)
    if doc == README:
        blocks = blocks[1:]  # the main job: the test above
    monkeypatch.chdir(sandbox(tmp_path))
    counts = run_blocks(blocks, tmp_path)
    print(f"{doc.relative_to(ROOT)}: {counts}")
    assert sum(counts.values()) > 0
