"""The documentation cannot drift from the code: ``docs/reference.md`` equals what ``docs/gen_reference.py``
generates now; every relative link and anchor in ``docs/`` resolves; every page parses as clean markdown
(one title, no skipped heading level, closed and labelled code fences, well-formed tables, no stray HTML);
recipes named in commands exist; and the tutorial's line counts are those of the example it walks through.

Markdown is parsed with markdown-it-py (CommonMark + tables; installed with ``rich``, a dependency).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO
from markdown_it import MarkdownIt

DOCS = REPO / "docs"
PAGES = sorted([*DOCS.glob("*.md"), *DOCS.glob("examples/*/README.md")])
EXPECTED_PAGES = {"index.md", "concepts.md", "tutorial-first-plugin.md", "gpu-and-multinode.md",
                  "comparing-methods.md", "reference.md"}
MD = MarkdownIt("commonmark").enable("table")


@functools.cache
def load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(tokens) -> list[tuple[int, str, int]]:
    """``(level, text, line)`` of every heading."""
    out = []
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            children = tokens[i + 1].children or []
            text = "".join(child.content for child in children if child.type in ("text", "code_inline"))
            out.append((int(token.tag[1]), text, token.map[0] + 1))
    return out


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, text, _ in headings(MD.parse(path.read_text())):
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def links(tokens) -> list[tuple[str, int]]:
    out = []
    for token in tokens:
        for child in token.children or []:
            if child.type == "link_open":
                out.append((child.attrs["href"], token.map[0] + 1 if token.map else 0))
            elif child.type == "image":
                out.append((child.attrs["src"], token.map[0] + 1 if token.map else 0))
    return out


def problems(path: Path, root: Path = REPO) -> list[str]:
    """Everything that would render wrongly or warn, as ``file:line: what`` strings (``file`` relative to ``root``)."""
    text = path.read_text()
    name = path.relative_to(root)
    found = []
    tokens = MD.parse(text)
    # headings: one title first, no skipped level
    levels = headings(tokens)
    if not levels or levels[0][0] != 1:
        found.append(f"{name}: the first heading must be a level-1 title")
    if sum(1 for level, *_ in levels if level == 1) > 1:
        found.append(f"{name}: more than one level-1 heading")
    for (before, *_), (level, heading, line) in zip(levels, levels[1:]):
        if level > before + 1:
            found.append(f"{name}:{line}: heading {heading!r} skips from level {before} to {level}")
    # code fences: closed, with a language
    fence, opened_at = None, 0
    for number, line in enumerate(text.splitlines(), 1):
        match = re.match(r"^\s*(```+|~~~+)(.*)$", line)
        if not match:
            continue
        if fence is None:
            fence, opened_at = match.group(1), number
            if not match.group(2).strip():
                found.append(f"{name}:{number}: code fence without a language")
        elif match.group(1).startswith(fence) and not match.group(2).strip():
            fence = None
    if fence is not None:
        found.append(f"{name}:{opened_at}: code fence never closed")
    # tables: every line that looks like a table row belongs to a parsed table
    table_lines = {n for t in tokens if t.type == "table_open" for n in range(t.map[0], t.map[1])}
    fenced = {n for t in tokens if t.type in ("fence", "code_block") for n in range(t.map[0], t.map[1])}
    for number, line in enumerate(text.splitlines()):
        if line.startswith("|") and number not in table_lines and number not in fenced:
            found.append(f"{name}:{number + 1}: table row outside a table (header or separator line malformed?)")
    for t in tokens:
        if t.type == "table_open":  # a row with more cells than the header loses them silently
            header = text.splitlines()[t.map[0]]
            width = len(re.findall(r"(?<!\\)\|", header))
            for number in range(t.map[0], t.map[1]):
                row = text.splitlines()[number]
                if len(re.findall(r"(?<!\\)\|", row)) != width:
                    found.append(f"{name}:{number + 1}: table row has a different number of cells than the header")
    # stray inline HTML (an unescaped <placeholder> disappears when rendered)
    for t in tokens:
        for child in t.children or []:
            if child.type == "html_inline":
                found.append(f"{name}:{t.map[0] + 1}: inline HTML {child.content!r} (escape it or put it in `code`)")
    # relative links and anchors
    for href, line in links(tokens):
        if re.match(r"^[a-z]+:", href):
            continue  # http(s), mailto: not checked (no network)
        target, _, anchor = href.partition("#")
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            found.append(f"{name}:{line}: link {href!r} points to a missing file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            found.append(f"{name}:{line}: link {href!r}: no heading with anchor #{anchor} in {dest.name}")
    return found


# ------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def generated_reference(tmp_path_factory) -> str:
    """docs/reference.md as the generator writes it now."""
    fresh = tmp_path_factory.mktemp("reference") / "reference.md"
    assert load_generator().main([str(fresh)]) == 0
    return fresh.read_text()


def test_reference_is_up_to_date(generated_reference):
    committed = (DOCS / "reference.md").read_text()
    if generated_reference != committed:
        import difflib

        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), generated_reference.splitlines(True),
                                                 "docs/reference.md (committed)", "generated now"))[:60])
        pytest.fail(f"docs/reference.md is stale: run `python docs/gen_reference.py`\n{diff}")


def test_reference_does_not_depend_on_where_the_checkout_is(generated_reference):
    """CI checks out elsewhere than a developer: an absolute path in a default made the committed page stale there."""
    generator = load_generator()
    assert str(generator.ROOT) not in generated_reference
    assert generator.scalar(str(generator.ROOT / "plugins" / "x.yaml")) == "plugins/x.yaml"


def test_reference_covers_every_builtin_entry_point():
    text = (DOCS / "reference.md").read_text()
    names = list(load_generator().builtin_entry_points())  # pyproject.toml's `alignkit` entry points
    assert {"sft", "dpo", "ppo", "gold_reward", "sentiment"} <= set(names)
    for name in names:
        assert f"\n### {name}\n" in text, f"entry point {name} missing from docs/reference.md"
    for heading in ("## model", "## Data modules", "### SFTData", "### PreferenceData", "### PromptData",
                    "### alignkit pipeline", "### alignkit collect", "### alignkit eval"):
        assert f"\n{heading}\n" in text


def test_the_docs_pages_exist():
    assert EXPECTED_PAGES <= {p.name for p in PAGES}


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_renders_cleanly_and_links_resolve(path):
    found = problems(path)
    assert not found, "\n".join(found)


def test_checker_catches_broken_markdown(tmp_path):
    page = tmp_path / "bad.md"
    page.write_text("# Title\n\n#### Skipped\n\nSee [x](missing.md) and [y](#nowhere), runs/<run>/model.\n\n"
                    "| a | b |\n| --- | --- |\n| 1 | 2 | 3 |\n\n```\nno language, never closed\n")
    found = "\n".join(problems(page, root=tmp_path))
    for expected in ("skips from level 1 to 4", "missing.md", "#nowhere", "inline HTML", "different number of cells",
                     "without a language", "never closed"):
        assert expected in found, found


def test_recipes_named_in_the_docs_exist():
    missing = []
    for path in PAGES:
        for match in re.finditer(r"--config[ =]([\w./-]+\.yaml)", path.read_text()):
            if not (REPO / match.group(1)).is_file():
                missing.append(f"{path.name}: {match.group(1)}")
    assert not missing, missing


def test_tutorial_line_counts_match_the_example():
    text = (DOCS / "tutorial-first-plugin.md").read_text()
    example = DOCS / "examples" / "alignkit-rloo"
    code = len((example / "alignkit_rloo" / "__init__.py").read_text().splitlines())
    recipe = len((example / "recipe.yaml").read_text().splitlines())
    match = re.search(r"(\d+) lines of Python and (\d+) lines of YAML", text)
    assert match, "the tutorial states the example's size as 'N lines of Python and M lines of YAML'"
    assert (int(match.group(1)), int(match.group(2))) == (code, recipe), \
        f"the tutorial says {match.group(0)!r}; the example has {code} and {recipe}: update the tutorial"


def test_code_excerpts_match_their_source():
    """A code block whose first line is ``# <path>`` quotes that file: its other lines must appear there, in
    one piece, so the tutorial cannot drift from the example it walks through."""
    checked, stale = 0, []
    for path in PAGES:
        for token in MD.parse(path.read_text()):
            if token.type != "fence":
                continue
            first, _, body = token.content.partition("\n")
            match = re.fullmatch(r"# ((?:docs|alignkit|plugins|recipes)/\S+)", first.strip())
            if not match:
                continue
            checked += 1
            source = REPO / match.group(1)
            if not source.is_file() or body.rstrip("\n") not in source.read_text():
                stale.append(f"{path.name}:{token.map[0] + 1}: excerpt of {match.group(1)} no longer matches it")
    assert checked >= 8, f"only {checked} excerpts found"
    assert not stale, "\n".join(stale)
