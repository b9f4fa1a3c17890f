"""Attention masks and position ids for every GLM case (docs/glm130b.md §4). True = may not attend.

One rule covers them all. Each token has a *sample* id (packed sequences; -1 = padding), a
*block* id (Part B / a multiple-choice option) and a *prefix* flag (Part A, bidirectional).
Query i may see key j iff they are in the same sample and either j is prefix, or j <= i and
j is in i's block (or in an earlier block of the same sample when ``blocks_see_earlier``).

    generation / LM window : one sample, prefix = context, one causal block from <sop>
    training [MASK]        : Part A prefix, Part B spans causal (later spans see earlier ones)
    packed training        : several samples side by side, block-diagonal
    multiple choice        : context prefix, each choice its own block, choices never see each other
"""
from __future__ import annotations

import torch


def build_mask(prefix: torch.Tensor, sample: torch.Tensor | None = None, block: torch.Tensor | None = None,
               blocks_see_earlier: bool = True) -> torch.Tensor:
    """prefix: bool [b, s]; sample, block: int [b, s] (default all 0). Returns bool [b, 1, s, s]."""
    b, s = prefix.shape
    if sample is None:
        sample = torch.zeros(b, s, dtype=torch.long, device=prefix.device)
    if block is None:
        block = torch.zeros(b, s, dtype=torch.long, device=prefix.device)
    i = torch.arange(s, device=prefix.device)
    causal = i[None, :, None] >= i[None, None, :]  # [1, s(i), s(j)]
    same_sample = (sample[:, :, None] == sample[:, None, :]) & (sample[:, None, :] >= 0)
    if blocks_see_earlier:
        block_ok = block[:, None, :] <= block[:, :, None]
    else:
        block_ok = block[:, None, :] == block[:, :, None]
    visible = same_sample & (prefix[:, None, :] | (causal & block_ok))
    return ~visible.unsqueeze(1)


def prefix_lm_mask(seq_len: int, prefix_len: int, device=None) -> torch.Tensor:
    """[1, 1, s, s]: columns < prefix_len visible to all rows, causal afterwards (docs/glm130b.md §4.1)."""
    prefix = (torch.arange(seq_len, device=device) < prefix_len)[None]
    return build_mask(prefix)


def find_mask(tokens: list[int], ids: dict[str, int]) -> tuple[int, int] | None:
    """The mask in use (docs/glm130b.md §4.3): first [MASK] if any, else first [sMASK], else first [gMASK].
    Returns (mask_id, index) or None."""
    for name in ("[MASK]", "[sMASK]", "[gMASK]"):
        if ids[name] in tokens:
            return ids[name], tokens.index(ids[name])
    return None


def generation_input(context: list[int], ids: dict[str, int]):
    """Tokens, positions and prefix length for one generation round (docs/glm130b.md §4.2-4.3).

    ``context`` must already contain a mask token (see ``prepare_prompt``). Returns
    (tokens, positions, prefix_len, mask_index, gen_position) where tokens = context + [sop],
    prefix_len = len(context) (everything before <sop> is bidirectional) and gen_position(k)
    gives the position id of the k-th token from <sop> (k = 0 is <sop>).
    """
    found = find_mask(context, ids)
    if found is None:
        raise ValueError("context has no mask token")
    mask_id, mask_index = found
    tokens = list(context) + [ids["sop"]]
    n = len(context)
    if mask_id == ids["[gMASK]"]:
        def gen_position(k: int) -> int:
            return n + k
    else:
        def gen_position(k: int) -> int:  # all of the span sits at its mask's position
            return mask_index
    positions = list(range(n)) + [gen_position(0)]
    return tokens, positions, n, mask_index, gen_position


def prepare_prompt(tokens: list[int], ids: dict[str, int]) -> list[int]:
    """Spec §4.3: append [gMASK] when no mask is present; append eos unless the text ends with a mask."""
    masks = (ids["[MASK]"], ids["[sMASK]"], ids["[gMASK]"])
    tokens = list(tokens)
    if not any(t in masks for t in tokens):
        tokens.append(ids["[gMASK]"])
    if tokens[-1] not in masks:
        tokens.append(ids["eos"])
    return tokens


def lm_window(prompt: list[int], text: list[int], mask_id: int, sop_id: int):
    """LM scoring input (docs/glm130b.md §4.4): tokens = prompt + [M, sop] + text[:-1], targets = text
    at the positions from <sop> on; prompt + M bidirectional; positions arange.
    Returns (tokens, positions, mask [1,1,s,s], target_positions, targets)."""
    tokens = list(prompt) + [mask_id, sop_id] + list(text[:-1])
    s = len(tokens)
    prefix_len = len(prompt) + 1
    return (tokens, list(range(s)), prefix_lm_mask(s, prefix_len),
            list(range(prefix_len, prefix_len + len(text))), list(text))


def multiple_choice_input(context: list[int], choices: list[list[int]], mask_id: int, sop_id: int,
                          gmask: bool, single_token: bool = False):
    """Packed multiple choice (docs/glm130b.md §4.4): context + [M], then one block [sop] + choice[:-1] per
    choice; blocks never see each other. Returns (tokens, positions, mask, spans) where spans[c]
    lists (position_in_sequence, target_token) pairs whose log-probs sum to the choice score.
    With ``single_token`` all choices are one token and share a single <sop>."""
    tokens = list(context) + [mask_id]
    mask_pos = len(context)
    positions = list(range(len(tokens)))
    prefix = [True] * len(tokens)
    block = [0] * len(tokens)
    spans = []
    if single_token:
        tokens.append(sop_id)
        positions.append(mask_pos if not gmask else mask_pos + 1)
        prefix.append(False)
        block.append(1)
        spans = [[(len(tokens) - 1, c[0])] for c in choices]
    else:
        for ci, choice in enumerate(choices, start=1):
            start = len(tokens)
            blk = [sop_id] + list(choice[:-1])
            tokens += blk
            if gmask:
                positions += list(range(mask_pos + 1, mask_pos + 1 + len(blk)))
            else:
                positions += [mask_pos] * len(blk)
            prefix += [False] * len(blk)
            block += [ci] * len(blk)
            spans.append([(start + k, tok) for k, tok in enumerate(choice)])
    mask = build_mask(torch.tensor([prefix]), block=torch.tensor([block]), blocks_see_earlier=False)
    return tokens, positions, mask, spans
