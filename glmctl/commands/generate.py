"""`glmctl generate`: fill [MASK] blanks and continue text with a GLM checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from glmctl.errors import EXIT_CODES_HELP
from glmctl.generation import GenerationConfig as G
from glmctl.stages.generate import GenerateConfig as C, run

EPILOG = (
    "Examples:\n\n"
    "  glmctl generate model 'The capital of France is'\n\n"
    "  glmctl generate model 'Tsinghua University is in [MASK], China. It was founded in [MASK].' --json\n\n"
    "  glmctl generate model --input prompts.jsonl --output results.jsonl --batch-size 16\n\n"
    "  glmctl generate model-int4 'Once upon a time' --strategy sample --top-p 0.7 --seed 1234\n\n"
    "A prompt without a mask is continued ([gMASK] appended); [MASK] / [sMASK] blanks are filled left "
    "to right. Under torchrun the model is split over the ranks (tensor parallel).\n\n"
    + EXIT_CODES_HELP + " With a prompt file, a rejected prompt (malformed JSON line, unknown mask "
    "spelling, too long) prints one error line naming its line; the other prompts still run and their "
    "results are written, and the exit code is 3."
)


def register(app: typer.Typer) -> None:
    app.command("generate", epilog=EPILOG)(generate_cmd)


def generate_cmd(
    model: Path = typer.Argument(..., help="Checkpoint directory (any precision: fp32/bf16/fp16, INT8/INT4)."),
    prompts: Optional[List[str]] = typer.Argument(None, help="Prompts. Without any (and without --input), "
                                                             "prompts are read from stdin, or interactively "
                                                             "on a terminal."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Prompt file: one prompt per line, or JSON lines "
                                                                    "{\"id\": ..., \"prompt\": ...}; - for stdin."),
    input_format: str = typer.Option(C.input_format, "--input-format",
                                     help="auto (JSON lines if the file ends in .jsonl or starts with '{'), "
                                          "text or jsonl."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Write results as JSON lines here (atomically), in input order."),
    format: str = typer.Option(C.format, "--format",
                               help="stdout format: text or jsonl (auto: jsonl for --input/stdin, text for "
                                    "prompt arguments)."),
    max_new_tokens: int = typer.Option(G.max_new_tokens, "--max-new-tokens", "-n", help="Tokens generated per blank, at most."),
    strategy: str = typer.Option(G.strategy, "--strategy", help="greedy, sample or beam."),
    temperature: float = typer.Option(G.temperature, "--temperature", help="Sampling temperature."),
    top_k: int = typer.Option(G.top_k, "--top-k", help="Sample from the k most likely tokens (0: off)."),
    top_p: float = typer.Option(G.top_p, "--top-p", help="Nucleus sampling: smallest set with probability >= p "
                                                     "(0: off; GLM-130B's default is 0.7)."),
    num_beams: int = typer.Option(G.num_beams, "--num-beams", help="Beam search: number of beams."),
    length_penalty: float = typer.Option(G.length_penalty, "--length-penalty",
                                         help="Beam search: score / ((5 + length) / 6) ** X (length counts "
                                              "the context, as GLM-130B)."),
    no_repeat_ngram_size: int = typer.Option(G.no_repeat_ngram_size, "--no-repeat-ngram-size",
                                             help="Never repeat an n-gram within a blank (0: off)."),
    min_new_tokens: int = typer.Option(G.min_new_tokens, "--min-new-tokens", help="End tokens are banned until this many tokens "
                                                                   "were generated per blank."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (each prompt derives its own stream "
                                                            "from it, so batching does not change results)."),
    batch_size: int = typer.Option(C.batch_size, "--batch-size", "-b", help="Prompts decoded together."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream",
                                          help="Print tokens as they are produced (default: on a terminal; "
                                               "text output only, one prompt at a time)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document: each prompt's completed text "
                                                        "and its blanks (text, token count, character offsets)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: as stored)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    adapter: Optional[Path] = typer.Option(C.adapter, "--adapter",
                                           help="LoRA / P-tuning adapter from `glmctl finetune` (made on MODEL)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="Tokenizer directory (default: the checkpoint's copy)."),
    compile: bool = typer.Option(C.compile, "--compile/--no-compile",
                                 help="torch.compile the decoding step: the first steps pay tens of seconds of "
                                      "compilation, later ones run faster (docs/generate.md)."),
):
    """Fill blanks ([MASK], [sMASK]) and continue text ([gMASK]) with a GLM model."""
    gen = G(strategy=strategy, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
                           no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens, seed=seed)
    cfg = C(
        model=str(model), prompts=tuple(prompts or ()), input=input, input_format=input_format,
        output=None if output is None else str(output), format=format, json=json_out, stream=stream,
        batch_size=batch_size, dtype=dtype, device=device, tokenizer=None if tokenizer is None else str(tokenizer),
        adapter=None if adapter is None else str(adapter), compile=compile,
        generation=gen)
    run(cfg)
