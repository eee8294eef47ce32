"""A griffe extension that adapts jaxnorm's docstrings to Markdown before mkdocstrings renders them.

The docstrings are written for ``help()`` and doctest: ``>>>`` examples in running text, Sphinx
roles such as ``:func:`jaxnorm.batch_norm```, and Args entries that describe several parameters at
once (``a, b, c: as in flax.nnx.BatchNorm.``). In Markdown the examples would become paragraphs
(their ``x["mean"]`` even reads as a link), so this extension fences them as ``pycon`` code, fences
reST literal blocks (``::``) too, drops the roles, and splits a shared Args entry into one entry
per name. The source stays as it is.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|obj|exc):`~?([^`]+)`")


def _fence_doctests(lines: list[str]) -> list[str]:
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.lstrip()
    if stripped.startswith(">>>"):
      indent = line[:len(line) - len(stripped)]
      block = []
      while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
        block.append(lines[i][len(indent):])
        i += 1
      out += [indent + "```pycon"] + [indent + b for b in block] + [indent + "```"]
      continue
    out.append(line)
    i += 1
  return out


def _fence_literal_blocks(lines: list[str]) -> list[str]:
  """reST literal blocks (a paragraph ending in ``::``, then an indented block) as code fences."""
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.rstrip().endswith("::") and i + 2 < len(lines) and not lines[i + 1].strip():
      base = len(line) - len(line.lstrip())
      j = i + 2
      block_indent = len(lines[j]) - len(lines[j].lstrip())
      if lines[j].strip() and block_indent > base:
        out += [line.rstrip()[:-1], ""]
        pad = " " * base
        out.append(pad + "```text")
        while j < len(lines) and (not lines[j].strip()
                                  or len(lines[j]) - len(lines[j].lstrip()) >= block_indent):
          out.append(pad + lines[j][block_indent:])
          j += 1
        while out[-1] == pad:
          out.pop()
        out += [pad + "```", ""]
        i = j
        continue
    out.append(line)
    i += 1
  return out


def _split_shared_args(lines: list[str]) -> list[str]:
  out: list[str] = []
  in_args, indent = False, ""
  i = 0
  while i < len(lines):
    line = lines[i]
    if re.match(r"^\s*(Args|Arguments|Parameters):\s*$", line):
      in_args, indent = True, ""
      out.append(line)
      i += 1
      continue
    if in_args and line.strip() and not indent:
      indent = line[:len(line) - len(line.lstrip())]
    if in_args and line.strip() and len(line) - len(line.lstrip()) < len(indent):
      in_args = False
    names_line = re.match(r"^(\s*)(\w+,\s*[\w ,]*)$", line)
    if in_args and names_line and names_line.group(1) == indent:
      # "a, b,\n  c, d: text" -> one "name: text" entry per name.
      text = line.strip()
      j = i + 1
      while ":" not in text and j < len(lines):
        text += " " + lines[j].strip()
        j += 1
      names, _, desc = text.partition(":")
      desc_lines = [desc.strip()]
      while j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > len(indent):
        desc_lines.append(lines[j].strip())
        j += 1
      desc = " ".join(d for d in desc_lines if d)
      out += [f"{indent}{n.strip()}: {desc}" for n in names.split(",") if n.strip()]
      i = j
      continue
    out.append(line)
    i += 1
  return out


class MarkdownDocstrings(griffe.Extension):
  """Rewrites each docstring once, when its object is loaded."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is None:
      return
    lines = obj.docstring.value.split("\n")
    lines = _split_shared_args(_fence_literal_blocks(_fence_doctests(lines)))
    obj.docstring.value = _ROLE.sub(r"`\1`", "\n".join(lines))
