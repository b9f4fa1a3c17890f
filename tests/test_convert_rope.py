"""`glmctl convert --rope exact|sat` (docs/glm130b.md §2.3): the mode lands in config.json, the
network then computes that rule's angles (checked against numpy tables written from the rule),
and --verify runs source and result in the same mode."""
import json

import numpy as np
import pytest
import torch

from glmctl import cli
from glmctl.checkpoint import load_model
from glmctl.model import glm as glm_module
from test_convert import float_model, tiny, tiny_cfg, write_sat

POSITIONS = np.array([[0, 1, 2, 39, 40, 511, 1000, 1024, 1999, 2047]])


def tables(mode: str, positions: np.ndarray, d: int, base: float):
    """cos/sin [b, s, 1, d] in fp32, in numpy. exact: float64 frequencies and angles, rounded once.
    sat (SAT 0.2.x in an fp32 model): inv_freq rounded to fp16, then fp32 products and cos/sin."""
    inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if mode == "exact":
        ang = positions.astype(np.float64)[..., None] * inv
    else:
        inv = inv.astype(np.float32).astype(np.float16).astype(np.float32)
        ang = positions.astype(np.float32)[..., None] * inv
    ang = np.concatenate([ang, ang], axis=-1)[:, :, None, :]
    return torch.from_numpy(np.cos(ang).astype(np.float32)), torch.from_numpy(np.sin(ang).astype(np.float32))


def run_far(model, monkeypatch=None, mode=None):
    """Logits at positions up to 2,047; with ``mode``, the network is fed the numpy tables instead."""
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size - 64, (1, POSITIONS.shape[1]), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, POSITIONS.shape[1], POSITIONS.shape[1], dtype=torch.bool)
    with torch.no_grad(), monkeypatch.context() as mp:
        if mode:
            mp.setattr(glm_module, "rope_cos_sin", lambda p, d, b, dt, m: tables(mode, p.numpy(), d, b))
        return model(tokens, torch.from_numpy(POSITIONS), mask).float()


@pytest.mark.parametrize("flag", [None, "exact", "sat"])
def test_convert_rope_flag_sets_the_mode_and_the_angles(tmp_path, capsys, monkeypatch, flag):
    sd16 = {k: v.half() for k, v in tiny(seed=4).state_dict().items()}
    write_sat(tmp_path / "sat", sd16, 2)
    argv = ["convert", tmp_path / "sat", tmp_path / "out", "--preset", "tiny", "--verify", "--json"]
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv + (["--rope", flag] if flag else [])])
    assert e.value.code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    mode = flag or "sat"  # a SAT import defaults to SAT's rule
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope"] == mode
    # --verify ran both sides in the chosen mode: identical weights, identical code, no difference
    assert summary["verify"]["max_logit_diff"] == 0.0
    got = run_far(load_model(tmp_path / "out", dtype=torch.float32), monkeypatch)
    same = float_model(tiny_cfg(), sd16)  # the fp16 weights in fp32, fed each rule's numpy tables
    want, other = (run_far(same, monkeypatch, m) for m in (mode, {"sat": "exact", "exact": "sat"}[mode]))
    err, gap = float((got - want).abs().max()), float((want - other).abs().max())
    assert err < gap / 100  # equals its own rule, far from the other one: the flag changes the logits


def test_rope_flag_overrides_a_recorded_config_and_rejects_unknown_modes(tmp_path, capsys):
    sd = tiny(seed=5).state_dict()
    write_sat(tmp_path / "sat", sd, 1, dtype=torch.float32)
    # a: the SAT import ("sat"); b, c: from a, a glmctl checkpoint whose config records "sat"
    for src, out, flags in (("sat", "a", ["--preset", "tiny"]), ("a", "b", ["--rope", "exact"]), ("a", "c", [])):
        with pytest.raises(SystemExit) as e:
            cli.main(["convert", str(tmp_path / src), str(tmp_path / out), "--verify", *flags])
        assert e.value.code == 0, capsys.readouterr().err
    modes = [json.loads((tmp_path / o / "config.json").read_text())["rope"] for o in "abc"]
    assert modes == ["sat", "exact", "sat"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["config"]["convert"]["rope"] == "exact"  # recorded: --if-stale sees a changed mode
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(tmp_path / "a"), str(tmp_path / "d"), "--rope", "fp16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--rope 'fp16'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
