"""Runs the doctests of every module in jaxnorm/_src and the `>>>` examples of README.md."""

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import jaxnorm._src

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxnorm._src.__path__))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


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


def _readme_examples():
  text = (ROOT / "README.md").read_text()
  parser = doctest.DocTestParser()
  test = parser.get_doctest(text, {}, "README.md", str(ROOT / "README.md"), 0)
  return [test] if test.examples else []


@pytest.mark.parametrize("test", _readme_examples(), ids=lambda t: t.name)
def test_readme_doctests(test):
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} README examples failed"
