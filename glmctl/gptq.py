"""GPTQ: error-compensating weight quantization (Frantar et al. 2022, arXiv 2210.17323).

For one linear layer y = x W^T with calibration inputs X, GPTQ quantizes W column by column
and, after each column, spreads that column's rounding error over the columns not yet quantized
so that ||X W^T - X Q^T||^2 stays small. With H = 2 X^T X / n (the Hessian of that loss):

    H += damp * mean(diag H) * I                  (dampening, keeps H positive definite)
    U  = cholesky(H^-1)^T  (upper)                (all the row-wise inverse Hessians at once)
    for each block of B columns (lazy batch updates):
        for column j in the block:
            q_j   = quant(w_j)                     (symmetric absmax grid, see below)
            e_j   = (w_j - q_j) / U[j, j]
            W[:, j+1:block end] -= e_j U[j, j+1:block end]
        W[:, block end:] -= E_block U[block, block end:]   (one matmul per block)

The grid is exactly glmctl's on-disk format (docs/glm130b.md §7.1, kernels/reference.py): q in
[-(2^(b-1)-1), 2^(b-1)-1], no zero point, scale = absmax / (2^(b-1)-1) stored in fp16,
one per output row or per row and group of ``group_size`` input columns. Group scales are taken
from the (error-updated) weights when their group is reached, as in the paper; with
``act_order`` (columns visited by decreasing diag H) they are fixed up front from the original
weights ("static groups"), so the groups stay contiguous and the format does not change.

``gptq_model`` runs this over a whole GLM in memory, ``gptq_layer`` over one block (what
glmctl.quantization streams from the checkpoint's files). Layer by layer: the calibration
windows go through the network once up to layer 0; then for each layer the inputs of its four
linears are captured with a hook (the block runs up to that linear and stops) and kept, in
execution order (qkv, dense, h_to_4h, 4h_to_h: each one sees the already quantized linears
before it), its Hessian is accumulated from them, and the layer's quantized output feeds the
next layer.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from glmctl.kernels.reference import dequantize, pack_int4

# The four linears of a GLM block that are quantized, in the order a forward pass reaches them.
LINEAR_NAMES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


class Hessian:
    """Running H = 2/n * sum x x^T over the rows of every batch given to ``add``."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.t(), x)


@dataclass
class GPTQResult:
    qweight: torch.Tensor  # int8 [n, k] (INT8) or [n, k/2] (INT4, packed)
    scale: torch.Tensor  # [n] or [n, k/G], scale_dtype
    dequantized: torch.Tensor  # fp32 [n, k] == dequantize(qweight, scale) exactly
    damp: float  # the relative dampening finally used


def _absmax_scale(w: torch.Tensor, qmax: int, scale_dtype) -> torch.Tensor:
    """Per-row scale of ``w`` [n, c] on glmctl's grid, rounded to ``scale_dtype``."""
    if scale_dtype == torch.float16:  # as GLM-130B: absmax and the division in fp16
        return (w.to(torch.float16).abs().amax(dim=1) / qmax).to(scale_dtype)
    return (w.abs().amax(dim=1) / qmax).to(scale_dtype)


def _transpose_(M: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Transpose the square matrix ``M`` in place, a block pair at a time (temporaries of block²)."""
    k = M.shape[0]
    for i in range(0, k, block):
        i2 = min(i + block, k)
        M[i:i2, i:i2] = M[i:i2, i:i2].t().clone()
        for j in range(i2, k, block):
            j2 = min(j + block, k)
            tmp = M[i:i2, j:j2].clone()
            M[i:i2, j:j2] = M[j:j2, i:i2].t()
            M[j:j2, i:i2] = tmp.t()
    return M


def _permute_columns_(M: torch.Tensor, idx: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """``M[:, idx]`` written into ``M`` itself, a band of rows at a time."""
    for r in range(0, M.shape[0], rows):
        M[r:r + rows] = M[r:r + rows].index_select(1, idx)
    return M


def _inverse_cholesky_(H: torch.Tensor, d: float, perm=None) -> torch.Tensor | None:
    """The upper Cholesky factor U of (P H P^T + d*mean(diag H)*I)^-1, P the column order ``perm``
    (None: as is), computed in the storage of ``H`` [k, k] (contiguous) and returned as a
    column-major view of it, the layout torch's cholesky returns; None when that matrix or its
    inverse is not positive definite (``H`` is then garbage).

    In place, with no k x k temporaries (at GLM-130B's width the H of dense_4h_to_h is 4.3 GB).
    LAPACK works on column-major storage and torch copies a row-major operand first, so H is
    transposed in place and handed over as the column-major view ``H.mT``: cholesky,
    cholesky_inverse and cholesky(upper) then write into it. They are the same LAPACK calls on
    the same values as ``cholesky_ex(H + d*mean*eye)`` etc. on copies: the same factor, bit for bit.
    """
    mean_diag = torch.diagonal(H).mean().clamp_min(1e-12)
    if perm is not None:  # P H P^T: permute the columns, transpose, permute the columns again
        _permute_columns_(H, perm)
        _transpose_(H)
        _permute_columns_(H, perm)  # storage: (P H P^T)^T, i.e. P H P^T column-major
    else:
        _transpose_(H)
    F = H.mT  # the logical matrix, column-major
    torch.diagonal(F).add_(d * mean_diag)
    info = torch.zeros((), dtype=torch.int32)
    torch.linalg.cholesky_ex(F, out=(F, info))
    if int(info) != 0:
        return None
    torch.cholesky_inverse(F, out=F)
    torch.linalg.cholesky_ex(F, upper=True, out=(F, info))
    if int(info) != 0 or not all(bool(torch.isfinite(H[r:r + 1024]).all()) for r in range(0, H.shape[0], 1024)):
        return None
    return F


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H, bits: int, group_size: int | None = None,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  scale_dtype: torch.dtype = torch.float16, overwrite: bool = False,
                  max_tries: int = 6) -> GPTQResult:
    """Quantize one weight [n, k] given the Hessian H [k, k] of its inputs (see module docstring).

    ``H`` is a tensor, or a function returning a fresh one (called once per dampening tried).
    ``overwrite``: the caller gives ``weight`` and ``H`` up, so nothing of their size is copied
    (GPTQ of a GLM-130B block in bounded memory): an fp32 contiguous ``weight`` ends up holding
    the dequantized values (``dequantized`` is ``weight`` itself) and H is factored in place; a
    tensor H then allows one dampening only (a function H allows retries). Without it the
    inputs are left as they are. Peak memory beyond the inputs: the int8 codes (n x k bytes),
    one k x k copy of H unless it is given up, and an fp32 copy of the weight unless overwritten.
    """
    if bits not in (4, 8):
        raise ValueError(f"unsupported bit width {bits}; choose 4 or 8")
    if overwrite and weight.dtype == torch.float32 and weight.is_contiguous():
        W = weight.detach()
    else:
        W = weight.detach().to(torch.float32).clone()
    n, k = W.shape
    if group_size is not None and k % group_size:
        raise ValueError(f"group size {group_size} does not divide {k} columns")
    qmax = 2 ** (bits - 1) - 1

    ngroups = k // group_size if group_size else 1
    scales = torch.zeros(n, ngroups, dtype=scale_dtype, device=W.device)
    static = group_size is None or act_order
    if group_size is None:
        scales[:, 0] = _absmax_scale(W, qmax, scale_dtype)
    elif act_order:
        for g in range(ngroups):
            scales[:, g] = _absmax_scale(W[:, g * group_size:(g + 1) * group_size], qmax, scale_dtype)

    own = callable(H) or overwrite  # may the Hessian be factored where it is?
    d = damp
    for _ in range(max_tries):
        src = H() if callable(H) else H
        if tuple(src.shape) != (k, k):
            raise ValueError(f"Hessian shape {tuple(src.shape)} does not match {k} input columns")
        Hk = src.to(W.device, torch.float32)
        if Hk.data_ptr() == src.data_ptr() and not (own and Hk.is_contiguous()):
            Hk = Hk.clone(memory_format=torch.contiguous_format)
        del src
        dead = torch.diagonal(Hk) == 0  # inputs never active in calibration: no cross terms, plain rounding
        Hk[dead, dead] = 1.0
        perm = torch.argsort(torch.diagonal(Hk), descending=True) if act_order else None
        Hinv = _inverse_cholesky_(Hk, d, perm)
        del Hk
        if Hinv is not None:
            break
        if overwrite and not callable(H):
            raise ValueError(f"Hessian is not positive definite with dampening {d:g} (factored in place: "
                             f"pass a function that rebuilds it to try more)")
        d = d * 10 if d > 0 else 1e-4
    else:
        raise ValueError(f"Hessian is not positive definite even with dampening {d:g}")
    if perm is not None:
        _permute_columns_(W, perm)

    # Dynamic group scales need a whole group inside one block.
    if group_size and not static:
        block_size = group_size * max(1, -(-block_size // group_size))
    Q = torch.zeros(n, k, dtype=torch.int8, device=W.device)
    col_group = ((perm if perm is not None else torch.arange(k, device=W.device)) // group_size
                 if group_size else torch.zeros(k, dtype=torch.long, device=W.device))
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Wq1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % group_size == 0:
                scales[:, col // group_size] = _absmax_scale(W1[:, i:i + group_size], qmax, scale_dtype)
            s = scales[:, col_group[col]].to(torch.float32)
            w = W1[:, i]
            q = torch.round(w / torch.where(s == 0, torch.ones_like(s), s)).clamp_(-qmax, qmax)
            Q[:, col] = q.to(torch.int8)
            # from the stored code, as kernels' dequantize computes it (a rounded -0.0 is code 0, so
            # +0.0): the weight left in place is dequantize(qweight, scale) bit for bit, which lets
            # gptq_layer drop it and rebuild it from the codes
            dq = Q[:, col] * s
            Wq1[:, i] = dq
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Wq1  # these columns are done: W turns into the dequantized weight as it goes
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:], in place
    del Hinv

    if perm is not None:
        inv = torch.argsort(perm)
        _permute_columns_(Q, inv)
        _permute_columns_(W, inv)
    scale = scales if group_size else scales[:, 0]
    if bits == 4:  # packed a band of rows at a time (pack_int4 makes int16 temporaries of Q's size)
        qweight = torch.empty(n, k // 2, dtype=torch.int8, device=W.device)
        for r in range(0, n, 1024):
            qweight[r:r + 1024] = pack_int4(Q[r:r + 1024])
        del Q
    else:
        qweight = Q
    return GPTQResult(qweight, scale.contiguous(), W, d)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted activations are captured."""


@torch.no_grad()
def gptq_model(model, batches, bits: int, group_size: int | None = None, *, block_size: int = 128,
               damp: float = 0.01, act_order: bool = False, scale_dtype: torch.dtype = torch.float16,
               progress=None) -> dict[str, GPTQResult]:
    """GPTQ over every layer of a (TP=1, fp) GLM, sequentially.

    ``batches``: iterable of (tokens [b, s], position_ids [b, s], attention_mask) calibration
    inputs on the model's device. Returns {state-dict weight name: GPTQResult}. The model's
    four linear weights per layer are overwritten by their dequantized values as it goes
    (later layers are calibrated on the outputs of the quantized earlier ones).
    ``progress(done_matrices)`` is called after each matrix.
    """
    model.eval()
    layers = model.transformer.layers
    batches = list(batches)
    # 1. The inputs of layer 0 for every calibration batch (hidden states, cos, sin, mask).
    captured = []

    def grab(_mod, args):
        captured.append(tuple(args[:4]))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab)
    try:
        for tokens, positions, mask in batches:
            try:
                model(tokens, positions, mask)
            except _Stop:
                pass
    finally:
        handle.remove()
    hidden = [c[0] for c in captured]
    rest = [c[1:] for c in captured]  # (cos, sin, mask): the same for every layer

    results: dict[str, GPTQResult] = {}
    done = 0
    for li, layer in enumerate(layers):
        for name, res in gptq_layer(layer, hidden, rest, bits, group_size, block_size=block_size, damp=damp,
                                    act_order=act_order, scale_dtype=scale_dtype).items():
            results[f"transformer.layers.{li}.{name}.weight"] = res
            done += 1
            if progress is not None:
                progress(done)
        hidden = [layer(x, cos, sin, mask, None) for x, (cos, sin, mask) in zip(hidden, rest)]
    return results


def _release_(weight: torch.Tensor) -> bool:
    """Give the memory of ``weight`` back (its storage shrinks to 0 bytes; its shape stays) and
    say so; False, and nothing done, unless it is the whole of a storage that can be resized (a
    view into a shared buffer or a memory-mapped file keeps its memory). Every tensor on that
    storage (a GPTQResult.dequantized) is released with it; any use raises until ``_rebuild_``."""
    st = weight.untyped_storage()
    if (weight.storage_offset() or not weight.is_contiguous() or not st.resizable()
            or st.nbytes() != weight.numel() * weight.element_size()):
        return False
    st.resize_(0)
    return True


def _is_released(weight: torch.Tensor) -> bool:
    """Whether ``weight`` holds no memory (``_release_``d, or built unread: ``released_tensor``)."""
    return weight.numel() > 0 and weight.untyped_storage().nbytes() == 0


def released_tensor(shape, dtype, device=None) -> torch.Tensor:
    """A contiguous tensor of ``shape`` and ``dtype`` that holds no memory: the placeholder of a
    weight not read yet (glmctl.quantization.build_layer; gptq_layer's ``load`` fills it). Its
    pages are never touched before they are given back."""
    t = torch.empty(shape, dtype=dtype, device=device)
    _release_(t)
    return t


def _rebuild_(weight: torch.Tensor, res: GPTQResult, bits: int, rows: int = 1024) -> None:
    """Refill a released ``weight`` with dequantize(res.qweight, res.scale): the values
    gptq_quantize left in it, bit for bit. A band of rows at a time (no n x k temporaries)."""
    weight.untyped_storage().resize_(weight.numel() * weight.element_size())
    for r in range(0, weight.shape[0], rows):
        weight[r:r + rows] = dequantize(res.qweight[r:r + rows], res.scale[r:r + rows], bits)


@contextmanager
def materialized(layer, results: dict, bits: int):
    """Inside this context, each finished linear of ``layer`` (``results``: {LINEAR_NAMES name:
    GPTQResult}) whose weight is released is rebuilt from its codes when its forward starts and
    released again when that forward ends: a forward of the block holds the codes and at most one
    rebuilt weight at a time (docs/quantize.md, "Memory"). The values are the quantized weights
    bit for bit (``_rebuild_``)."""
    rebuilt, handles = [], []

    def rebuild(res):
        def hook(mod, _args):
            if _is_released(mod.weight):
                _rebuild_(mod.weight, res, bits)
                rebuilt.append(mod)
        return hook

    def release(mod, _args, _out):
        if mod in rebuilt:
            rebuilt.remove(mod)
            _release_(mod.weight)

    try:
        for name, res in results.items():
            linear = layer.get_submodule(name)
            handles += [linear.register_forward_pre_hook(rebuild(res)), linear.register_forward_hook(release)]
        yield layer
    finally:
        for h in handles:
            h.remove()
        for mod in rebuilt:  # a forward that raised inside a rebuilt linear
            _release_(mod.weight)


@torch.no_grad()
def gptq_layer(layer, hidden, rest, bits: int, group_size: int | None = None, *, block_size: int = 128,
               damp: float = 0.01, act_order: bool = False, scale_dtype: torch.dtype = torch.float16,
               inputs=list, load=None, keep_released: bool = False) -> dict[str, GPTQResult]:
    """GPTQ of the four linears of one GLM block, in execution order, given its inputs.

    ``hidden``: the block's input hidden states, one per calibration batch (a list, or anything
    iterable again and again, e.g. glmctl.quantization.ActivationStore); ``rest``: the matching
    (cos, sin, mask). Each linear's Hessian comes from its inputs, captured by running the block
    with the linears before it already quantized; its weight is overwritten by the dequantized
    values. ``inputs()`` makes the container the captured inputs of one linear are appended to
    (a list, or an ActivationStore that spills beyond a budget; closed when done if it has
    ``close``). ``load(name)``: the weight of linear ``name``, called when its turn comes for a
    linear whose weight holds no memory yet (built unread: ``released_tensor``). Returns
    {linear name (LINEAR_NAMES): GPTQResult}.

    The block is left with every weight holding the dequantized values, or with
    ``keep_released`` the four linears' weights released (each result's ``dequantized`` with
    them, for an fp32 block): the caller then runs the block inside ``materialized(layer,
    results, bits)``, which rebuilds each from its codes for its own forward. The caller
    propagates ``hidden`` through the quantized block to the next one.
    """
    # Memory (docs/quantize.md, "Memory"): a linear's weight is loaded when its turn comes and
    # gives its memory back once quantized; the finished ones are rebuilt from their codes only
    # for their own forwards (``materialized``). While a Hessian is built (from the captured
    # inputs, again for each dampening retry) and factored, the block holds only the weight being
    # quantized (and with no ``load``, the ones not yet quantized): for GLM-130B's dense_4h_to_h,
    # its own 1.6 GB beside its 4.3 GB Hessian, not the whole 7.3 GB block.
    out = {}
    try:
        for name in LINEAR_NAMES:
            linear = layer.get_submodule(name)
            with materialized(layer, out, bits):
                captured = _capture_inputs(layer, linear, hidden, rest, inputs())
            if _is_released(linear.weight):  # not read yet
                if load is None:
                    raise ValueError(f"{name}: the weight holds no memory and no load was given")
                w = load(name).to(linear.weight.dtype).to(linear.weight.device)
                if w.shape != linear.weight.shape:
                    raise ValueError(f"{name}: loaded weight has shape {tuple(w.shape)}, "
                                     f"the block {tuple(linear.weight.shape)}")
                linear.weight.data = w
                del w

            def hessian(linear=linear, captured=captured):
                """The Hessian of ``linear``'s inputs; a new one each call (GPTQ factors it in place)."""
                hess = Hessian(linear.weight.shape[1], device=linear.weight.device)
                for x in captured:
                    hess.add(x)
                return hess.H

            # overwrite: an fp32 weight is quantized where it is (it ends up dequantized) and each
            # Hessian is factored in place: no copy of either
            try:
                res = gptq_quantize(linear.weight.data, hessian, bits, group_size, block_size=block_size,
                                    damp=damp, act_order=act_order, scale_dtype=scale_dtype, overwrite=True)
            finally:
                if hasattr(captured, "close"):
                    captured.close()
                del captured, hessian
            if res.dequantized.data_ptr() != linear.weight.data_ptr():
                linear.weight.copy_(res.dequantized.to(linear.weight.dtype))  # a bf16/fp16 block
            out[name] = res
            # the last linear is kept unless asked: no forward follows inside, and the caller runs the block next
            if keep_released or name != LINEAR_NAMES[-1]:
                _release_(linear.weight)
    finally:
        if not keep_released:
            for name, res in out.items():
                weight = layer.get_submodule(name).weight
                if _is_released(weight):
                    _rebuild_(weight, res, bits)
    return out


def _capture_inputs(layer, linear, hidden, rest, captured):
    """Append to ``captured`` the input of ``linear`` for each calibration batch, in order: the
    block runs up to ``linear`` and stops there. Returns ``captured``."""
    def grab(_mod, args):
        captured.append(args[0])
        raise _Stop

    handle = linear.register_forward_pre_hook(grab)
    try:
        for x, (cos, sin, mask) in zip(hidden, rest):
            try:
                layer(x, cos, sin, mask, None)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured
