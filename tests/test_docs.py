"""The documentation as a reader meets it: the README stays a front page, every page under docs/ is
reachable from it, every relative link lands on a file (and heading), docs/usage.md lists exactly
the flags the two commands have, and every message docs/troubleshooting.md quotes is one the code
can print."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import convert_ckpt2pt
import convert_pt2ckpt
from tests.expected_outputs import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")
MARK = "\x00"  # a value the code formats into a message
LOG_CALLS = {"debug", "info", "warning", "error", "exception"}


def test_readme_is_a_front_page_under_16_kb():
    assert README.stat().st_size < 16 * 1024, README.stat().st_size


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def relative_links(page: Path) -> list[tuple[Path, str]]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        out.append(((page.parent / file).resolve() if file else page.resolve(), anchor))
    return out


def test_every_relative_link_lands_on_a_file_and_heading():
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target, anchor in relative_links(page):
            assert target.exists(), (page.name, target)
            if anchor and target.suffix == ".md":
                assert anchor in heading_anchors(target), (page.name, target.name, anchor)


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.exists():
            continue
        seen.add(page)
        todo.extend(target for target, _ in relative_links(page))
    unreached = sorted(p.name for p in DOCS.glob("*.md") if p.resolve() not in seen)
    assert not unreached, unreached


def flags_of(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


def usage_tables() -> tuple[str, str]:
    text = (DOCS / "usage.md").read_text()
    back = text.index("## `convert_ckpt2pt.py`")
    return text[:back], text[back:]


def documented_flags(section: str) -> set[str]:
    """The flags named in the first column of a section's flag table."""
    flags = set()
    for row in section.splitlines():
        if row.startswith("| `--"):
            flags.update(re.findall(r"--[a-z][a-z0-9_-]*", row.split(" | ")[0]))
    return flags


def test_usage_md_lists_exactly_the_flags_of_each_command():
    there, back = usage_tables()
    assert documented_flags(there) == flags_of(convert_pt2ckpt.build_parser()) - {"--help"}
    assert documented_flags(back) == flags_of(convert_ckpt2pt.build_parser()) - {"--help"}


# ---------------------------------------------------------------------------------------------
# Quoted messages


def _render(node: ast.AST) -> str:
    """A string expression of the code as text, MARK where it formats in a value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else MARK for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _render(node.left) + _render(node.right)
    return MARK


def message_templates() -> list[str]:
    """Every message the package can print: exceptions as ConvertInputError joins its parts, log
    calls with their %-fields, and every other string (parts assembled elsewhere)."""
    out = []
    for path in sorted((REPO / "megatron_ms_convert").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                kw = {k.arg: _render(k.value) for k in node.keywords}
                args = [_render(a) for a in node.args]
                if name.endswith("Error") or {"expected", "found", "fix"} & set(kw):
                    parts = [args[0] if args else MARK]
                    parts += [f"{key} {kw[key]}" for key in ("expected", "found") if kw.get(key)]
                    out.append("; ".join(parts) + (f" -> {kw['fix']}" if kw.get("fix") else ""))
                elif len(args) >= 2 and MARK not in (args[0], args[1]):  # helpers such as fail(what, expected)
                    out.append(f"{args[0]}; expected {args[1]}")
                elif name in LOG_CALLS and node.args:
                    out.append(re.sub(r"%[-+ #0-9.]*[sdfr]", MARK, _render(node.args[0])))
            elif isinstance(node, (ast.Constant, ast.JoinedStr)) and _render(node) != MARK:
                out.append(_render(node))
    return [" ".join(t.split()) for t in out]


def _literal(word: str) -> bool:
    """A word of a quoted message that the code must print as is (not a placeholder such as P, N,
    `...`, `<folder>`, `[...]`, a file or parameter name, or a number standing for the reader's own)."""
    bare = word.strip(";:,.()'\"")
    return bool(bare) and not (re.fullmatch(r"[A-Za-z]|[A-Z]{2,3}|\*", bare) or re.search(r"\d", bare)
                               or any(c in word for c in "<>[]/…") or ".." in word or "." in bare)


def quoted_fragments(quote: str) -> list[str]:
    """The runs of two or more literal words of a quote, cut where messages join their parts."""
    quote = re.sub(r"^(WARNING|ERROR|INFO) ", "", quote)
    runs, run = [], []
    for word in quote.split() + ["<end>"]:
        if _literal(word):
            run.append(word)
        else:
            runs.append(" ".join(run))
            run = []
    pieces = [p.strip(" ;:,.(").split() for run in runs for p in re.split(r"; | -> ", run)]
    return [" ".join(words) for words in pieces if len(words) >= 2]


def part_of(fragment: str, template: str) -> bool:
    """Can `fragment` be part of a message `template` prints, each MARK standing for any value? At
    least half of the fragment must be the template's own wording, so values cannot stand in for it."""
    def closed(states: dict[int, int]) -> dict[int, int]:
        for j in range(len(template)):
            if j in states and template[j] == MARK and states.get(j + 1, -1) < states[j]:
                states[j + 1] = states[j]
        return states

    # A fragment may start inside a value only where the message starts with it or punctuation
    # precedes it: `no grad-buffer` must not begin in the value of `no MARK grad-buffer`.
    starts = [j for j in range(len(template) + 1)
              if j == 0 or template[j - 1] == MARK or not (template[j - 1].isalnum() or template[j - 1] == " ")
              or j == len(template) or template[j] != MARK]
    states = closed({j: 0 for j in starts})
    for ch in fragment:
        moved: dict[int, int] = {}
        for j, literal in states.items():
            if j < len(template) and template[j] == MARK:
                moved[j] = max(moved.get(j, -1), literal)
            elif j < len(template) and template[j] == ch:
                moved[j + 1] = max(moved.get(j + 1, -1), literal + 1)
        if not moved:
            return False
        states = closed(moved)
    return max(states.values()) >= 0.5 * len(fragment)


# Texts the operating system or Python writes into a message, not this package.
FROM_THE_SYSTEM = {"No space left on device", "File too large", "VerificationError"}


def test_every_message_troubleshooting_quotes_is_one_the_code_prints():
    templates = message_templates()
    text = (DOCS / "troubleshooting.md").read_text()
    quotes = [q for row in text.splitlines() if row.startswith("| `")
              for q in re.findall(r"`([^`]+)`", row.split(" | ")[0])]
    assert len(quotes) > 60
    missing = []
    for quote in quotes:
        for fragment in quoted_fragments(quote):
            if fragment in FROM_THE_SYSTEM or any(f"{system}:" in fragment for system in FROM_THE_SYSTEM):
                continue
            words = [w for w in fragment.split() if len(w) >= 4] or fragment.split()
            if not any(part_of(fragment, t) for t in templates if any(w in t for w in words)):
                missing.append((quote, fragment))
    assert not missing, missing
