"""Every command example of README.md and of the console scripts' help runs as written.

The examples run in order, in one scratch folder that starts with the committed
``data_manifest.csv`` / ``.json`` only, so README's "Stages by hand on the demo data" builds
the demo's cohort, cache, embeddings and runs, and the examples after it run on those.

Conventions (stated in README.md, "Tests"):

* README.md: fenced blocks tagged ``bash`` hold commands, one per line (a trailing ``\\``
  continues it), run with bash; blocks tagged ``python`` run as scripts; other blocks
  (``text``, untagged) are diagrams and synopses, not commands.
* ``not run: REASON`` in a command's comment, or a comment that starts with ``needs``
  (``# needs the FM weights``), skips it; ``not run: REASON`` in a comment line opening a
  block skips the whole block. The test lists each skipped example with its reason.
* ``expect error: TEXT`` in a comment: the command must fail (non-zero exit) with an
  ``error:`` line and TEXT in its output, e.g. the option that fixes it.
* Help texts: a line of a console script's help or epilog that starts with a console
  script's name (after ``Example:`` / ``Examples:``) is an example, with the same markers;
  one holding ``...`` as a word is a template for the reader's own options, listed as skipped.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DIST = "hnfm-survival"
SCRIPTS = {ep.name: ep for ep in distribution(DIST).entry_points if ep.group == "console_scripts"}

pytestmark = pytest.mark.slow

_FENCE = re.compile(r"^```(\S*)")
_NOT_RUN = re.compile(r"not run:\s*([^)\n]+)")
_EXPECT_ERROR = re.compile(r"expect error:\s*([^()\n]*[^()\s])")
_PREFIX = re.compile(r"^(Examples?:)\s*")


@dataclass(frozen=True)
class Example:
    """One command example.

    Attributes:
        source: where it is written (``README.md:<line>`` or ``<script> --help``).
        kind: ``"bash"`` or ``"python"``.
        code: the command (continuations joined) or the Python script.
        skip: why it is not run, or None.
        expect_error: text the failing command must print, or None when it must succeed.
    """

    source: str
    kind: str
    code: str
    skip: str | None = None
    expect_error: str | None = None

    @property
    def id(self) -> str:
        first = self.code.strip().splitlines()[0] if self.code.strip() else ""
        return f"{self.source} {first[:60]}"


def _split_comment(line: str) -> tuple[str, str]:
    """``command  # comment`` -> (command, comment); a ``#`` inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote == ch else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _joined_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join ``\\``-continued lines; keeps the first line's number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for no, line in lines:
        text = line.rstrip()
        if pending is not None:
            no, text = pending[0], pending[1] + " " + text.strip()
        if text.endswith("\\"):
            pending = (no, text[:-1].rstrip())
            continue
        pending = None
        out.append((no, text))
    if pending is not None:
        out.append(pending)
    return out


def _command(source: str, text: str, block_skip: str | None) -> Example | None:
    command, comment = _split_comment(text)
    if not command.strip():
        return None
    skip = block_skip
    if skip is None and (m := _NOT_RUN.search(comment)):
        skip = m.group(1).strip()
    if skip is None and comment.startswith("needs "):
        skip = comment
    if skip is None and "..." in command.split():
        skip = "a template: `...` stands for the reader's own options"
    expect = _EXPECT_ERROR.search(comment)
    return Example(source, "bash", command.strip(), skip, expect.group(1) if expect else None)


def readme_examples(path: Path = README) -> list[Example]:
    """Every command of the ``bash`` and ``python`` blocks of README.md, in order."""
    lines = path.read_text().splitlines()
    examples: list[Example] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        tag, start = m.group(1), i + 1
        end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
        body = [(no + 1, lines[no]) for no in range(start, end)]
        i = end + 1
        first_comment = body[0][1].strip() if body else ""
        block_skip = None
        if first_comment.startswith("#") and (m2 := _NOT_RUN.search(first_comment)):
            block_skip = m2.group(1).strip()
        if tag == "python":
            code = "\n".join(text for _, text in body)
            examples.append(Example(f"README.md:{start + 1}", "python", code, block_skip))
        elif tag == "bash":
            for no, text in _joined_lines(body):
                ex = _command(f"README.md:{no}", text, block_skip)
                if ex is not None:
                    examples.append(ex)
    return examples


def help_examples() -> list[Example]:
    """Example lines of every console script's help text and epilog, in pyproject order."""
    examples: list[Example] = []
    for name, ep in SCRIPTS.items():
        cmd = ep.load()
        text = "\n".join(t for t in (cmd.help, cmd.epilog) if t)
        lines = [(no, _PREFIX.sub("", line.strip())) for no, line in enumerate(text.splitlines())]
        for _, line in _joined_lines(lines):
            if line.split(" ", 1)[0] in SCRIPTS:
                ex = _command(f"{name} --help", line, None)
                if ex is not None:
                    examples.append(ex)
    return examples


EXAMPLES = readme_examples() + help_examples()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pytestconfig):
    """A scratch folder holding the committed demo manifest, and the environment to run in.

    HOME points into it and the weights variables are unset, so no user weights are found.
    Prints the wall and CPU seconds of every example at the end (seen with ``pytest -s``).
    """
    _check_one_worker_runs_them_all(pytestconfig)
    root = tmp_path_factory.mktemp("docs")
    for name in ("data_manifest.csv", "data_manifest.json"):
        shutil.copy2(REPO / name, root / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HNFM_")}
    env.update(HOME=str(root / "home"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONUNBUFFERED="1")
    (root / "home").mkdir()
    ws = {"root": root, "env": env, "failed": [], "timings": []}
    yield ws
    rows = [f"{wall:7.1f} {cpu:7.1f}  {source}" for source, wall, cpu in ws["timings"]]
    total_wall, total_cpu = (sum(t[i] for t in ws["timings"]) for i in (1, 2))
    print("\n   wall s   CPU s  example\n" + "\n".join(rows) + f"\n{total_wall:7.1f} {total_cpu:7.1f}  total")


def _check_one_worker_runs_them_all(config) -> None:
    """The examples build on each other's files, so they run in order in one process: under
    pytest-xdist only a mode that keeps a file on one worker does (``make test``'s loadfile)."""
    worker = getattr(config, "workerinput", None)  # set on a pytest-xdist worker only
    dist = worker.get("dist") if worker is not None else None
    if worker is not None and dist not in ("loadfile", "loadscope"):
        pytest.fail(f"the documentation examples build on each other: with -n, pass --dist loadfile "
                    f"(not --dist {dist}), as `make test` does", pytrace=False)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(example: Example, ws) -> subprocess.CompletedProcess:
    """Run one example in the workspace; stdout and stderr interleaved as a reader sees them."""
    if example.kind == "python":
        script = ws["root"] / ".example.py"
        script.write_text(example.code)
        args = [sys.executable, str(script)]
    else:
        args = ["bash", "-o", "pipefail", "-c", example.code]
    wall, cpu = time.perf_counter(), _cpu_seconds()
    proc = subprocess.run(args, cwd=ws["root"], env=ws["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    ws["timings"].append((example.source, time.perf_counter() - wall, _cpu_seconds() - cpu))
    return proc


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_runs_as_written(example: Example, workspace):
    if example.skip:
        pytest.skip(f"{example.source}: {example.code.splitlines()[0][:60]} (not run: {example.skip})")
    proc = _run(example, workspace)
    output = proc.stdout
    earlier = f"\n(earlier failures: {', '.join(workspace['failed'])})" if workspace["failed"] else ""
    where = f"{example.source}: {example.code}\nexit {proc.returncode}; output tail:\n{_tail(output)}{earlier}"
    if example.expect_error is not None:
        ok = proc.returncode != 0 and "error:" in output and example.expect_error in output
        if not ok:
            workspace["failed"].append(example.source)
        assert ok, f"expected a failure naming {example.expect_error!r}\n{where}"
        return
    if proc.returncode != 0:
        workspace["failed"].append(example.source)
    assert proc.returncode == 0, where


def test_skipped_examples_are_listed_with_their_reason():
    skipped = [e for e in EXAMPLES if e.skip]
    print("\n".join(f"skipped {e.source}: {e.code[:70]}  ({e.skip})" for e in skipped))
    for e in skipped:  # the reason is the one written where the example is, not made up by the parser
        if e.skip.startswith("a template"):
            assert "..." in e.code.split(), e.source
        else:
            assert e.skip in _marking_text(e), (e.source, e.skip)
    ran = [e for e in EXAMPLES if not e.skip]
    for e in ran:  # and no example written with a marker runs
        if e.source.startswith("README.md:"):
            assert not _NOT_RUN.search(_marking_text(e)) and "# needs " not in _marking_text(e), e.source
    assert len(ran) > len(skipped), "most examples must run"


def _marking_text(example: Example) -> str:
    """Where a marker of ``example`` can be written: its README line and its block's opening line
    (a README example), or its console script's help and epilog."""
    if not example.source.startswith("README.md:"):
        cmd = SCRIPTS[example.source.split()[0]].load()
        return "\n".join(t for t in (cmd.help, cmd.epilog) if t)
    lines = README.read_text().splitlines()
    no = int(example.source.split(":")[1])
    fence = max(j for j in range(no) if lines[j].startswith("```"))
    end = no - 1
    while lines[end].rstrip().endswith("\\"):  # a command continued over several lines
        end += 1
    return "\n".join(lines[no - 1:end + 1]) + "\n" + lines[fence + 1]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_works_on_every_console_script(script):
    exe = Path(sys.executable).parent / script
    proc = subprocess.run([str(exe), "-h"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: "), proc.stdout + proc.stderr
    result = CliRunner().invoke(SCRIPTS[script].load(), ["--help"], prog_name=script)
    assert result.exit_code == 0 and result.output.startswith(f"Usage: {script} "), result.output


def test_ci_runs_the_test_command_the_readme_names():
    """README's `make test` line, the Makefile recipe and .ci/run name one command."""
    documented = re.search(r"^make test\s+# = (.+?)\s{2,}", README.read_text(), re.M).group(1)
    recipe = re.search(r"^test: install\n\t(.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert recipe.replace("$(BIN)", ".venv/bin") == documented
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.startswith("make install") for line in ci) and ci[-1] == "make test", ci


def test_the_conventions_are_read_as_documented(tmp_path):
    """Markers, continuation lines, quoted '#', templates and block tags on a small README."""
    text = "\n".join([
        "```bash", "# not run: needs the data", "tool-a --x 1", "```",
        "```text", "tool-b [--optional]", "```",
        "```bash",
        "tool-c --long \\", "       --option 2   # makes c (not run: too slow here)",
        "tool-d --json '{\"a\": \"#1\"}'   # expect error: --fix this",
        "tool-e ... --more", "tool-f   # needs the weights", "tool-g --ok", "```",
        "```python", "print('hi')", "```",
    ])
    (tmp_path / "README.md").write_text(text + "\n")
    got = {e.code.split()[0] if e.kind == "bash" else "python": e for e in readme_examples(tmp_path / "README.md")}
    assert set(got) == {"tool-a", "tool-c", "tool-d", "tool-e", "tool-f", "tool-g", "python"}
    assert got["tool-a"].skip == "needs the data"
    assert got["tool-c"].code == "tool-c --long --option 2" and got["tool-c"].skip == "too slow here"
    assert got["tool-d"].code == "tool-d --json '{\"a\": \"#1\"}'" and got["tool-d"].expect_error == "--fix this"
    assert got["tool-e"].skip.startswith("a template") and got["tool-f"].skip == "needs the weights"
    assert got["tool-g"].skip is None and got["python"].code == "print('hi')"
