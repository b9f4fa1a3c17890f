"""GPTQ in bounded memory (glmctl/gptq.py): the in-place factoring and in-place weight update give
the bits of the textbook formulation (copies of H and W, written out here), allocate no k x k
temporaries, and gptq_layer quantizes an fp32 block where it is, building each Hessian from the
captured inputs of its linear while the finished linears hold no memory (rebuilt from their codes
bit for bit, each for its own forward only), and can load each weight when its turn comes."""
import subprocess
import sys

import pytest
import torch
from glmctl.kernels.reference import dequantize, pack_int4

import glmctl.gptq as G
from glmctl.config import get_preset
from glmctl.gptq import LINEAR_NAMES, Hessian, gptq_layer, gptq_quantize
from glmctl.model import GLM
from glmctl.quantization import ActivationStore


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
        if name == LINEAR_NAMES[-1]:  # the earlier ones were released and rebuilt: new memory
            assert wt.data_ptr() == ptrs[name + ".weight"]
        assert r.dequantized.data_ptr() == wt.data_ptr()  # one copy, shared with the result
        assert torch.equal(wt, dequantize(r.qweight, r.scale, 4))


# --- gptq_layer releases the finished linears' weights (docs/quantize.md, "Memory") ---

class _Enough(Exception):
    pass


def tiny_block(seed=2):
    cfg = get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
    model = GLM(cfg).init_weights(seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(2, 16, cfg.hidden_size, generator=g) for _ in range(2)]
    cos, sin = model.rope(torch.arange(16)[None].expand(2, 16), torch.float32)
    rest = [(cos, sin, torch.zeros(2, 1, 16, 16, dtype=torch.bool))] * 2
    return model.transformer.layers[0], hidden, rest


def bits_of(t):
    return t.contiguous().view(torch.int32)  # fp32 bit patterns: -0.0 and +0.0 differ


def by_hand(layer, hidden, rest, bits, group, act):
    """The expectation, without gptq_layer: each linear in execution order gets its Hessian from
    the block (earlier linears already quantized) and a copying gptq_quantize, and takes its
    dequantized values."""
    out = {}
    with torch.no_grad():
        for name in LINEAR_NAMES:
            lin = layer.get_submodule(name)
            h = Hessian(lin.weight.shape[1])

            def grab(_m, inp, _o, h=h):
                h.add(inp[0])
                raise _Enough

            hook = lin.register_forward_hook(grab)
            for x, (cos, sin, mask) in zip(hidden, rest):
                try:
                    layer(x, cos, sin, mask, None)
                except _Enough:
                    pass
            hook.remove()
            r = gptq_quantize(lin.weight, h.H, bits, group, block_size=16, act_order=act)
            lin.weight.copy_(r.dequantized)
            out[name] = r
    return out


@pytest.mark.parametrize("bits,group,act", [(4, None, False), (4, 32, True), (8, 32, False), (4, None, True)])
def test_gptq_layer_with_released_weights_equals_linears_quantized_one_by_one(bits, group, act):
    layer, hidden, rest = tiny_block()
    twin, _, _ = tiny_block()
    res = gptq_layer(layer, hidden, rest, bits, group, block_size=16, act_order=act)
    want = by_hand(twin, hidden, rest, bits, group, act)
    for name in LINEAR_NAMES:
        got, exp = res[name], want[name]
        assert torch.equal(got.qweight, exp.qweight) and torch.equal(got.scale, exp.scale)
        wt = layer.get_submodule(name).weight
        assert torch.equal(bits_of(wt), bits_of(twin.get_submodule(name).weight))
        assert torch.equal(bits_of(wt), bits_of(dequantize(got.qweight, got.scale, bits)))
        assert torch.equal(bits_of(got.dequantized), bits_of(wt))
    with torch.no_grad():  # the block runs as it is left
        x, (cos, sin, mask) = hidden[0], rest[0]
        assert torch.equal(layer(x, cos, sin, mask, None), twin(x, cos, sin, mask, None))


def nbytes(lin):
    return lin.weight.untyped_storage().nbytes()


def held(lins):
    return [nbytes(lin) for lin in lins]


def watch_linears(lins, record):
    """Append (j, bytes held by each of ``lins``) to ``record`` at the end of linear j's forward
    (hooks registered first run first: before ``materialized`` releases the weight again)."""
    for j, lin in enumerate(lins):
        lin.register_forward_hook(lambda _m, _a, _o, j=j: record.append((j, held(lins))))


def test_while_a_hessian_is_built_and_factored_the_finished_linears_hold_no_memory(monkeypatch):
    layer, hidden, rest = tiny_block()
    lins = [layer.get_submodule(n) for n in LINEAR_NAMES]
    forwards, seen, current, in_linears = [], [], [], []
    layer.register_forward_pre_hook(lambda _m, _a: forwards.append(held(lins)))
    watch_linears(lins, in_linears)

    def watch(weight, H, *args, **kw):
        current[:] = [next(j for j, lin in enumerate(lins) if lin.weight.data_ptr() == weight.data_ptr())]

        def hessian():
            ran = len(forwards)
            Hk = H()
            assert len(forwards) == ran  # built from the captured inputs: the block does not run
            seen.append(("H", current[0], held(lins)))
            return Hk

        return orig_q(weight, hessian, *args, **kw)

    def factor(H, d, perm=None):
        seen.append(("factor", current[0], held(lins)))
        return orig_f(H, d, perm)

    orig_q, orig_f = G.gptq_quantize, G._inverse_cholesky_
    monkeypatch.setattr(G, "gptq_quantize", watch)
    monkeypatch.setattr(G, "_inverse_cholesky_", factor)
    twin, _, _ = tiny_block()
    res = gptq_layer(layer, hidden, rest, 4, 32, block_size=16, act_order=True)
    full = [lin.weight.numel() * 4 for lin in lins]
    unfinished = [[0] * i + full[i:] for i in range(4)]  # the last one's: [0, 0, 0, its own]
    assert seen == [(phase, i, unfinished[i]) for i in range(4) for phase in ("H", "factor")]
    # one forward per calibration batch and linear, each starting with the finished weights
    # released; each finished linear is rebuilt from its codes for its own forward only
    assert forwards == [unfinished[i] for i in range(4) for _ in hidden]
    assert in_linears == [(j, [f if k == j or k >= i else 0 for k, f in enumerate(full)])
                          for i in range(4) for _ in hidden for j in range(i)]
    assert held(lins) == full  # back afterwards
    monkeypatch.setattr(G, "gptq_quantize", orig_q)
    monkeypatch.setattr(G, "_inverse_cholesky_", orig_f)
    want = by_hand(twin, hidden, rest, 4, 32, True)
    for name, lin in zip(LINEAR_NAMES, lins):
        assert torch.equal(bits_of(lin.weight), bits_of(twin.get_submodule(name).weight))
        assert torch.equal(res[name].qweight, want[name].qweight) and torch.equal(res[name].scale, want[name].scale)


@pytest.mark.parametrize("bits,group,act", [(4, 32, True), (8, None, False)])
def test_weights_loaded_in_turn_and_left_released_hold_one_linear_at_a_time(monkeypatch, bits, group, act):
    """``load`` reads a weight when its linear's turn comes; with ``keep_released`` the block is
    left holding none, and ``materialized`` runs it with one rebuilt weight at a time: the same
    codes, scales and outputs, bit for bit, as the block built whole."""
    layer, hidden, rest = tiny_block()
    twin, _, _ = tiny_block()
    lins = [layer.get_submodule(n) for n in LINEAR_NAMES]
    full = [lin.weight.numel() * 4 for lin in lins]
    stored = {}
    for name, lin in zip(LINEAR_NAMES, lins):  # as glmctl.quantization.build_layer(unread=...) builds it
        stored[name] = lin.weight.detach().clone()
        lin.weight.data = G.released_tensor(lin.weight.shape, lin.weight.dtype)
    assert held(lins) == [0] * 4
    loads, quantized, in_linears = [], [], []

    def load(name):
        loads.append(name)
        return stored[name].clone()

    def watch(weight, H, *args, **kw):
        quantized.append(held(lins))
        return orig_q(weight, H, *args, **kw)

    orig_q = G.gptq_quantize
    monkeypatch.setattr(G, "gptq_quantize", watch)
    watch_linears(lins, in_linears)
    res = gptq_layer(layer, hidden, rest, bits, group, block_size=16, act_order=act, load=load, keep_released=True)
    assert loads == list(LINEAR_NAMES)
    one = [[f if k == j else 0 for k, f in enumerate(full)] for j in range(4)]
    assert quantized == one  # while linear j is quantized, only its own fp32 weight is held
    assert held(lins) == [0] * 4  # left released
    with torch.no_grad(), G.materialized(layer, res, bits):
        outs = [layer(x, cos, sin, mask, None) for x, (cos, sin, mask) in zip(hidden, rest)]
    assert held(lins) == [0] * 4
    assert all(seen == one[j] for j, seen in in_linears)  # captures and propagation: one linear at a time
    assert [j for j, _ in in_linears[-4 * len(hidden):]] == [0, 1, 2, 3] * len(hidden)
    monkeypatch.setattr(G, "gptq_quantize", orig_q)
    want = by_hand(twin, hidden, rest, bits, group, act)
    for name in LINEAR_NAMES:
        assert torch.equal(res[name].qweight, want[name].qweight) and torch.equal(res[name].scale, want[name].scale)
    with torch.no_grad():
        for out, x, (cos, sin, mask) in zip(outs, hidden, rest):
            assert torch.equal(bits_of(out), bits_of(twin(x, cos, sin, mask, None)))
    # released weights and no load: refused, not run on empty memory
    fresh, _, _ = tiny_block()
    lin = fresh.get_submodule(LINEAR_NAMES[1])
    lin.weight.data = G.released_tensor(lin.weight.shape, lin.weight.dtype)
    with pytest.raises(ValueError, match="no load"):
        gptq_layer(fresh, hidden, rest, bits, group, block_size=16, act_order=act)


def test_a_dampening_retry_rebuilds_the_hessian_from_the_captured_inputs(monkeypatch):
    layer, hidden, rest = tiny_block()
    twin, _, _ = tiny_block()
    orig, tries, forwards = G._inverse_cholesky_, [], []
    layer.register_forward_pre_hook(lambda _m, _a: forwards.append(1))

    def fail_first_wide(H, d, perm=None):  # the first factoring of dense_4h_to_h's Hessian fails
        tries.append(H.shape[0])
        if H.shape[0] == 128 and tries.count(128) == 1:
            return None
        return orig(H, d, perm)

    monkeypatch.setattr(G, "_inverse_cholesky_", fail_first_wide)
    res = gptq_layer(layer, hidden, rest, 4, 32, block_size=16, act_order=True)
    assert tries == [64, 64, 64, 128, 128] and res["mlp.dense_4h_to_h"].damp == pytest.approx(0.1)
    assert len(forwards) == len(LINEAR_NAMES) * len(hidden)  # no forward for the retry
    tries.clear()
    want = by_hand(twin, hidden, rest, 4, 32, True)  # the same failure, Hessians accumulated in the hook
    assert want["mlp.dense_4h_to_h"].damp == res["mlp.dense_4h_to_h"].damp
    for name in LINEAR_NAMES:
        assert torch.equal(res[name].qweight, want[name].qweight) and torch.equal(res[name].scale, want[name].scale)
        assert torch.equal(bits_of(layer.get_submodule(name).weight), bits_of(twin.get_submodule(name).weight))


def test_captured_inputs_spilled_to_disk_give_the_same_bits(tmp_path):
    layer, hidden, rest = tiny_block()
    twin, _, _ = tiny_block()
    stores = []

    def spilling():
        stores.append(ActivationStore(0, tmp_path))  # no budget: every captured input goes to a file
        return stores[-1]

    res = gptq_layer(layer, hidden, rest, 4, 32, block_size=16, act_order=True, inputs=spilling)
    assert len(stores) == len(LINEAR_NAMES) and all(st.spilled and not st.in_memory for st in stores)
    assert list(tmp_path.iterdir()) == []  # each store closed once its linear is done
    want = by_hand(twin, hidden, rest, 4, 32, True)
    for name in LINEAR_NAMES:
        assert torch.equal(res[name].qweight, want[name].qweight) and torch.equal(res[name].scale, want[name].scale)
        assert torch.equal(bits_of(layer.get_submodule(name).weight), bits_of(twin.get_submodule(name).weight))
