"""Every command example of the documentation and of the console scripts' help runs as written.

The documentation is README.md and the pages of docs/, read in the fixed order of
:data:`DOC_PAGES` (the reading order). Their examples run in that order, page after page, in
one scratch folder that starts with the committed ``data_manifest.csv`` / ``.json`` only, so
docs/pipeline.md's "Stages by hand on the demo data" builds the demo's cohort, cache,
embeddings and runs, and the pages after it run on those. Every relative link of those pages
resolves (:func:`test_every_relative_link_resolves`).

Conventions (stated in docs/tests.md, "Documentation examples"):

* The pages: fenced blocks tagged ``bash`` hold commands, one per line (a trailing ``\\``
  continues it), run with bash; blocks tagged ``python`` run as scripts; other blocks
  (``text``, untagged) are diagrams and synopses, not commands.
* Markers for this test are kept out of what readers see: an HTML comment on the line right
  before a block, ``<!-- doc-test ... -->``, holds them, one per line. A line ``MARKER``
  applies to the whole block; a line ``COMMAND => MARKER`` to the one command of the block
  written exactly so (each such line must name one command of its block). MARKER is
  ``not run: REASON`` (skips it; ``needs ...`` also does), ``expect error: TEXT`` (the command
  must fail, non-zero exit, with an ``error:`` line and TEXT in its output, e.g. the option
  that fixes it), or ``setup: COMMAND`` (block level: COMMAND runs before the block, to build
  in the scratch folder the state the block's prose assumes, e.g. what ``make demo`` leaves).
  The same markers written in a command's own ``#`` comment are read too (the convention
  before), but the pages and the help texts no longer use them (tested).
* Help texts: a line of a console script's help or epilog that starts with a console
  script's name (after ``Example:`` / ``Examples:``) is an example; its markers are in
  :data:`HELP_MARKERS` (command prefix -> marker); one holding ``...`` as a word is a template
  for the reader's own options, listed as skipped.
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
#: The documentation pages in reading order, which is the order their examples run in: a page
#: whose examples use what an earlier page's made comes after it (docs/pipeline.md's "Stages by
#: hand" build the cohort, cache, embeddings and runs the later pages use). Every docs/*.md page
#: is listed (tested); stated in docs/tests.md.
DOC_PAGES: tuple[str, ...] = (
    "README.md",
    "docs/pipeline.md",
    "docs/dicom-and-prediction.md",
    "docs/data.md",
    "docs/embeddings.md",
    "docs/training.md",
    "docs/study.md",
    "docs/clusters.md",
    "docs/benchmarks.md",
    "docs/dependencies.md",
    "docs/tests.md",
    "docs/decisions.md",
    "docs/glossary.md",
)
DIST = "hnfm-survival"
SCRIPTS = {ep.name: ep for ep in distribution(DIST).entry_points if ep.group == "console_scripts"}

pytestmark = pytest.mark.slow

_FENCE = re.compile(r"^```(\S*)")
_NOT_RUN = re.compile(r"not run:\s*([^)\n]+)")
_EXPECT_ERROR = re.compile(r"expect error:\s*([^()\n]*[^()\s])")
_PREFIX = re.compile(r"^(Examples?:)\s*")
_DOC_TEST = re.compile(r"^<!--\s*doc-test\b(.*?)-->", re.S)
_MARKER_TEXT = re.compile(r"not run:|expect error:|^\s*#\s*needs\b|\(\s*needs\b", re.M)

#: Markers of help-text examples, out of the text users read: script -> command prefix -> marker.
HELP_MARKERS: dict[str, dict[str, str]] = {
    "import-dicom": {
        "import-dicom /archive/export": "not run: needs a clinic's DICOM export",
        "import-dicom /archive/batch2": "not run: needs a clinic's DICOM export",
    },
}


@dataclass(frozen=True)
class Example:
    """One command example.

    Attributes:
        source: where it is written (``<page>:<line>``, e.g. ``docs/pipeline.md:12``, or
            ``<script> --help``).
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
    marked: str = ""
    setup: tuple[str, ...] = ()

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
            return line[:i].rstrip(), line[i + 1 :].strip()
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


def _command(source: str, text: str, block_skip: str | None, marker: str = "") -> Example | None:
    command, comment = _split_comment(text)
    if not command.strip():
        return None
    comment = (comment + "  " + marker).strip()
    skip = block_skip
    if skip is None and (m := _NOT_RUN.search(comment)):
        skip = m.group(1).strip()
    if skip is None and comment.startswith("needs "):
        skip = comment
    if skip is None and "..." in command.split():
        skip = "a template: `...` stands for the reader's own options"
    expect = _EXPECT_ERROR.search(comment)
    return Example(source, "bash", command.strip(), skip, expect.group(1) if expect else None, comment)


def _doc_test_comment(lines: list[str], fence: int) -> tuple[list[str], dict[str, str]]:
    """The ``<!-- doc-test ... -->`` comment ending on the line before ``fence``: its block-level
    markers and its ``COMMAND => MARKER`` lines."""
    end = fence - 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return [], {}
    start = end
    while start > 0 and not lines[start].lstrip().startswith("<!--"):
        start -= 1
    m = _DOC_TEST.match("\n".join(lines[start : end + 1]).strip())
    if not m:
        return [], {}
    block, per_command = [], {}
    for line in m.group(1).splitlines():
        line = line.strip().lstrip(":").strip()
        if not line:
            continue
        if "=>" in line:
            command, marker = line.split("=>", 1)
            per_command[" ".join(command.split())] = marker.strip()
        else:
            block.append(line)
    return block, per_command


def _page_name(path: Path) -> str:
    """``path`` relative to the repository (``docs/pipeline.md``), else its file name."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.name


def page_examples(path: Path = README) -> list[Example]:
    """Every command of the ``bash`` and ``python`` blocks of one page (README.md by default),
    in order; each example's source is ``<page>:<line>``.

    Raises:
        ValueError: a ``COMMAND => MARKER`` line of a doc-test comment that names no command
            of its block (a stale marker).
    """
    lines = path.read_text().splitlines()
    page = _page_name(path)
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
        block_markers, per_command = _doc_test_comment(lines, i)
        i = end + 1
        first_comment = body[0][1].strip() if body else ""
        block_skip = None
        for text in block_markers + ([first_comment] if first_comment.startswith("#") else []):
            if block_skip is None and (m2 := _NOT_RUN.search(text)):
                block_skip = m2.group(1).strip()
        setup = tuple(t.split(":", 1)[1].strip() for t in block_markers if t.startswith("setup:"))
        block_text = "\n".join(t for t in block_markers if not t.startswith("setup:"))
        if tag == "python":
            code = "\n".join(text for _, text in body)
            examples.append(Example(f"{page}:{start + 1}", "python", code, block_skip, None, block_text, setup))
        elif tag == "bash":
            used = set()
            for no, text in _joined_lines(body):
                key = " ".join(_split_comment(text)[0].split())
                marker = per_command.get(key, "")
                used.add(key)
                ex = _command(f"{page}:{no}", text, block_skip, marker)
                if ex is not None:
                    ex = Example(
                        ex.source,
                        ex.kind,
                        ex.code,
                        ex.skip,
                        ex.expect_error,
                        "\n".join(t for t in (ex.marked, block_text) if t),
                        setup,
                    )
                    examples.append(ex)
                    setup = ()  # runs once, before the block's first command
            stale = sorted(set(per_command) - used)
            if stale:
                raise ValueError(f"{path}:{start}: doc-test markers name no command of the block: {stale}")
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
                marker = next((m for prefix, m in HELP_MARKERS.get(name, {}).items() if line.startswith(prefix)), "")
                ex = _command(f"{name} --help", line, None, marker)
                if ex is not None:
                    examples.append(ex)
    return examples


def doc_examples() -> list[Example]:
    """Every example of every page of :data:`DOC_PAGES`, page after page."""
    return [e for page in DOC_PAGES for e in page_examples(REPO / page)]


EXAMPLES = doc_examples() + help_examples()


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
    env.update(
        HOME=str(root / "home"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
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
        pytest.fail(
            f"the documentation examples build on each other: with -n, pass --dist loadfile "
            f"(not --dist {dist}), as `make test` does",
            pytrace=False,
        )


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
    proc = subprocess.run(
        args, cwd=ws["root"], env=ws["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )
    ws["timings"].append((example.source, time.perf_counter() - wall, _cpu_seconds() - cpu))
    return proc


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_runs_as_written(example: Example, workspace):
    if example.skip:
        pytest.skip(f"{example.source}: {example.code.splitlines()[0][:60]} (not run: {example.skip})")
    for command in example.setup:  # the state the prose assumes (e.g. what `make demo` leaves), built smaller
        ready = _run(Example(f"{example.source} (setup)", "bash", command), workspace)
        assert ready.returncode == 0, f"setup of {example.source}: {command}\n{_tail(ready.stdout)}"
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
        if not e.source.endswith(" --help"):
            assert not _NOT_RUN.search(_marking_text(e)) and "# needs " not in _marking_text(e), e.source
    assert len(ran) > len(skipped), "most examples must run"


def _marking_text(example: Example) -> str:
    """Where a marker of ``example`` can be written: its page's line, its block's opening line
    and the doc-test comment lines that apply to it (a page's example), or its console
    script's help, epilog and :data:`HELP_MARKERS` entry."""
    if example.source.endswith(" --help"):
        name = example.source.split()[0]
        cmd = SCRIPTS[name].load()
        return "\n".join([t for t in (cmd.help, cmd.epilog) if t] + [example.marked])
    page, no = example.source.rsplit(":", 1)
    lines = (REPO / page).read_text().splitlines()
    no = int(no)
    fence = max(j for j in range(no) if lines[j].startswith("```"))
    end = no - 1
    while lines[end].rstrip().endswith("\\"):  # a command continued over several lines
        end += 1
    return "\n".join(lines[no - 1 : end + 1]) + "\n" + lines[fence + 1] + "\n" + example.marked


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_works_on_every_console_script(script):
    exe = Path(sys.executable).parent / script
    proc = subprocess.run([str(exe), "-h"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: "), proc.stdout + proc.stderr
    result = CliRunner().invoke(SCRIPTS[script].load(), ["--help"], prog_name=script)
    assert result.exit_code == 0 and result.output.startswith(f"Usage: {script} "), result.output


def test_ci_runs_the_test_command_the_readme_names():
    """README's `make test` line, docs/tests.md's, the Makefile recipe and .ci/run name one command."""
    documented = re.search(r"^make test\s+# = (.+?)\s{2,}", (REPO / "docs" / "tests.md").read_text(), re.M).group(1)
    readme = re.search(r"^make test\s+#.*\(the exact command CI runs: (.+)\)$", README.read_text(), re.M).group(1)
    recipe = re.search(r"^test: install lint\n\t(.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    lint = re.search(r"^lint: install\n((?:\t.+\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert "ruff check ." in lint and "ruff format --check ." in lint  # make test (and so CI) lints first
    assert recipe.replace("$(BIN)", ".venv/bin") == documented == readme
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert any(line.startswith("make install") for line in ci) and ci[-1] == "make test", ci


def test_the_conventions_are_read_as_documented(tmp_path):
    """Markers, continuation lines, quoted '#', templates and block tags on a small README."""
    text = "\n".join(
        [
            "```bash",
            "# not run: needs the data",
            "tool-a --x 1",
            "```",
            "```text",
            "tool-b [--optional]",
            "```",
            "```bash",
            "tool-c --long \\",
            "       --option 2   # makes c (not run: too slow here)",
            'tool-d --json \'{"a": "#1"}\'   # expect error: --fix this',
            "tool-e ... --more",
            "tool-f   # needs the weights",
            "tool-g --ok",
            "```",
            "```python",
            "print('hi')",
            "```",
        ]
    )
    (tmp_path / "README.md").write_text(text + "\n")
    got = {e.code.split()[0] if e.kind == "bash" else "python": e for e in page_examples(tmp_path / "README.md")}
    assert set(got) == {"tool-a", "tool-c", "tool-d", "tool-e", "tool-f", "tool-g", "python"}
    assert got["tool-a"].skip == "needs the data"
    assert got["tool-c"].code == "tool-c --long --option 2" and got["tool-c"].skip == "too slow here"
    assert got["tool-d"].code == 'tool-d --json \'{"a": "#1"}\'' and got["tool-d"].expect_error == "--fix this"
    assert got["tool-e"].skip.startswith("a template") and got["tool-f"].skip == "needs the weights"
    assert got["tool-g"].skip is None and got["python"].code == "print('hi')"


def _visible(text: str) -> str:
    """Markdown as a reader sees it: HTML comments removed."""
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def test_no_test_harness_marker_is_in_what_users_read():
    """The pages' visible text and every console script's help carry no marker of this test:
    they live in HTML comments (the pages) and HELP_MARKERS (help texts)."""
    for page in DOC_PAGES:
        visible = _visible((REPO / page).read_text())
        # inline code is exempt: docs/tests.md names the markers as `not run: REASON`
        shown = [line for line in visible.splitlines() if _MARKER_TEXT.search(re.sub(r"`[^`]*`", "", line))]
        assert not shown, (page, shown)
    for name, ep in SCRIPTS.items():
        cmd = ep.load()
        text = "\n".join(t for t in (cmd.help, cmd.epilog) if t)
        assert not _MARKER_TEXT.search(text), (name, text)


def test_markers_in_doc_test_comments_are_read(tmp_path):
    text = "\n".join(
        [
            "<!-- doc-test",
            "setup: touch ready",
            "tool-b --x => expect error: --fix",
            "tool-c => not run: too slow",
            "-->",
            "```bash",
            "tool-a --ok",
            "tool-b --x",
            "tool-c",
            "```",
            "<!-- doc-test: not run: needs the data -->",
            "```bash",
            "tool-d",
            "```",
        ]
    )
    (tmp_path / "README.md").write_text(text + "\n")
    got = {e.code.split()[0]: e for e in page_examples(tmp_path / "README.md")}
    assert got["tool-a"].skip is None and got["tool-a"].setup == ("touch ready",)
    assert got["tool-b"].expect_error == "--fix" and not got["tool-b"].setup
    assert got["tool-c"].skip == "too slow" and got["tool-d"].skip == "needs the data"
    (tmp_path / "README.md").write_text(text.replace("tool-c =>", "tool-z =>") + "\n")
    with pytest.raises(ValueError, match="name no command of the block: \\['tool-z'\\]"):
        page_examples(tmp_path / "README.md")


# -- the pages' links ------------------------------------------------------------------------

_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _without_code(text: str) -> str:
    """Markdown without its HTML comments, fenced blocks and inline code (lines kept)."""
    text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (inline code, links and emphasis marks
    dropped), lower case, every character but letters, digits, ``_``, ``-`` and spaces
    removed, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def heading_anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (headings in code blocks are not headings; a
    repeated slug gets ``-1``, ``-2``, ... as on GitHub)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.S)
    fence = None
    for line in text.splitlines():
        m = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if m and fence is None:
            fence = m.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            continue
        h = _HEADING.match(line)
        if h:
            slug = github_slug(h.group(2))
            n = seen.get(slug, 0)
            anchors.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return anchors


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown page that do not resolve: a missing file or folder, or
    an ``#anchor`` that is no heading of its target."""
    broken = []
    for target in _LINK.findall(_without_code(path.read_text())):
        if _SCHEME.match(target):  # https:, mailto: ...: not this repository's
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.is_dir() or anchor not in heading_anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {_page_name(dest)}")
    return broken


def test_every_docs_page_is_in_the_reading_order():
    pages = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")}
    listed = set(DOC_PAGES) - {"README.md"}
    assert pages == listed, f"add to / remove from DOC_PAGES: {sorted(pages ^ listed)}"
    assert DOC_PAGES[0] == "README.md" and len(set(DOC_PAGES)) == len(DOC_PAGES)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_every_relative_link_resolves(page):
    """Every relative link of README.md and docs/*.md names a file that exists, and its
    ``#anchor``, if any, a heading of that file (GitHub's slugs)."""
    assert not broken_links(REPO / page), broken_links(REPO / page)


def test_link_check_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "\n".join(
            [
                "# Stage two: DeepMTS+DAFT training",
                "## Schema (`schema_version` 1)",
                "## Notes",
                "## Notes",
                "```bash",
                "# not a heading",
                "```",
            ]
        )
        + "\n"
    )
    assert heading_anchors(tmp_path / "docs" / "a.md") == {
        "stage-two-deepmtsdaft-training",
        "schema-schema_version-1",
        "notes",
        "notes-1",
    }
    page = tmp_path / "README.md"
    page.write_text(
        "\n".join(
            [
                "[ok](docs/a.md#schema-schema_version-1) [two\nlines](docs/a.md#notes-1) [web](https://x.org/#y)",
                "[gone](docs/b.md) [bad anchor](docs/a.md#not-a-heading) [self](#nothing)",
                "`[in code](docs/c.md)`",
                "```text",
                "[in a block](docs/d.md)",
                "```",
                "<!-- [in a comment](docs/e.md) -->",
            ]
        )
        + "\n"
    )
    assert broken_links(page) == [
        "docs/b.md: no such file",
        "docs/a.md#not-a-heading: no heading #not-a-heading in a.md",
        "#nothing: no heading #nothing in README.md",
    ]
