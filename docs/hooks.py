"""MkDocs hooks: pages include sections of README.md, so the numbers live in one place.

A line ``<!-- readme: Heading -->`` in a docs page is replaced by the README's section under
``## Heading`` (or ``### Heading``), up to the next heading of the same or a higher level; a line
``<!-- file: PATH -->`` by the file at PATH (relative to the repository root) without its first
heading. Image links into ``docs/`` are rewritten relative to the page.
"""

from __future__ import annotations

import pathlib
import posixpath
import re
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
_MARKER = re.compile(r"^<!-- (readme|file): (.+?) -->$", re.M)


def readme_section(heading: str) -> str:
  """The body of README.md's section titled ``heading``, without the heading line."""
  lines = (ROOT / "README.md").read_text().splitlines()
  for i, line in enumerate(lines):
    m = re.match(r"^(#+) (.*)$", line)
    if m and m.group(2).strip() == heading:
      level = len(m.group(1))
      body = []
      for rest in lines[i + 1:]:
        n = re.match(r"^(#+) ", rest)
        if n and len(n.group(1)) <= level:
          break
        body.append(rest)
      return "\n".join(body).strip("\n")
  raise ValueError(f"README.md has no section titled {heading!r}; a docs page includes it with "
                   f"<!-- readme: {heading} -->.")


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
  if not _MARKER.search(markdown):
    return markdown
  page_dir = posixpath.dirname(page.file.src_uri)

  def include(m: re.Match[str]) -> str:
    if m.group(1) == "readme":
      text = readme_section(m.group(2))
    else:
      text = re.sub(r"\A# .*\n", "", (ROOT / m.group(2)).read_text())
    return re.sub(r"\]\(docs/([^)]+)\)",
                  lambda l: f"]({posixpath.relpath(l.group(1), page_dir or '.')})", text)

  return _MARKER.sub(include, markdown)
