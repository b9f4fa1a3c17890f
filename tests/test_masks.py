"""Mask and position builders against the spec's worked examples (§4.3, §4.4)."""
import torch

from glmctl.config import get_preset
from glmctl.model import masks

IDS = get_preset("glm-130b").special_token_ids()
MASK, GMASK, SOP, EOS = IDS["[MASK]"], IDS["[gMASK]"], IDS["sop"], IDS["eos"]


def visible(mask):
    return (~mask[0, 0]).int().tolist()


def test_mask_example_from_spec():
    # `k0 k1 [MASK] k3 k4` -> k0 k1 [MASK] k3 k4 </s> <sop>; positions 0 1 2 3 4 5 | 2
    ctx = masks.prepare_prompt([10, 11, MASK, 13, 14], IDS)
    assert ctx == [10, 11, MASK, 13, 14, EOS]
    tokens, positions, prefix_len, mask_index, gen_pos = masks.generation_input(ctx, IDS)
    assert tokens == [10, 11, MASK, 13, 14, EOS, SOP]
    assert positions == [0, 1, 2, 3, 4, 5, 2]
    assert [gen_pos(k) for k in range(4)] == [2, 2, 2, 2]
    m = masks.prefix_lm_mask(9, prefix_len)  # two generated tokens appended
    v = visible(m)
    for row in range(9):  # columns 0-5 visible to every row
        assert v[row][:6] == [1] * 6
    assert v[6][6:] == [1, 0, 0] and v[7][6:] == [1, 1, 0] and v[8][6:] == [1, 1, 1]
    assert v[0][6:] == [0, 0, 0]


def test_gmask_example_from_spec():
    # `k0 k1` -> k0 k1 [gMASK] <sop>; positions 0 1 2 3, then 4, 5, ...; columns 0-2 bidirectional
    ctx = masks.prepare_prompt([10, 11], IDS)
    assert ctx == [10, 11, GMASK]
    tokens, positions, prefix_len, _, gen_pos = masks.generation_input(ctx, IDS)
    assert tokens == [10, 11, GMASK, SOP] and positions == [0, 1, 2, 3]
    assert [gen_pos(k) for k in range(1, 3)] == [4, 5]
    v = visible(masks.prefix_lm_mask(4, prefix_len))
    assert v == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_first_mask_type_wins():
    assert masks.find_mask([1, GMASK, 2, MASK, 3], IDS) == (MASK, 3)
    assert masks.find_mask([1, IDS["[sMASK]"], 2, GMASK], IDS) == (IDS["[sMASK]"], 1)


def test_multiple_choice_blocks_never_see_each_other():
    tokens, positions, mask, spans = masks.multiple_choice_input([5, 6, 7], [[20, 21], [30, 31, 32]], MASK, SOP,
                                                                 gmask=False)
    assert tokens == [5, 6, 7, MASK, SOP, 20, SOP, 30, 31]
    assert positions == [0, 1, 2, 3, 3, 3, 3, 3, 3]
    v = visible(mask)
    assert all(v[r][:4] == [1, 1, 1, 1] for r in range(9))
    assert v[4][4:] == [1, 0, 0, 0, 0] and v[5][4:] == [1, 1, 0, 0, 0]
    assert v[6][4:] == [0, 0, 1, 0, 0] and v[8][4:] == [0, 0, 1, 1, 1]
    assert v[0][4:] == [0] * 5
    assert spans == [[(4, 20), (5, 21)], [(6, 30), (7, 31), (8, 32)]]
    _, pos_g, _, _ = masks.multiple_choice_input([5, 6, 7], [[20, 21], [30, 31, 32]], GMASK, SOP, gmask=True)
    assert pos_g == [0, 1, 2, 3, 4, 5, 4, 5, 6]


def test_single_token_choices_share_one_sop():
    tokens, positions, _, spans = masks.multiple_choice_input([5, 6], [[40], [41], [42]], MASK, SOP,
                                                              gmask=False, single_token=True)
    assert tokens == [5, 6, MASK, SOP] and positions == [0, 1, 2, 2]
    assert spans == [[(3, 40)], [(3, 41)], [(3, 42)]]


def test_lm_window():
    tokens, positions, mask, tpos, targets = masks.lm_window([1, 2], [7, 8, 9], GMASK, SOP)
    assert tokens == [1, 2, GMASK, SOP, 7, 8] and positions == list(range(6))
    assert tpos == [3, 4, 5] and targets == [7, 8, 9]
    v = visible(mask)
    assert v[0] == [1, 1, 1, 0, 0, 0] and v[4] == [1, 1, 1, 1, 1, 0]


def test_packed_samples_are_block_diagonal():
    prefix = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    sample = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    v = visible(masks.build_mask(prefix, sample))
    for i in range(8):
        for j in range(8):
            same = sample[0, i] == sample[0, j] and sample[0, j] >= 0
            want = same and (bool(prefix[0, j]) or j <= i)
            assert v[i][j] == int(want), (i, j)
