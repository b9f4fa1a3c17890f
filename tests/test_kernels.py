"""glmctl.kernels: INT4 packing, RTN quantization, the compiled CPU/CUDA kernels vs the torch
reference, dispatch and its fallback, and the `glmctl kernels` command."""
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import glmctl.kernels as K
from conftest import run_glmctl


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cpu_ext_loaded() -> bool:
    return K._load("cpu")["ok"]


needs_cpu_ext = pytest.mark.skipif(not cpu_ext_loaded(), reason="CPU extension not built (see test_cpu_extension_built)")


# ---- format: packing and quantization (hand-computed values) ------------------------------------
def test_pack_int4_nibble_order_and_bytes():
    q = torch.tensor([[1, -2, 7, -8], [-1, 0, 0, -1]], dtype=torch.int8)
    packed = K.pack_int4(q)
    # even column in the high nibble: (1<<4)|0xE = 0x1E, (7<<4)|0x8 = 0x78, 0xF0, 0x0F
    expect = torch.tensor([[0x1E, 0x78], [0xF0, 0x0F]], dtype=torch.uint8).view(torch.int8)
    assert packed.dtype == torch.int8 and torch.equal(packed, expect)
    assert torch.equal(K.unpack_int4(packed), q)


def test_pack_unpack_round_trip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)          # every nibble value, both positions
    q = torch.cat([q, q.flip(-1)], dim=0)
    assert torch.equal(K.unpack_int4(K.pack_int4(q)), q)
    every_byte = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).reshape(4, 64)
    assert torch.equal(K.pack_int4(K.unpack_int4(every_byte)), every_byte)
    with pytest.raises(ValueError):
        K.pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_quantize_rtn_int4_absmax_over_7_half_to_even():
    # absmax 1.75 -> s = 1.75 / 7 = 0.25 exactly; quotients 2.5, 3.5, -1.5, 0.5, -0.5 round to even
    w = torch.tensor([[1.75, 0.625, 0.875, -0.375, 0.125, -0.125, 0.0, -1.75]])
    q, s = K.quantize_rtn(w, 4)
    assert s.dtype == torch.float16 and s.tolist() == [0.25]
    assert K.unpack_int4(q).tolist() == [[7, 2, 4, -2, 0, 0, 0, -7]]


def test_quantize_rtn_int8_absmax_over_127_half_to_even():
    # absmax 63.5 -> s = 0.5; quotients 0.5, 1.5, -2.5, 4.5, 127 -> 0, 2, -2, 4, 127
    w = torch.tensor([[63.5, 0.25, 0.75, -1.25, 2.25, -3.0]])
    q, s = K.quantize_rtn(w, 8)
    assert s.tolist() == [0.5]
    assert q.dtype == torch.int8 and q.tolist() == [[127, 0, 2, -2, 4, -6]]


def test_quantize_rtn_group_scales():
    w = torch.tensor([[0.7, -0.35, 0.0, 0.14, 7.0, 1.0, -3.0, 0.5],
                      [0.0, 0.0, 0.0, 0.0, -1.4, 0.2, 0.3, 0.1]])
    q, s = K.quantize_rtn(w, 4, group_size=4)
    expect_s = torch.tensor([[0.7 / 7, 7.0 / 7], [0.0, 1.4 / 7]]).half()
    assert s.shape == (2, 2) and torch.equal(s, expect_s)
    # q = round_half_even(fp16(w) / fp16(s)); zero groups stay zero
    expect_q = [[7, -4, 0, 1, 7, 1, -3, 0], [0, 0, 0, 0, -7, 1, 2, 0]]
    assert K.unpack_int4(q).tolist() == expect_q
    with pytest.raises(ValueError):
        K.quantize_rtn(w, 4, group_size=3)
    with pytest.raises(ValueError):
        K.quantize_rtn(w, 3)


def test_dequantize_matches_definition():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    s = torch.tensor([[0.5, 2.0]], dtype=torch.float16)  # group size 2
    w = K.dequantize(K.pack_int4(q), s, 4)
    assert w.tolist() == [[0.5, -1.0, 14.0, -16.0]]


# ---- the CPU kernel ----------------------------------------------------------------------------
def _case(n, k, bits, group, seed=0, scale_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, s = K.quantize_rtn(w, bits, group, scale_dtype=scale_dtype)
    b = torch.randn(n, generator=g)
    return q, s, b


def test_cpu_extension_built():
    """Where a C++ compiler exists the install must have built the CPU kernel."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler")
    st = K.status()
    assert st["cpu"]["implementation"] == "extension", st["cpu"]


@needs_cpu_ext
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_cpu_kernel_matches_reference_fp32(bits, group):
    n, k = 37, 384  # n not a multiple of the 4-row block, k not of the 512-column chunk
    q, s, b = _case(n, k, bits, group)
    g = torch.Generator().manual_seed(1)
    for m in range(1, 34):
        x = torch.randn(m, k, generator=g)
        for bias in (None, b):
            y = K.quant_linear(x, q, s, bias, bits)
            ref = K.quant_linear_ref(x, q, s, bias, bits)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert rel_err(y, ref) <= 1e-5, (m, bias is None)


@needs_cpu_ext
@pytest.mark.parametrize("bits,k", [(4, 2), (4, 18), (4, 202), (4, 1030), (8, 1), (8, 7), (8, 201), (8, 1031)])
def test_cpu_kernel_ragged_k_per_row(bits, k):
    n = 29
    q, s, b = _case(n, k, bits, None, seed=k)
    g = torch.Generator().manual_seed(2)
    for m in (1, 2, 3, 4, 5, 8, 9, 16, 33):
        x = torch.randn(m, k, generator=g)
        assert rel_err(K.quant_linear(x, q, s, b, bits), K.quant_linear_ref(x, q, s, b, bits)) <= 1e-5


@needs_cpu_ext
@pytest.mark.parametrize("bits,k,group", [(4, 48, 24), (4, 12, 2), (8, 30, 10), (8, 63, 9), (4, 96, 48)])
def test_cpu_kernel_odd_group_sizes(bits, k, group):
    q, s, b = _case(19, k, bits, group, seed=3)
    for m in (1, 3, 6, 20):
        x = torch.randn(m, k)
        assert rel_err(K.quant_linear(x, q, s, b, bits), K.quant_linear_ref(x, q, s, b, bits)) <= 1e-5


@needs_cpu_ext
@pytest.mark.parametrize("xdtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("bits,group", [(4, None), (4, 128), (8, None), (8, 64)])
def test_cpu_kernel_low_precision_activations(xdtype, tol, bits, group):
    n, k = 45, 640 if group != 128 else 768
    q, s, b = _case(n, k, bits, group, scale_dtype=torch.bfloat16 if xdtype == torch.bfloat16 else torch.float16)
    for m in (1, 2, 4, 7, 17, 33):
        x = torch.randn(3, m, k).to(xdtype)   # leading batch dims are kept
        for bias in (None, b.to(xdtype)):
            y = K.quant_linear(x, q, s, bias, bits)
            assert y.dtype == xdtype and y.shape == (3, m, n)
            ref = K.quant_linear_ref(x.reshape(-1, k).float(), q, s, bias, bits).reshape(3, m, n)
            assert rel_err(y, ref) <= tol


@needs_cpu_ext
@pytest.mark.parametrize("path", [1, 2])
def test_cpu_kernel_both_paths_and_scalar_isa(path):
    """The fused kernel (path 1), the dequantize + BLAS panels (path 2), and the non-AVX2 code."""
    prev = torch.ops.glmctl.cpu_force_scalar(False)
    try:
        for scalar in (False, True):
            torch.ops.glmctl.cpu_force_scalar(scalar)
            for bits, group, k in ((4, None, 202), (4, 64, 256), (8, None, 99), (8, 32, 96)):
                q, s, b = _case(23, k, bits, group, seed=bits + k)
                for m in (1, 2, 4, 5, 64, 70):
                    x = torch.randn(m, k)
                    y = torch.ops.glmctl.quant_linear(x, q, s, b, bits, path)
                    assert rel_err(y, K.quant_linear_ref(x, q, s, b, bits)) <= 1e-5, (scalar, bits, group, m)
    finally:
        torch.ops.glmctl.cpu_force_scalar(prev)
    assert torch.ops.glmctl.cpu_isa() in ("avx2+fma+avx512vl", "avx2+fma", "scalar")


@needs_cpu_ext
def test_cpu_kernel_scale_dtypes_threads_and_errors():
    q, s, b = _case(33, 256, 4, 64)
    x = torch.randn(5, 256)
    ref = K.quant_linear_ref(x, q, s, b, 4)
    for sd in (torch.float32, torch.bfloat16):
        s2 = s.to(sd)
        assert rel_err(K.quant_linear(x, q, s2, b, 4), K.quant_linear_ref(x, q, s2, b, 4)) <= 1e-5
    n_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert rel_err(K.quant_linear(x, q, s, b, 4), ref) <= 1e-5
    finally:
        torch.set_num_threads(n_threads)
    with pytest.raises(RuntimeError, match="input features"):
        K.quant_linear(torch.randn(2, 100), q, s, b, 4)
    with pytest.raises(RuntimeError, match="bits"):
        torch.ops.glmctl.quant_linear(x, q, s, b, 5, 0)
    assert K.quant_linear(torch.randn(0, 256), q, s, b, 4).shape == (0, 33)
    # unsupported activation dtype: served by the reference, same answer
    y64 = K.quant_linear(x.double(), q, s, b, 4)
    assert y64.dtype == torch.float64 and rel_err(y64, ref) <= 1e-6


@needs_cpu_ext
def test_cpu_op_works_under_torch_compile():
    q, s, b = _case(16, 64, 4, 32)
    f = torch.compile(lambda x: K.quant_linear(x, q, s, b, 4) * 2, backend="eager", fullgraph=True)
    x = torch.randn(3, 64)
    assert rel_err(f(x), 2 * K.quant_linear_ref(x, q, s, b, 4)) <= 1e-5


# ---- dispatch, fallback, status, CLI ---------------------------------------------------------------
def test_fallback_to_reference_warns_once(monkeypatch):
    def broken(name):
        raise ImportError(f"simulated: cannot load {name}")

    monkeypatch.setattr(K, "_import_extension", broken)
    monkeypatch.setattr(K, "_loaded", {})
    monkeypatch.setattr(K, "_warned", False)
    monkeypatch.delenv("GLMCTL_KERNELS", raising=False)
    q, s, b = _case(12, 64, 4, None)
    x = torch.randn(2, 64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = K.quant_linear(x, q, s, b, 4)
        y2 = K.quant_linear(x[:1], q, s, None, 4)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "simulated" in msgs[0] and "reference" in msgs[0]
    assert torch.equal(y1, K.quant_linear_ref(x, q, s, b, 4))
    assert torch.equal(y2, K.quant_linear_ref(x[:1], q, s, None, 4))
    st = K.status()
    assert st["cpu"]["implementation"] == "reference" and "simulated" in st["cpu"]["reason"]


def test_reference_forced_by_environment(monkeypatch):
    monkeypatch.setenv("GLMCTL_KERNELS", "reference")
    monkeypatch.setattr(K, "_loaded", {})
    monkeypatch.setattr(K, "_warned", False)
    q, s, b = _case(8, 32, 8, None)
    x = torch.randn(3, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice is not worth a warning
        assert torch.equal(K.quant_linear(x, q, s, b, 8), K.quant_linear_ref(x, q, s, b, 8))
    assert K.status()["cpu"]["implementation"] == "reference"


def test_status_and_cli():
    st = K.status()
    assert set(st) >= {"torch", "cpu", "cuda"}
    for dev in ("cpu", "cuda"):
        assert st[dev]["implementation"] in ("extension", "reference", "unavailable")
        assert st[dev].get("reason")
    r = run_glmctl("kernels", "--json")
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    assert js["cpu"]["implementation"] == st["cpu"]["implementation"]
    from typer.testing import CliRunner
    from glmctl.cli import app
    res = CliRunner().invoke(app, ["kernels"])
    assert res.exit_code == 0, res.output
    assert "cpu" in res.output and "cuda" in res.output and st["cpu"]["implementation"] in res.output


def test_import_is_cheap():
    import subprocess
    import sys
    code = ("import sys, glmctl.kernels; "
            "bad = [m for m in ('zstandard', 'deepspeed', 'glmctl.kernels._cpu', 'glmctl.kernels._cuda') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- CUDA ----------------------------------------------------------------------------------------
def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    p = Path(home) / "bin" / "nvcc"
    return str(p) if p.exists() else shutil.which("nvcc")


def test_cuda_extension_built():
    """With a CUDA build of torch and nvcc present, a CUDA compile error must fail the tests."""
    if not torch.version.cuda or not _nvcc() or os.environ.get("GLMCTL_NO_CUDA") == "1":
        pytest.skip("torch without CUDA or no nvcc")
    info = K._load("cuda")
    assert info["ok"], info["error"]
    archs = K._cuda_archs()
    assert archs and all(a >= 75 for a in archs), archs
    if torch.cuda.is_available():
        assert K._arch_supported(torch.cuda.get_device_capability(), archs)


def test_cuda_arch_flags_from_arch_list(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", ""))  # build.py may default it; undo after
    from glmctl.kernels.build import cuda_arch_flags
    flags, cubins = cuda_arch_flags("8.0;8.6;8.9;9.0")
    assert cubins == [80, 86, 89, 90]
    assert flags == ["-gencode=arch=compute_80,code=[sm_80,sm_86,sm_89]", "-gencode=arch=compute_90,code=[sm_90]"]
    flags, cubins = cuda_arch_flags("8.9 9.0+PTX")
    assert cubins == [89, 90] and flags[-1] == "-gencode=arch=compute_90,code=[sm_90,compute_90]"
    assert cuda_arch_flags("9.0a")[0] == ["-gencode=arch=compute_90a,code=[sm_90a]"]


def test_arch_compatibility_rule():
    assert K._arch_supported((8, 6), [80, 90]) and K._arch_supported((9, 0), [80, 90])
    assert not K._arch_supported((8, 0), [86, 90]) and not K._arch_supported((10, 0), [80, 90])


def _poison_cuda_allocator(nbytes: int = 64 << 20):
    """Fill freed caching-allocator blocks with NaN so an output that is not fully written shows."""
    t = torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    del t
    for sz in (1 << 16, 1 << 20, 1 << 22):
        u = torch.empty(sz // 2, device="cuda", dtype=torch.float16).fill_(float("nan"))
        del u


GPU_MS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 256, 257]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, None), (4, 32), (4, 64), (4, 128), (8, None), (8, 32), (8, 64),
                                        (8, 128)])
def test_cuda_kernels_match_reference(dtype, bits, group):
    assert K._load("cuda")["ok"]
    # n not a multiple of the 16-row tile; k not a multiple of the 64-byte k-tile
    n, k = 203, (416 if bits == 4 else 224) if group in (None, 32) else (640 if group == 128 else 448)
    q, s, b = _case(n, k, bits, group, scale_dtype=torch.float16 if dtype == torch.float16 else torch.bfloat16)
    q, s, b = q.cuda(), s.cuda(), b.cuda().to(dtype)
    g = torch.Generator().manual_seed(5)
    for m in GPU_MS:
        x = torch.randn(m, k, generator=g).to(dtype).cuda()
        for bias in (None, b):
            ref32 = K.quant_linear_ref(x.float(), q, s, bias, bits)
            floor = rel_err(ref32.to(dtype), ref32)  # error of the correctly rounded answer
            for path in (0, 1, 2, 3):
                _poison_cuda_allocator()
                y = torch.ops.glmctl.quant_linear(x, q, s, bias, bits, path)
                torch.cuda.synchronize()
                assert y.dtype == dtype and y.shape == (m, n)
                assert not y.isnan().any(), (m, path)
                err = rel_err(y, ref32)
                assert err <= 1e-3 + floor, (m, path, err, floor)


@pytest.mark.gpu
def test_cuda_kernel_exact_scales_and_batch_independence():
    """The tensor-core path applies scales in fp32: bf16 results equal the correctly rounded
    reference almost everywhere, and a row's result does not depend on the other rows."""
    n, k = 512, 1024
    for bits, group in ((4, None), (4, 128), (8, 64)):
        q, s, b = _case(n, k, bits, group, scale_dtype=torch.bfloat16)
        q, s = q.cuda(), s.cuda()
        x = torch.randn(40, k).to(torch.bfloat16).cuda()
        y = torch.ops.glmctl.quant_linear(x, q, s, None, bits, 1)
        ref = K.quant_linear_ref(x.float(), q, s, None, bits).to(torch.bfloat16)
        assert (y != ref).float().mean().item() < 0.01
        for i in (0, 7, 39):
            yi = torch.ops.glmctl.quant_linear(x[i:i + 1], q, s, None, bits, 1)
            assert torch.equal(yi[0], y[i])


@pytest.mark.gpu
def test_cuda_unaligned_and_odd_shapes_fall_back_correctly():
    for bits, k, group in ((4, 200, None), (4, 96, 48), (8, 100, None), (8, 72, 24), (4, 4096, 16)):
        q, s, b = _case(77, k, bits, group)
        q, s, b = q.cuda(), s.cuda(), b.cuda()
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for m in (1, 5, 40, 80):
                x = torch.randn(m, k).to(dtype).cuda()
                ref32 = K.quant_linear_ref(x.float(), q, s, b, bits)
                floor = rel_err(ref32.to(dtype), ref32)
                assert rel_err(K.quant_linear(x, q, s, b, bits), ref32) <= 1e-3 + floor
    # a misaligned view of x (offset by one element) must still be right
    q, s, b = _case(64, 256, 4, None)
    q, s = q.cuda(), s.cuda()
    xb = torch.randn(3 * 256 + 1).half().cuda()
    x = xb[1:].view(3, 256)
    assert rel_err(K.quant_linear(x, q, s, None, 4), K.quant_linear_ref(x.float(), q, s, None, 4)) <= 1.5e-3


@pytest.mark.gpu
def test_cuda_graph_capture_and_compile():
    q, s, b = _case(256, 512, 4, 128)
    q, s, b = q.cuda(), s.cuda(), b.cuda().half()
    x = torch.randn(4, 512).half().cuda()
    ref = K.quant_linear(x, q, s, b, 4).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        K.quant_linear(x, q, s, b, 4)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.quant_linear(x, q, s, b, 4)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, K.quant_linear_ref(x.float(), q, s, b, 4)) <= 1.5e-3
    f = torch.compile(lambda t: K.quant_linear(t, q, s, b, 4) + 1, fullgraph=True)
    assert rel_err(f(x), K.quant_linear(x, q, s, b, 4) + 1) <= 1e-3
    del ref
