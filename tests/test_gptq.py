"""GPTQ in bounded memory (glmctl/gptq.py): the in-place factoring and in-place weight update give
the bits of the textbook formulation (copies of H and W, written out here), allocate no k x k
temporaries, and gptq_layer quantizes an fp32 block where it is."""
import subprocess
import sys

import pytest
import torch

from glmctl.gptq import Hessian, gptq_layer, gptq_quantize
from glmctl.kernels.reference import dequantize, pack_int4
from glmctl.model import GLM
from glmctl.config import get_preset


def reference_gptq(W, H, bits, group_size, block_size, damp, act_order):
    """GPTQ as the paper writes it: H + damp*mean(diag)*I on a copy, cholesky, cholesky_inverse,
    upper cholesky, a full copy of W updated block by block with one matmul per block."""
    W, H = W.clone().float(), H.clone().float()
    n, k = W.shape
    qmax = 2 ** (bits - 1) - 1
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0

    def absmax(w):
        return (w.half().abs().amax(dim=1) / qmax).half()
    ng = k // group_size if group_size else 1
    scales = torch.zeros(n, ng, dtype=torch.float16)
    static = group_size is None or act_order
    if group_size is None:
        scales[:, 0] = absmax(W)
    elif act_order:
        for g in range(ng):
            scales[:, g] = absmax(W[:, g * group_size:(g + 1) * group_size])
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    d = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + d * torch.diagonal(H).mean().clamp_min(1e-12) * torch.eye(k))
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                break
        d = d * 10 if d > 0 else 1e-4
    if group_size and not static:
        block_size = group_size * max(1, -(-block_size // group_size))
    Q, Wq = torch.zeros(n, k, dtype=torch.int8), torch.zeros(n, k)
    cg = (perm if perm is not None else torch.arange(k)) // group_size if group_size else torch.zeros(k, dtype=torch.long)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, E1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1)
        for i in range(i2 - i1):
            c = i1 + i
            if not static and c % group_size == 0:
                scales[:, c // group_size] = absmax(W1[:, i:i + group_size])
            s = scales[:, cg[c]].float()
            q = torch.round(W1[:, i] / torch.where(s == 0, torch.ones_like(s), s)).clamp_(-qmax, qmax)
            Q[:, c], Wq[:, c] = q.to(torch.int8), q * s
            err = (W1[:, i] - q * s) / U[c, c]
            W1[:, i:] -= err[:, None] * U[c, c:i2][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q, Wq = Q[:, inv], Wq[:, inv]
    return (pack_int4(Q) if bits == 4 else Q), (scales if group_size else scales[:, 0]), Wq, d


@pytest.mark.parametrize("n,k,bits,group,act,damp", [
    (64, 96, 4, None, False, 0.01), (48, 128, 8, 32, False, 0.01), (200, 512, 4, 128, True, 0.01),
    pytest.param(8, 4160, 4, None, True, 0.01, marks=pytest.mark.slow),  # wider than a 4096-column update band
    (32, 64, 4, None, True, 0.0),  # singular H: the dampening is raised until it factors
])
def test_in_place_gptq_equals_the_copying_formula_bit_for_bit(n, k, bits, group, act, damp):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(k // 4 if damp == 0 else 2 * k, k, generator=g) * torch.rand(k, generator=g)
    x[:, 5] = 0  # an input never active
    h = Hessian(k)
    h.add(x)
    want = reference_gptq(w, h.H, bits, group, 32 if k < 1000 else 128, damp, act)
    H0, w0 = h.H.clone(), w.clone()
    kept = gptq_quantize(w, h.H, bits, group, block_size=32 if k < 1000 else 128, damp=damp, act_order=act)
    assert torch.equal(h.H, H0) and torch.equal(w, w0)  # without overwrite the inputs are left alone
    calls = []
    own = gptq_quantize(w, lambda: calls.append(1) or h.H.clone(), bits, group, block_size=32 if k < 1000 else 128,
                        damp=damp, act_order=act, overwrite=True)
    assert own.dequantized.data_ptr() == w.data_ptr()  # quantized where it is
    for got in (kept, own):
        assert torch.equal(got.qweight, want[0]) and torch.equal(got.scale, want[1])
        assert torch.equal(got.dequantized, want[2]) and got.damp == want[3]
    assert len(calls) == (1 if damp else 2)  # a rebuilt Hessian per dampening tried


def test_a_given_up_hessian_cannot_be_retried():
    w, H = torch.randn(8, 16), torch.zeros(16, 16)
    H[0, 1] = H[1, 0] = 5.0  # indefinite: no dampening helps at 1e-2
    with pytest.raises(ValueError, match="factored in place"):
        gptq_quantize(w, H, 4, None, damp=0.01, overwrite=True)


MEASURE = r"""
import torch
from glmctl.gptq import _inverse_cholesky_
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
def spd(k):
    x = torch.randn(k + 64, k)
    return x.T @ x
k = 2048
_inverse_cholesky_(spd(k), 0.01, torch.randperm(k))  # LAPACK keeps a workspace per size: allocate it first
H = spd(k)
perm = torch.randperm(k)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
assert _inverse_cholesky_(H, 0.01, perm) is not None
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_factoring_allocates_no_matrix_sized_temporaries():
    r = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True)
    extra = int(r.stdout.split()[-1])
    assert extra < 0.25 * 2048 * 2048 * 4, extra  # a copy of H would be 16 MiB; its bands and blocks are 1 MiB


def test_gptq_layer_quantizes_an_fp32_block_in_place():
    cfg = get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
    model = GLM(cfg).init_weights(seed=2).eval()
    layer = model.transformer.layers[0]
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 16, cfg.hidden_size, generator=g)]
    cos, sin = model.rope(torch.arange(16)[None].expand(2, 16), torch.float32)
    rest = [(cos, sin, torch.zeros(2, 1, 16, 16, dtype=torch.bool))]
    res = gptq_layer(layer, hidden, rest, 4, 32, act_order=True)
    for name, r in res.items():
        wt = layer.get_submodule(name).weight
        assert wt.data_ptr() == ptrs[name + ".weight"] and r.dequantized.data_ptr() == wt.data_ptr()
        assert torch.equal(wt, dequantize(r.qweight, r.scale, 4))
