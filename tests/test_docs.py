"""Runs the doctests of every module in jaxnorm/_src and every Python example of the documentation.

Each fenced ```python block of README.md and docs/**/*.md runs on its own, in a fresh namespace,
so a reader can paste any one of them: a block written as a doctest (``>>>`` prompts) must print
what it shows, any other block must run without error. Blocks fenced as ```py show code of other
libraries (Haiku, Equinox) that are not dependencies and are not run; ```bash blocks are not run.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import linecache
import pathlib
import pkgutil
import re

import pytest

import jaxnorm._src

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxnorm._src.__path__))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```\s*$",
                    re.M | re.S)


def test_the_source_modules_have_doctests():
  # Guard against the parametrized test below silently finding nothing.
  finder = doctest.DocTestFinder()
  counted = sum(len(t.examples) for name in MODULES
                for t in finder.find(importlib.import_module(f"jaxnorm._src.{name}")))
  assert counted >= 10, counted


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
  module = importlib.import_module(f"jaxnorm._src.{name}")
  result = doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)
  assert result.failed == 0, f"{result.failed} of {result.attempted} doctests failed in {name}"


def python_blocks(path: pathlib.Path) -> list[tuple[str, str]]:
  """``(id, code)`` of every fenced block whose info string starts with ``python``."""
  text = path.read_text()
  blocks = []
  for m in _FENCE.finditer(text):
    if m.group("info").strip().split(" ")[0] != "python":
      continue
    line = text.count("\n", 0, m.start()) + 1
    code = "\n".join(l[len(m.group("indent")):] for l in m.group("code").splitlines())
    blocks.append((f"{path.relative_to(ROOT)}:{line}", code + "\n"))
  return blocks


BLOCKS = [b for page in PAGES for b in python_blocks(page)]


def test_the_docs_have_python_blocks():
  per_page = {}
  for block_id, _ in BLOCKS:
    page = block_id.split(":")[0]
    per_page[page] = per_page.get(page, 0) + 1
  assert per_page.get("README.md", 0) >= 6, per_page
  assert sum(per_page.values()) >= 30, per_page


def _marks(block_id: str) -> list[pytest.MarkDecorator]:
  # The site's pages hold many examples, each compiling its own functions: slow as a group.
  return [] if block_id.startswith("README.md") else [pytest.mark.slow]


@pytest.mark.parametrize(
    "block_id,code", [pytest.param(*b, id=b[0], marks=_marks(b[0])) for b in BLOCKS])
def test_code_block_runs_alone(block_id, code):
  if re.search(r"^\s*(import torch|from torch)", code, re.M) or "interop.from_torch" in code:
    if importlib.util.find_spec("torch") is None:
      pytest.skip("PyTorch is not installed; this example converts a torch module.")
  namespace = {"__name__": "__docs__"}
  if re.search(r"^\s*>>> ", code, re.M):
    test = doctest.DocTestParser().get_doctest(code, namespace, block_id, block_id, 0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
  else:
    linecache.cache[block_id] = (len(code), None, code.splitlines(True), block_id)  # tracebacks
    exec(compile(code, block_id, "exec"), namespace)


def test_api_reference_lists_every_public_name():
  # docs/api/jaxnorm.md names the functions in reading order; the module pages follow __all__.
  import jaxnorm

  listed = set(re.findall(r"^\s+- (\w+)$", (ROOT / "docs/api/jaxnorm.md").read_text(), re.M))
  public = set(jaxnorm.__all__)
  assert listed == public, f"missing {sorted(public - listed)}, extra {sorted(listed - public)}"
  for name in ("linen", "nnx", "interop"):
    assert f"::: jaxnorm.{name}\n" in (ROOT / f"docs/api/{name}.md").read_text()
