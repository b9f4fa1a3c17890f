"""Metrics: answer normalisation, EM/F1, means with standard errors, perplexities, file aggregation.

EM/F1 follow SQuAD's official scorer (GLM-130B's ``evaluation/metrics.py``): lower-case, drop
ASCII punctuation and the articles a/an/the, collapse whitespace; F1 is over the bag of tokens.
For Chinese, whose words are not separated by spaces, two extensions as in CMRC2018's official
scorer: CJK punctuation is dropped too, and every CJK character is its own token. English text
scores exactly as SQuAD does.

    normalize_answer("The  Cat, sat!")      -> "cat sat"
    f1_score("北京市", "北京")               -> 0.8   (P 2/3, R 1)
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter

_PUNCT = set(string.punctuation) | set("，。！？、；：“”‘’（）《》〈〉【】「」『』—…·～﹏")
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_RE = re.compile(f"([{_CJK}])")


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answer_tokens(s: str) -> list[str]:
    """Tokens of a normalised answer: whitespace words, with each CJK character split off."""
    return _CJK_RE.sub(r" \1 ", normalize_answer(s)).split()


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    p, t = answer_tokens(prediction), answer_tokens(truth)
    same = sum((Counter(p) & Counter(t)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def strict_match(prediction: str, truth: str) -> float:
    """GLM-130B's LAMBADA "Accuracy": the stripped strings are equal (no normalisation)."""
    return float(prediction.strip() == truth.strip())


def max_over_targets(metric, prediction: str, targets: list[str]) -> float:
    return max((metric(prediction, t) for t in targets), default=0.0)


# ---- aggregation -------------------------------------------------------------------------
def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt n), lm-eval's ``*_stderr``."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    if not n:
        return float("nan")
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def weighted_mean(values: list[float], weights: list[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else float("nan")


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def language_model_metrics(loss: float, tokens: int, words: int, n_bytes: int) -> dict[str, float]:
    """From the summed negative log-likelihood (nats) over ``tokens`` scored tokens:

    word_perplexity  = exp(min(20, loss / words))      GLM-130B's PPL (capped as it caps it)
    token_perplexity = exp(loss / tokens)
    byte_perplexity  = exp(loss / bytes)               lm-eval's
    bits_per_byte    = loss / bytes / ln 2             lm-eval's, and GLM-130B's Pile BPB
    """
    nan = float("nan")
    return {
        "word_perplexity": math.exp(min(20.0, loss / words)) if words else nan,
        "token_perplexity": _exp(loss / tokens) if tokens else nan,
        "byte_perplexity": _exp(loss / n_bytes) if n_bytes else nan,
        "bits_per_byte": loss / n_bytes / math.log(2) if n_bytes else nan,
    }
