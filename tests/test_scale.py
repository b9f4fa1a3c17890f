"""GLM-130B at scale, proven on tiny models: streaming quantize equals the in-memory algorithms,
loading at another TP reads only the rank's slices (the kernel's byte counter), the layer-by-layer
quality report equals the whole-model one, and SAT's RoPE rule against an independent computation."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from glmctl.checkpoint import load_model, read_state_dict, save_model
from glmctl.config import ModelConfig, get_preset
from glmctl.gptq import gptq_model
from glmctl.kernels.reference import quantize_rtn
from glmctl.model import GLM
from glmctl.model import glm as glm_module
from glmctl.quantization import parse_variant, select_windows
from glmctl.stages import convert as convert_stage
from glmctl.stages import quantize as Q
from glmctl.tp_layout import classify, merge_tensors, shard_tensor
from test_quantize import write_tokens

LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def tiny_cfg():
    return get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny fp32 model at TP=1, 2 and 4 (convert), and random tokens."""
    root = tmp_path_factory.mktemp("scale")
    model = GLM(tiny_cfg()).init_weights(seed=7)
    save_model(model, root / "tp1")
    for tp in (2, 4):
        convert_stage.run(convert_stage.ConvertConfig(src=str(root / "tp1"), out=str(root / f"tp{tp}"), tp=tp,
                                                      verify=False))
    rng = np.random.default_rng(11)
    write_tokens(root / "tokens", [rng.integers(0, 440, 600) for _ in range(8)])
    return root, {k: v.clone() for k, v in model.state_dict().items()}


def rank_files(path, tp):
    """{rank: {name: tensor}} straight from the safetensors files (not through glmctl's reader)."""
    out = {}
    for r in range(tp):
        f = path / ("model.safetensors" if tp == 1 else f"model-tp{r:02d}-of-{tp:02d}.safetensors")
        with safe_open(str(f), framework="pt") as h:
            out[r] = {k: h.get_tensor(k) for k in h.keys()}
    return out


# ---- streaming RTN == in-memory RTN, bit for bit -------------------------------------------------
@pytest.mark.parametrize("tp_in,tp_out,group", [(2, 4, None), (4, 2, None), (2, 1, None), (4, 2, 16),
                                                (1, 4, 16), (2, 4, 16)])
def test_streaming_rtn_equals_in_memory_rtn(ckpts, tmp_path, tp_in, tp_out, group):
    root, full = ckpts
    bits = 4
    Q.run(Q.QuantizeConfig(src=str(root / f"tp{tp_in}"), out=str(tmp_path / "q"), bits=bits, group_size=group,
                           tp=tp_out, report=False))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    h, f = 64, 128
    g_out = group if group or tp_out == 1 else math.gcd(h // tp_out, f // tp_out)
    assert cfg["tensor_parallel_size"] == tp_out and cfg["quantization"]["group_size"] == g_out
    got = rank_files(tmp_path / "q", tp_out)
    for name, w in full.items():
        for r in range(tp_out):
            if name.endswith(".weight") and any(name.endswith(lin + ".weight") for lin in LINEARS):
                # in memory: GLM-130B's RTN of the fp16 matrix (TP=1) sliced; or, per row at TP>1,
                # of each rank's own slice (the scale then spans the rank's columns)
                if group or tp_out == 1:
                    q_full, s_full = quantize_rtn(w.half(), bits, group)
                    want_q = shard_tensor(name, q_full, tp_out, r)
                    want_s = shard_tensor(name + "_scale", s_full, tp_out, r)
                else:
                    local = shard_tensor(name, w, tp_out, r)
                    want_q, s = quantize_rtn(local.half(), bits, None)
                    want_s = s[:, None].repeat_interleave(local.shape[1] // g_out, dim=1)
                assert torch.equal(got[r][name], want_q), (name, r)
                assert torch.equal(got[r][name + "_scale"], want_s), (name, r)
            else:
                assert torch.equal(got[r][name], shard_tensor(name, w, tp_out, r)), (name, r)


# ---- layer-streamed GPTQ == whole-model GPTQ ------------------------------------------------------
def test_layer_streamed_gptq_equals_whole_model_gptq(ckpts, tmp_path):
    """Activations spilled to disk (a 1 KiB budget) and read back: the same algorithm's result."""
    root, full = ckpts
    c = Q.QuantizeConfig(src=str(root / "tp2"), out=str(tmp_path / "q"), bits=4, group_size=32, method="gptq",
                         calibration=str(root / "tokens"), seq_len=48, calibration_samples=6, batch_size=2, tp=1,
                         report=False, activation_memory="1KiB")
    Q.run(c)
    got = rank_files(tmp_path / "q", 1)[0]
    cfg = tiny_cfg()
    rc = Q.resolve(c, cfg)
    calib, _ = select_windows(rc, cfg, True, need_eval=False)
    model = GLM(cfg)
    model.load_state_dict({k: v.clone() for k, v in full.items()})
    res = gptq_model(model.eval(), [b[:3] for b in calib.batches(2, "cpu")], 4, 32, block_size=c.block_size,
                     damp=c.damp, act_order=c.act_order)
    for name, r in res.items():
        assert (got[name + "_scale"].float() - r.scale.float()).abs().max() <= 1e-6, name
        assert torch.equal(got[name], r.qweight), name


def test_layer_streamed_gptq_holds_one_linear_weight_at_a_time(ckpts, tmp_path, monkeypatch):
    """glmctl.quantization.GPTQ builds each block without its linears' weights, reads each when
    its turn comes, and propagates with one rebuilt at a time (docs/quantize.md, "Memory"): while
    a linear is quantized only its own fp32 weight is held, and any forward of a linear holds that
    linear's alone."""
    import glmctl.gptq as G
    import glmctl.quantization as QZ
    root, _ = ckpts
    blocks, seen = [], []
    orig_build, orig_quantize = QZ.build_layer, G.gptq_quantize

    def held():
        return [lin.weight.untyped_storage().nbytes() for lin in blocks[-1]]

    def build(*args, **kw):
        layer = orig_build(*args, **kw)
        blocks.append([layer.get_submodule(n) for n in LINEARS])
        seen.append(("built", None, held()))
        for j, lin in enumerate(blocks[-1]):  # at the end of its forward, before it is released again
            lin.register_forward_hook(lambda _m, _a, _o, j=j: seen.append(("forward", j, held())))
        return layer

    def quantize(weight, H, *args, **kw):
        j = next(j for j, lin in enumerate(blocks[-1]) if lin.weight.data_ptr() == weight.data_ptr())
        seen.append(("quantize", j, held()))
        return orig_quantize(weight, H, *args, **kw)

    monkeypatch.setattr(QZ, "build_layer", build)
    monkeypatch.setattr(G, "gptq_quantize", quantize)
    c = Q.QuantizeConfig(src=str(root / "tp2"), out=str(tmp_path / "q"), bits=4, group_size=32, method="gptq",
                         calibration=str(root / "tokens"), seq_len=48, calibration_samples=6, batch_size=2, tp=1,
                         report=False, activation_memory="1KiB")
    Q.run(c)
    cfg = tiny_cfg()
    full = [lin.weight.numel() * 4 for lin in blocks[0]]
    assert all(lin.weight.dtype == torch.float32 for lin in blocks[0])
    one = [[f if k == j else 0 for k, f in enumerate(full)] for j in range(4)]
    assert len(blocks) == cfg.num_layers
    per_layer = [("built", None, [0] * 4)] + [("quantize", j, one[j]) for j in range(4)]
    assert [s for s in seen if s[0] != "forward"] == per_layer * cfg.num_layers
    forwards = [s for s in seen if s[0] == "forward"]
    assert forwards and all(h == one[j] for _, j, h in forwards)
    # dense_4h_to_h's forward only propagates (its capture stops before it): every layer but the last, per batch
    calib, _ = select_windows(Q.resolve(c, cfg), cfg, True, need_eval=False)
    assert sum(j == 3 for _, j, _ in forwards) == (cfg.num_layers - 1) * len(list(calib.batches(2, "cpu")))


# ---- loading at another TP reads only the rank's slices -----------------------------------------
def rchar() -> int:
    """Bytes this process read through read-like syscalls (the kernel's counter)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.parametrize("tp_in,tp_out,rank", [(4, 2, 1), (2, 4, 3), (4, 1, 0)])
def test_loading_at_another_tp_reads_only_the_needed_slices(ckpts, tp_in, tp_out, rank):
    root, full = ckpts
    want = {n: shard_tensor(n, t, tp_out, rank) for n, t in full.items()}
    need = sum(t.numel() * t.element_size() for t in want.values())
    stored = sum(p.stat().st_size for p in (root / f"tp{tp_in}").glob("*.safetensors"))
    before = rchar()
    cfg, sd = read_state_dict(root / f"tp{tp_in}", tp_out, rank)
    read = rchar() - before
    assert cfg.tensor_parallel_size == tp_out
    assert all(torch.equal(sd[n], want[n]) for n in want)
    # the tensor bytes of this rank's slices, plus the JSON headers, config and manifest (< 64 KiB)
    assert need <= read <= need + 64 * 1024, (read, need, stored)
    if tp_out > 1:
        assert read < 0.7 * stored


def test_load_model_reports_time_and_peak_memory(ckpts):
    from glmctl.checkpoint import LOAD_STATS
    root, full = ckpts
    m = load_model(root / "tp4", dtype="fp32")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in full.items())
    assert LOAD_STATS["stored_tp"] == 4 and LOAD_STATS["seconds"] > 0 and LOAD_STATS["peak_rss_bytes"] > 0
    assert LOAD_STATS["bytes_read"] == sum(v.numel() * 4 for v in full.values())


# ---- the layer-by-layer report == the whole-model report ----------------------------------------
@torch.no_grad()
def whole_model_report(parent, models, windows, batch_size):
    """The report as computed before streaming: every model whole, batch by batch."""
    n, nll_p = 0, 0.0
    acc = [{"nll": 0.0, "kl": 0.0, "agree": 0} for _ in models]
    for tokens, positions, mask, targets in windows.batches(batch_size, "cpu"):
        lp = torch.log_softmax(parent(tokens, positions, mask)[:, windows.target_positions].float(), dim=-1)
        nll_p += -lp.gather(-1, targets[..., None]).sum().item()
        for a, m in zip(acc, models):
            lq = torch.log_softmax(m(tokens, positions, mask)[:, windows.target_positions].float(), dim=-1)
            a["nll"] += -lq.gather(-1, targets[..., None]).sum().item()
            a["kl"] += (lp.exp() * (lp - lq)).sum().item()
            a["agree"] += (lq.argmax(-1) == lp.argmax(-1)).sum().item()
        n += targets.numel()
    ppl_p = math.exp(nll_p / n)
    return ppl_p, [{"ppl": math.exp(a["nll"] / n), "kl_mean": a["kl"] / n, "top1_agreement": a["agree"] / n}
                   for a in acc]


@pytest.mark.slow
def test_layerwise_report_equals_the_whole_model_report(ckpts, tmp_path):
    root, full = ckpts
    c = Q.QuantizeConfig(src=str(root / "tp1"), out=str(tmp_path / "q"), bits=4, group_size=32, method="gptq",
                         calibration=str(root / "tokens"), seq_len=48, calibration_samples=4, eval_samples=5,
                         batch_size=2, compare=("rtn:row", "int8"), activation_memory="4KiB")
    rep = Q.run(c).report
    cfg = tiny_cfg()
    rc = Q.resolve(c, cfg)
    _, evals = select_windows(rc, cfg, True)
    parent = load_model(root / "tp1")
    models = [load_model(tmp_path / "q")]
    for spec in ("rtn:row", "int8"):  # the compared variants, quantized in memory from the parent
        v = parse_variant(spec, 4)
        sd = dict(full)
        for k in [k for k in full if any(k.endswith(lin + ".weight") for lin in LINEARS)]:
            sd[k], sd[k + "_scale"] = quantize_rtn(full[k].half(), v.bits, v.group_size)
        models.append(GLM(cfg.replace(quantization=v.block())).eval())
        models[-1].load_state_dict(sd, assign=True)
    ppl_p, rows = whole_model_report(parent, models, evals, 2)
    assert rep["parent"]["ppl"] == ppl_p
    for got, want in zip([rep["quantized"]] + rep["compare"], rows):
        assert got["ppl"] == want["ppl"] and got["kl_mean"] == want["kl_mean"]
        assert got["top1_agreement"] == want["top1_agreement"]


def test_no_report_is_recorded_in_the_manifest(ckpts, tmp_path):
    root, _ = ckpts
    res = Q.run(Q.QuantizeConfig(src=str(root / "tp2"), out=str(tmp_path / "q"), bits=8,
                                 calibration=str(root / "tokens"), report=False))
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert m["summary"]["quantize"]["report"] == "skipped (--no-report)" and "parent" not in res.report
    assert m["config"]["quantize"]["report"] is False


# ---- RoPE: SAT 0.2.x's rule -----------------------------------------------------------------------
def sat_tables(positions: np.ndarray, d: int, base: float, dtype):
    """SAT's RotaryEmbedding, independently in numpy: inv_freq rounded to fp16 at build time, then
    cast to the model dtype; t * inv_freq and cos/sin in that dtype (IEEE rounding per op)."""
    npd = np.float16 if dtype == torch.float16 else np.float32
    inv = (1.0 / (base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
    inv = inv.astype(np.float16).astype(npd)
    ang = positions.astype(npd)[..., None] * inv
    ang = np.concatenate([ang, ang], axis=-1)[:, :, None, :]
    cos = np.cos(ang.astype(np.float32)).astype(npd)
    sin = np.sin(ang.astype(np.float32)).astype(npd)
    return torch.from_numpy(cos), torch.from_numpy(sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sat_rope_equals_an_independent_computation(dtype, monkeypatch):
    pos = np.array([[0, 1, 2, 39, 40, 511, 1000, 1024, 1999, 2047, 2048]])
    cos, sin = glm_module.rope_cos_sin(torch.from_numpy(pos), 16, 10000.0, dtype, mode="sat")
    want_cos, want_sin = sat_tables(pos, 16, 10000.0, dtype)
    # numpy's fp16 cos goes through fp32 and rounds once; torch's may differ in the last fp32 ulp
    tol = 0 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=tol)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=tol)
    # the network, with rope="sat" in its config, equals the same network fed the reference tables
    cfg = tiny_cfg().replace(rope="sat")
    model = GLM(cfg).init_weights(seed=1).to(dtype).eval()
    tokens = torch.randint(0, 500, (1, pos.shape[1]))
    mask = torch.zeros(1, 1, pos.shape[1], pos.shape[1], dtype=torch.bool)
    with torch.no_grad():
        got = model(tokens, torch.from_numpy(pos), mask)
        monkeypatch.setattr(glm_module, "rope_cos_sin", lambda p, d, b, dt, mode: sat_tables(p.numpy(), d, b, dt))
        want = model(tokens, torch.from_numpy(pos), mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0 if dtype == torch.float16 else 1e-5)
    exact = GLM(cfg.replace(rope="exact")).init_weights(seed=1).to(dtype).eval()
    with torch.no_grad():
        monkeypatch.undo()
        assert not torch.equal(exact(tokens, torch.from_numpy(pos), mask), got)


def test_old_rope_fp16_configs_still_load():
    d = tiny_cfg().to_dict()
    d.pop("rope")
    assert ModelConfig.from_dict({**d, "rope_fp16": True}).rope == "sat"
    assert ModelConfig.from_dict({**d, "rope_fp16": False}).rope == "exact"


def test_sat_import_defaults_to_sat_rope(tmp_path):
    from test_convert import read_sat, tiny, write_sat  # noqa: F401 - the SAT writer of the convert tests
    m = tiny(seed=2)
    write_sat(tmp_path / "sat", m.state_dict(), 2)
    convert_stage.run(convert_stage.ConvertConfig(src=str(tmp_path / "sat"), out=str(tmp_path / "out"),
                                                  num_attention_heads=4, verify=True))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope"] == "sat"
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["summary"]["verify"]["max_logit_diff"] <= m["summary"]["verify"]["tolerance"]


def test_tp_layout_classify_is_used_for_every_tensor():
    # guard for the reader: every tensor of the model has a split rule merge/shard agree on
    cfg = tiny_cfg()
    sd = GLM(cfg).init_weights(seed=0).state_dict()
    for n, t in sd.items():
        assert torch.equal(merge_tensors(n, [shard_tensor(n, t, 4, r) for r in range(4)]), t), classify(n)
