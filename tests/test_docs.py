"""The docs a reader sees without running anything: README.md, docs/*.md, colabs/.

Catches: an image link to a file that is missing or not committed (today's
`benchmarks/figures/` was git-ignored, so GitHub showed broken images), an embedded
image `make figures` would not redraw, a relative link or `#anchor` to nothing, and a
notebook committed without its outputs (stripped, half-run, or with its plots gone).
Reads files only: no jax, no kernel.
"""

import base64
import functools
import glob
import importlib.util
import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))
FIGURES_DIR = "docs/figures"
MAX_FIGURES_BYTES = 5_000_000  # "a few MB in all"
MAX_NOTEBOOK_BYTES = 1_500_000  # plots at modest dpi, no text dumps
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_IMAGE_REF = re.compile(r"!\[[^\]]*\]\[([^\]]+)\]")
_HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.I)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s*\[([^\]]+)\]:\s*(\S+)", re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
_SHOWS_PLOT = re.compile(r"display\(\s*Image\(|plt\.show\(")


@functools.lru_cache(maxsize=None)
def committed() -> frozenset | None:
  """Paths git tracks under ROOT (relative, '/'-separated), or None outside a git
  checkout (then a file's existence stands in for it)."""
  try:
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True,
                         check=True, timeout=60).stdout
  except (OSError, subprocess.CalledProcessError):
    return None
  return frozenset(p for p in out.decode().split("\0") if p)


def _is_committed(rel: str, tracked) -> bool:
  if tracked is None:
    return os.path.exists(os.path.join(ROOT, rel))
  return rel in tracked or any(p.startswith(rel.rstrip("/") + "/") for p in tracked)


def _prose(text: str) -> str:
  """The markdown without fenced code blocks and inline code (links there are not
  links)."""
  return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _target(doc: str, url: str) -> str | None:
  """`url` (relative to the file `doc`) as a path relative to ROOT, or None if it
  leaves the repository."""
  path = url.split("#")[0].split("?")[0]
  rel = os.path.normpath(os.path.join(os.path.dirname(doc), path))
  return None if rel.startswith("..") or os.path.isabs(rel) else rel.replace(os.sep, "/")


def image_links(doc: str, text: str) -> list[str]:
  """Every image `text` (the markdown file `doc`) embeds: inline, by reference, or as
  an HTML <img>."""
  prose = _prose(text)
  refs = {k.lower(): v for k, v in _REF_DEF.findall(prose)}
  out = _IMAGE.findall(prose) + _HTML_IMAGE.findall(prose)
  out += [refs.get(r.lower(), f"<undefined reference [{r}]>") for r in _IMAGE_REF.findall(prose)]
  return out


def broken_images(doc: str, text: str, tracked) -> list[str]:
  """Each image of `doc` that does not resolve to a committed file, with why."""
  problems = []
  for url in image_links(doc, text):
    if url.startswith("<undefined"):
      problems.append(f"{doc}: {url}")
    elif re.match(r"[a-z][a-z0-9+.-]*:", url, re.I):
      problems.append(f"{doc}: {url}: a remote image; embed a committed file")
    else:
      rel = _target(doc, url)
      if rel is None or not os.path.isfile(os.path.join(ROOT, rel)):
        problems.append(f"{doc}: {url}: no such file")
      elif not _is_committed(rel, tracked):
        problems.append(f"{doc}: {url}: not committed (git-ignored or not added)")
  return problems


def slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
  return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
  out, seen = set(), {}
  for h in _HEADING.findall(_FENCE.sub("", text)):
    s = slug(h)
    n = seen.get(s, 0)
    seen[s] = n + 1
    out.add(s if n == 0 else f"{s}-{n}")
  return out


def broken_links(doc: str, text: str, tracked) -> list[str]:
  """Each relative link of `doc` to a file or `#anchor` that is not there."""
  problems = []
  for url in _LINK.findall(_prose(text)):
    if re.match(r"[a-z][a-z0-9+.-]*:", url, re.I):
      continue  # web pages are not checked here (no network in tests)
    rel = doc if url.startswith("#") else _target(doc, url)
    if rel is None or not os.path.exists(os.path.join(ROOT, rel)) or not _is_committed(
        rel, tracked):
      problems.append(f"{doc}: {url}: no such committed file")
      continue
    if "#" in url and rel.endswith(".md"):
      with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        if url.split("#", 1)[1] not in anchors(f.read()):
          problems.append(f"{doc}: {url}: no such heading in {rel}")
  return problems


def notebook_problems(name: str, nb: dict) -> list[str]:
  """Why notebook `nb` does not show a reader its saved run: every code cell executed,
  in order, from one run; some output; no error; every cell that displays a plot
  keeps a PNG."""
  code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
  if not code:
    return [f"{name}: no code cells"]
  problems = []
  counts = [c.get("execution_count") for c in code]
  if counts != list(range(1, len(code) + 1)):
    problems.append(f"{name}: execution counts {counts}: not saved from one run top to "
                    "bottom (run `make notebooks`)")
  if not any(c.get("outputs") for c in code):
    problems.append(f"{name}: no cell has outputs (stripped?)")
  for i, c in enumerate(code):
    src = "".join(c.get("source", ""))
    outputs = c.get("outputs", [])
    if any(o.get("output_type") == "error" for o in outputs):
      problems.append(f"{name}: code cell {i} saved an error")
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    if _SHOWS_PLOT.search(src) and not pngs:
      problems.append(f"{name}: code cell {i} displays a plot but kept no image/png output")
    for png in pngs:
      raw = base64.b64decode("".join(png) if isinstance(png, list) else png)
      if not raw.startswith(PNG_MAGIC):
        problems.append(f"{name}: code cell {i}: an image/png output that is not a PNG")
  return problems


def _read(rel: str) -> str:
  with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
    return f.read()


# -- the checkers catch what they must ------------------------------------------------


def test_checkers_catch_broken_images_and_links():
  """Without this, a checker that found nothing would pass every doc."""
  text = ("![a](docs/figures/nope.png)\n![b](https://x.org/a.png)\n![c][r]\n"
          "<img src=\"missing.png\">\n```\n![in code](ignored.png)\n```\n"
          "[d](docs/nope.md) [e](README.md#no-such-heading) [f](#two-commands)\n")
  images = broken_images("README.md", text, committed())
  assert len(images) == 4, images
  assert not any("ignored.png" in p for p in images)
  links = broken_links("README.md", text, committed())
  assert len(links) == 2, links
  # A file on disk that git does not track is not committed.
  assert broken_images("README.md", "![x](README.md)", frozenset()) != []


def test_checker_catches_stripped_and_half_run_notebooks():
  cell = lambda n, outputs, src="print(1)": {"cell_type": "code", "execution_count": n,
                                             "source": src, "outputs": outputs}
  png = base64.b64encode(PNG_MAGIC + b"rest").decode()
  ok = {"cells": [cell(1, [{"output_type": "stream", "text": "1\n"}]),
                  cell(2, [{"output_type": "display_data", "data": {"image/png": png}}],
                       "display(Image(plots.x()))")]}
  assert notebook_problems("ok", ok) == []
  stripped = {"cells": [cell(None, []), cell(None, [], "display(Image(plots.x()))")]}
  assert len(notebook_problems("stripped", stripped)) == 3
  no_plot = {"cells": [ok["cells"][0], cell(2, [], "display(Image(plots.x()))")]}
  assert notebook_problems("no_plot", no_plot) != []
  out_of_order = {"cells": [ok["cells"][1] | {"execution_count": 2},
                            ok["cells"][0] | {"execution_count": 1}]}
  assert notebook_problems("out_of_order", out_of_order) != []


# -- the docs themselves --------------------------------------------------------------


def test_docs_exist():
  for name in ("guide", "design", "reproducing", "cluster", "figures"):
    assert f"docs/{name}.md" in DOCS


def test_readme_is_short():
  assert len(_read("README.md").splitlines()) <= 300


@pytest.mark.parametrize("doc", DOCS)
def test_every_image_is_committed(doc):
  assert broken_images(doc, _read(doc), committed()) == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
  assert broken_links(doc, _read(doc), committed()) == []


def test_embedded_figures_are_what_make_figures_draws():
  """Every image the docs embed lies under docs/figures/ and is one benchmarks/figures.py
  writes, so `make figures` redraws all of them; nothing there goes unused; the folder
  stays small."""
  spec = importlib.util.spec_from_file_location(
      "figures_script", os.path.join(ROOT, "benchmarks", "figures.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  drawn = {f"{FIGURES_DIR}/{group}/{f}" for group, (_, files) in script.GROUPS.items()
           for f in files}
  embedded = {_target(doc, url) for doc in DOCS for url in image_links(doc, _read(doc))}
  assert embedded <= drawn, sorted(embedded - drawn)
  present = {os.path.relpath(p, ROOT).replace(os.sep, "/") for p in
             glob.glob(os.path.join(ROOT, FIGURES_DIR, "**", "*"), recursive=True)
             if os.path.isfile(p)}
  assert present - embedded == set(), "figures no doc shows"
  assert sum(os.path.getsize(os.path.join(ROOT, p)) for p in present) <= MAX_FIGURES_BYTES


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_saved_with_outputs(path):
  with open(path, encoding="utf-8") as f:
    nb = json.load(f)
  assert notebook_problems(os.path.basename(path), nb) == []
  assert os.path.getsize(path) <= MAX_NOTEBOOK_BYTES
