"""The GLM objective (docs/glm130b.md §4.5, §5.1) against its rules, on fixed seeds.

Every check rebuilds the expectation independently: the corpus text is recovered from Part A
and Part B, the attention mask is compared with a naive loop over the written rules, and packing
is checked by running the real network on the packed sequence and on each sample alone.
"""
import math

import numpy as np
import pytest
import torch

from glmctl import objective as obj
from glmctl.config import get_preset
from glmctl.model import GLM

CFG = get_preset("tiny")
IDS = obj.SpecialIds.from_dict(CFG.special_token_ids())
SPECIAL = {IDS.mask, IDS.gmask, IDS.sop, IDS.eop, IDS.pad}


def corpus(n, seed=0):
    return np.random.default_rng(seed).integers(10, 400, size=n)  # below every special id of `tiny`


def split_part_b(seg):
    """[(position, span tokens, targets)] per span, in Part-B order."""
    b = np.flatnonzero(seg.loss)
    starts = [i for i in b if seg.tokens[i] == IDS.sop]
    ends = starts[1:] + [b[-1] + 1]
    return [(int(seg.positions[s]), seg.tokens[s + 1:e].tolist(), seg.targets[s:e].tolist())
            for s, e in zip(starts, ends)]


def test_span_length_pmf_is_zero_truncated_poisson():
    pmf = obj.span_length_pmf(3.0, 39)
    z = 1 - math.exp(-3)  # P(k >= 1); the tail beyond 39 is below 1e-20
    assert pmf[0] == pytest.approx(3 * math.exp(-3) / z, rel=1e-9)  # 0.15719
    assert pmf[2] == pytest.approx(4.5 * math.exp(-3) / z, rel=1e-9)  # k = 3: 0.23578
    rng = np.random.default_rng(0)
    cfg = obj.ObjectiveConfig(seq_len=512)
    draws = np.concatenate([obj.draw_span_lengths(1, rng, cfg) for _ in range(20000)])
    freq = np.bincount(draws, minlength=40)[1:] / len(draws)
    assert np.abs(freq - pmf).max() < 0.01
    assert draws.min() >= 1 and abs(draws.mean() - 3 / z) < 0.05  # mean 3.157


@pytest.mark.parametrize("w", [16, 64, 128, 512])
def test_mask_sample_rules(w):
    cfg = obj.ObjectiveConfig(seq_len=4 * w)
    reordered = 0
    for seed in range(40):
        window = corpus(w, seed)
        seg = obj.mask_sample(window, np.random.default_rng(seed), cfg, IDS)
        assert len(seg) <= w
        part_a = seg.tokens[~seg.loss]
        la = len(part_a)
        assert seg.prefix.tolist() == (~seg.loss).tolist() and not seg.loss[:la].any() and seg.loss[la:].all()
        assert seg.positions[:la].tolist() == list(range(la))
        masks_at = np.flatnonzero(part_a == IDS.mask).tolist()
        assert all(b - a > 1 for a, b in zip(masks_at, masks_at[1:]))  # spans never touch
        spans = split_part_b(seg)
        assert sorted(p for p, _, _ in spans) == masks_at  # one Part-B span per mask, at its position
        for pos, toks, tgts in spans:
            assert len(toks) >= 1
            assert tgts == toks + [IDS.eop]  # input sop + span, target span + eop
            assert (seg.positions[la:][seg.tokens[la:] == IDS.sop] >= 0).all()
        reordered += [p for p, _, _ in spans] != sorted(p for p, _, _ in spans)
        # Round trip: Part A with every mask replaced by its span is a prefix of the window.
        by_pos = {p: t for p, t, _ in spans}
        text = []
        for i, tok in enumerate(part_a.tolist()):
            text.extend(by_pos[i] if i in by_pos else [tok])
        n, k = len(text), len(spans)
        assert text == window[:n].tolist() and len(seg) == n + 2 * k
        # Masked share: at least 15 % of n, and dropping the last drawn span falls short.
        masked = sum(len(t) for _, t, _ in spans)
        target = obj.masked_target(n, 0.15)
        if w >= 64:
            assert target <= masked and masked - max(len(t) for _, t, _ in spans) < target
            assert n >= w - 2 * k - 2 * 8  # the window is used up to a few tokens
    if w >= 64:
        assert reordered > 5  # Part B order is random, not left to right


def naive_visible(seq):
    """The written rule: same packed sample, and the key is Part A, or both are Part B with key <= query."""
    L = len(seq.tokens)
    v = np.zeros((L, L), bool)
    for i in range(L):
        for j in range(L):
            if seq.sample[i] < 0 or seq.sample[i] != seq.sample[j]:
                continue
            v[i, j] = seq.prefix[j] or (not seq.prefix[i] and j <= i)
    return v


@pytest.mark.parametrize("kind", [obj.MASK, obj.GMASK, obj.MIP])
def test_attention_mask_follows_the_rules(kind):
    cfg = obj.ObjectiveConfig(seq_len=96, samples_per_sequence=3)
    instr = [(corpus(7, 1).tolist(), corpus(5, 2).tolist()), (corpus(3, 3).tolist(), corpus(9, 4).tolist())]
    seq = obj.build_sequence(corpus(96, 5), np.random.default_rng(1), cfg, IDS, instr, kind=kind)
    batch = obj.collate([seq])
    assert batch["attention_mask"].shape == (1, 1, 96, 96)
    assert (~batch["attention_mask"][0, 0]).numpy().tolist() == naive_visible(seq).tolist()
    if kind != obj.GMASK:
        assert seq.sample.max() >= 1  # several samples packed


@pytest.mark.slow
def test_packed_samples_never_attend_across_each_other():
    """Each packed sample's logits equal those of the sample run alone in the real network."""
    torch.manual_seed(0)
    model = GLM(CFG.replace(hidden_dropout=0.0, attention_dropout=0.0)).init_weights(3).eval()
    cfg = obj.ObjectiveConfig(seq_len=128, samples_per_sequence=4)
    seq = obj.build_sequence(corpus(128, 9), np.random.default_rng(2), cfg, IDS, kind=obj.MASK)
    b = obj.collate([seq])
    with torch.no_grad():
        packed = model(b["tokens"], b["positions"], b["attention_mask"])[0]
        for sid in range(4):
            idx = np.flatnonzero(seq.sample == sid)
            alone = obj.Sequence(*(getattr(seq, f)[idx] for f in ("tokens", "targets", "loss", "positions",
                                                                   "prefix", "sample", "block")), kind=seq.kind)
            a = obj.collate([alone])
            ref = model(a["tokens"], a["positions"], a["attention_mask"])[0]
            torch.testing.assert_close(packed[idx], ref, rtol=1e-5, atol=1e-5)


def test_gmask_sample_rules():
    cfg = obj.ObjectiveConfig(seq_len=101)
    n = 100
    lengths = []
    for seed in range(400):
        text = corpus(n, seed)
        seg = obj.gmask_sample(text, np.random.default_rng(seed), cfg, IDS)
        p = int(np.flatnonzero(seg.tokens == IDS.gmask)[0])
        g = n - p
        lengths.append(g)
        assert 20 <= g <= n - 1  # at least 20 % generated, at least one prefix token
        assert len(seg) == n + 1 and seg.tokens[p + 1] == IDS.sop
        assert seg.tokens[:p].tolist() == text[:p].tolist() and seg.tokens[p + 2:].tolist() == text[p:n - 1].tolist()
        assert seg.targets[seg.loss].tolist() == text[p:].tolist()
        assert np.flatnonzero(seg.loss).tolist() == list(range(p + 1, n + 1))
        assert seg.positions.tolist() == list(range(n + 1))
        assert seg.prefix.tolist() == [True] * (p + 1) + [False] * g
    lengths = np.array(lengths)
    assert lengths.min() <= 22 and lengths.max() >= 97  # the whole range is used
    assert abs(lengths.mean() - (20 + 99) / 2) < 3  # uniform: mean 59.5, sd of the mean ~1.2


def test_instruction_sample_layout_and_truncation():
    seg = obj.instruction_sample([11, 12, 13], [21, 22], 32, IDS)
    assert seg.tokens.tolist() == [11, 12, 13, IDS.gmask, IDS.sop, 21, 22]
    assert seg.targets[seg.loss].tolist() == [21, 22, IDS.eop]
    assert seg.positions.tolist() == list(range(7)) and seg.prefix.sum() == 4
    # A prompt with a blank keeps it: Part B at the mask's position.
    seg = obj.instruction_sample([11, IDS.mask, 13], [21], 32, IDS)
    assert seg.tokens.tolist() == [11, IDS.mask, 13, IDS.sop, 21] and seg.positions.tolist() == [0, 1, 2, 1, 1]
    # Too long: the prompt loses its left end, the target keeps its start.
    seg = obj.instruction_sample(list(range(100, 140)), list(range(200, 240)), 32, IDS)
    assert len(seg) == 32
    prompt = seg.tokens[: int(np.flatnonzero(seg.tokens == IDS.gmask)[0])].tolist()
    assert prompt == list(range(140 - len(prompt), 140)) and len(prompt) >= 8
    assert seg.targets[seg.loss].tolist()[:-1] == list(range(200, 200 + len(seg) - len(prompt) - 2))


def test_objective_mix_and_determinism():
    cfg = obj.ObjectiveConfig(seq_len=64, samples_per_sequence=2, mip_ratio=0.05)
    instr = [([11, 12], [13, 14, 15])]
    chunk = corpus(64)
    kinds = [obj.build_sequence(chunk, obj.sample_rng(7, i), cfg, IDS, instr).kind for i in range(4000)]
    share = {k: kinds.count(k) / len(kinds) for k in (obj.MASK, obj.GMASK, obj.MIP)}
    sd = math.sqrt(0.25 / len(kinds))
    assert abs(share[obj.MIP] - 0.05) < 4 * sd
    assert abs(share[obj.MASK] - 0.95 * 0.3) < 4 * sd
    assert abs(share[obj.GMASK] - 0.95 * 0.7) < 4 * sd
    a = obj.build_sequence(chunk, obj.sample_rng(7, 123), cfg, IDS, instr)
    b = obj.build_sequence(chunk, obj.sample_rng(7, 123), cfg, IDS, instr)
    c = obj.build_sequence(chunk, obj.sample_rng(8, 123), cfg, IDS, instr)
    assert a.kind == b.kind and (a.tokens == b.tokens).all() and (a.positions == b.positions).all()
    assert not ((a.tokens == c.tokens).all() and a.kind == c.kind)


def test_collate_types_and_padding():
    cfg = obj.ObjectiveConfig(seq_len=64, samples_per_sequence=1)
    seq = obj.build_sequence(None, np.random.default_rng(0), cfg, IDS, [([11], [12])], kind=obj.MIP)
    b = obj.collate([seq, seq])
    assert b["tokens"].dtype == torch.long and b["loss_mask"].dtype == torch.bool
    pad = seq.sample < 0
    assert pad.any() and (seq.tokens[pad] == IDS.pad).all() and not seq.loss[pad].any()
    assert b["attention_mask"][0, 0][torch.from_numpy(pad)].all()  # padding rows see nothing
