"""The README and docs/*.md say true things a newcomer will try first.

- Every `python -m experiments.X` / `benchmarks.X` command they show exists,
  answers `--help` with exit 0, and has every `--flag` it is shown with.
- Every relative link points to a file that exists (and, with `#anchor`, to a
  heading of that file).
- Every ```python block marked `<!-- tested -->` runs, in a fresh interpreter
  from the repository root: a fresh one, because in this process other tests
  have already imported ffnjax's submodules, which would hide an
  `AttributeError` a user gets after a plain `import ffnjax`.

Mark a snippet as tested by putting `<!-- tested -->` on the line before its
```python fence; mark only snippets that are self-contained, cheap (seconds)
and write nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")
COMMAND = re.compile(r"python\s+-m\s+((?:experiments|benchmarks)\.[A-Za-z_]\w*)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TESTED = re.compile(r"<!--\s*tested\s*-->[ \t]*\n```python[ \t]*\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# -- commands ---------------------------------------------------------------


def code_spans(text: str) -> list[str]:
    """The code in a Markdown text: each line of every fenced block (shell line
    continuations joined) and every inline code span (line breaks as spaces)."""
    spans = []
    for block in FENCE.finditer(text):
        spans += re.sub(r"\\\n\s*", " ", block.group(1)).splitlines()
    prose = FENCE.sub("", text)
    spans += [m.group(1).replace("\n", " ") for m in INLINE_CODE.finditer(prose)]
    return spans


def documented_commands(text: str) -> dict[str, set[str]]:
    """{module: flags it is shown with} for every `python -m experiments.X` or
    `benchmarks.X` in the code of a Markdown text (shell comments ignored)."""
    commands: dict[str, set[str]] = {}
    for span in code_spans(text):
        matches = list(COMMAND.finditer(span))
        for i, m in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(span)
            args = re.split(r"\s#", span[m.end():end], maxsplit=1)[0]
            commands.setdefault(m.group(1), set()).update(FLAG.findall(args))
    return commands


def all_documented_commands() -> dict[str, dict[str, set[str]]]:
    """{module: {flag: files showing it}} over README.md and docs/*.md."""
    found: dict[str, dict[str, set[str]]] = {}
    for path in DOCS:
        for module, flags in documented_commands(path.read_text(encoding="utf-8")).items():
            entry = found.setdefault(module, {})
            entry.setdefault("", set()).add(_rel(path))
            for flag in flags:
                entry.setdefault(flag, set()).add(_rel(path))
    return found


COMMANDS = all_documented_commands()


def test_command_collection_reads_fences_continuations_and_inline_code():
    text = ("Run `python -m experiments.segment\n--checkpoint W` or:\n\n"
            "```bash\npython -m experiments.train --workdir runs/x \\\n"
            "    --steps 10  # --not-a-flag\npython -m benchmarks.memory_bench\n```\n")
    assert documented_commands(text) == {
        "experiments.segment": {"--checkpoint"},
        "experiments.train": {"--workdir", "--steps"},
        "benchmarks.memory_bench": set(),
    }


def test_readme_introduces_every_command():
    """Each command in experiments/ is named in the README, so a newcomer can find it."""
    readme = documented_commands((REPO / "README.md").read_text(encoding="utf-8"))
    commands = {f"experiments.{p.stem}" for p in (REPO / "experiments").glob("*.py")
                if not p.stem.startswith("_")}
    assert commands - set(readme) == set()


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_documented_command_answers_help_with_its_flags(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{module} --help exited {run.returncode}:\n{run.stderr[-2000:]}"
    assert "usage:" in run.stdout, f"{module} --help printed no usage:\n{run.stdout[:500]}"
    known = set(FLAG.findall(run.stdout))
    missing = {flag: sorted(files) for flag, files in COMMANDS[module].items()
               if flag and flag not in known}
    assert not missing, f"{module} is shown with flags its --help does not list: {missing}"


# -- links ------------------------------------------------------------------


def github_anchors(markdown: str) -> set[str]:
    """The `#anchor` of every heading, as GitHub makes them (lower case,
    punctuation dropped, spaces to hyphens, -1, -2 ... for repeats)."""
    seen: dict[str, int] = {}
    anchors = set()
    for m in HEADING.finditer(FENCE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ...


def test_anchors_follow_github():
    assert github_anchors("# Top\n## The demo's full recipe\n## How it trains: per FOV\n"
                          "## Top\n```\n# not a heading\n```\n") == {
        "top", "the-demos-full-recipe", "how-it-trains-per-fov", "top-1"}


def test_docs_link_to_each_other():
    """The link check below has something to check: the README links every docs page."""
    readme_links = set(relative_links(REPO / "README.md"))
    for page in DOCS[1:]:
        assert f"docs/{page.name}" in readme_links, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in github_anchors(
                dest.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(path)} has broken links:\n" + "\n".join(broken)


# -- tested snippets --------------------------------------------------------


def marked_snippets() -> list[tuple[str, str]]:
    """(id, code) of every ```python block marked <!-- tested -->."""
    snippets = []
    for path in DOCS:
        blocks = TESTED.findall(path.read_text(encoding="utf-8"))
        snippets += [(f"{_rel(path)}#{i + 1}", code) for i, code in enumerate(blocks)]
    return snippets


SNIPPETS = marked_snippets()


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_every_marker_marks_a_python_block(path):
    text = path.read_text(encoding="utf-8")
    assert len(TESTED.findall(text)) == len(re.findall(r"<!--\s*tested\s*-->", text)), (
        f"{_rel(path)}: a <!-- tested --> marker is not directly followed by a ```python block")


def test_readme_has_tested_snippets():
    assert sum(name.startswith("README.md#") for name, _ in SNIPPETS) >= 2


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def _traceback(stderr: str) -> str:
    """The traceback at the end of stderr, without the progress bars before it."""
    start = stderr.rfind("Traceback (most recent call last)")
    return stderr[start:] if start >= 0 else stderr[-3000:]


@pytest.mark.parametrize("code", [c for _, c in SNIPPETS], ids=[n for n, _ in SNIPPETS])
def test_tested_snippet_runs(code):
    run = _run_fresh(code)
    assert run.returncode == 0, f"snippet failed (exit {run.returncode}):\n{_traceback(run.stderr)}"


QUALIFIED = re.compile(r"(?<![\w.])ffnjax(?:\.[A-Za-z_]\w*)+")


def documented_names() -> set[str]:
    """Every dotted `ffnjax.x.y` the README and docs show in code."""
    return {name for path in DOCS for span in code_spans(path.read_text(encoding="utf-8"))
            for name in QUALIFIED.findall(span)}


def test_documented_names_resolve_after_a_plain_import():
    """`ffnjax.view.save_slices_png` in the docs works as written after `import ffnjax`.

    The first part of each name is looked up in `dir(ffnjax)` before any
    submodule is imported: importing one binds the submodules it imports as
    attributes too, which would hide a name only reachable by that accident."""
    names = sorted(documented_names())
    assert "ffnjax.erl.evaluate" in names  # the collection found the docs' names
    run = _run_fresh(
        "import ffnjax\n"
        f"names = {names!r}\n"
        "listed = set(dir(ffnjax))\n"
        "missing = [f'{n}: not in dir(ffnjax)' for n in names if n.split('.')[1] not in listed]\n"
        "for name in names:\n"
        "    obj = ffnjax\n"
        "    try:\n"
        "        for part in name.split('.')[1:]:\n"
        "            obj = getattr(obj, part)\n"
        "    except AttributeError as e:\n"
        "        missing.append(f'{name}: {e}')\n"
        "assert not missing, missing\n")
    assert run.returncode == 0, _traceback(run.stderr)


def test_plain_import_reaches_the_submodules_the_docs_use():
    """A user reported AttributeError for these after a plain `import ffnjax`
    (fixed by ffnjax/__init__.py's module __getattr__, commit 28905ac)."""
    run = _run_fresh(
        "import ffnjax\n"
        "for name in ('synthetic.make_volume', 'erl.evaluate', 'train_loop.train',\n"
        "             'load_checkpoint', 'segment', 'fill', 'view.save_slices_png'):\n"
        "    obj = ffnjax\n"
        "    for part in name.split('.'):\n"
        "        obj = getattr(obj, part)\n"
        "    assert callable(obj), name\n")
    assert run.returncode == 0, _traceback(run.stderr)
