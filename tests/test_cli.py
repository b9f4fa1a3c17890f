"""The command line: version, plan numbers, inspect, errors, option precedence."""
import json

import pytest

from conftest import run_glmctl
from glmctl.checkpoint import save_model
from glmctl.config import get_preset
from glmctl.model import GLM


def test_version_and_help_lists_stages_in_order():
    r = run_glmctl("--version")
    assert r.returncode == 0 and r.stdout.startswith("glmctl ")
    r = run_glmctl()
    assert r.returncode in (0, 2)
    assert "plan" in r.stdout and "inspect" in r.stdout


def test_plan_glm130b_matches_spec():
    r = run_glmctl("plan", "--preset", "glm-130b", "--bits", "4", "--tp", "4", "--gpu-memory", "24GiB", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["parameters"] == 128_697_794_560
    assert abs(p["weight_bytes"]["fp16"] / 1e9 - 257.4) < 0.1          # docs/glm130b.md §1: 257.4 GB
    # INT4: 126.84 B linear weights / 2 + fp16 rest + fp16 row scales ~= 67 GB
    d, f = 12288, 32768
    lin = 70 * (4 * d * d + 3 * f * d)  # 126.84 B
    rows = 70 * (3 * 12288 + 12288 + 65536 + 12288)
    assert p["weight_bytes"]["int4"] == lin // 2 + 2 * (128_697_794_560 - lin) + 2 * rows
    assert p["weight_bytes"]["int8"] == lin + 2 * (128_697_794_560 - lin) + 2 * rows
    assert p["kv_cache_bytes_per_token"] == 2 * 70 * 12288 * 2             # 3.44 MB
    assert p["fits"] is True


@pytest.mark.parametrize("bits,tp,mem,fits", [(4, 4, "24GiB", True), (4, 8, "11GiB", True), (16, 8, "40GB", True),
                                              (16, 8, "24GiB", False), (16, 4, "40GB", False), (8, 8, "24GiB", True)])
def test_plan_paper_hardware_claims(bits, tp, mem, fits):
    r = run_glmctl("plan", "--preset", "glm-130b", "--bits", bits, "--tp", tp, "--gpu-memory", mem, "--json")
    assert json.loads(r.stdout)["fits"] is fits


def test_inspect_json(tmp_path):
    save_model(GLM(get_preset("tiny")).init_weights(seed=1), tmp_path / "ck")
    r = run_glmctl("inspect", tmp_path / "ck", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["parameters"] == get_preset("tiny").num_parameters()
    shapes = {t["name"]: t["shape"] for t in info["tensors"]}
    assert shapes["transformer.layers.0.attention.query_key_value.weight"] == [192, 64]
    assert sum(eval("*".join(map(str, s))) for s in shapes.values()) == info["parameters"]


def test_unknown_preset_is_one_line_usage_error():
    r = run_glmctl("plan", "--preset", "glm-7b")
    assert r.returncode == 2
    assert "unknown preset" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_option_precedence_flag_env_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("plan:\n  preset: tiny\n  tp: 2\n")
    r = run_glmctl("--config", cfg, "plan", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensor_parallel_size"] == 2
    r = run_glmctl("--config", cfg, "plan", "--json", env={"GLMCTL_PLAN_TP": "4"})
    assert json.loads(r.stdout)["tensor_parallel_size"] == 4
    r = run_glmctl("--config", cfg, "plan", "--json", "--tp", "1", env={"GLMCTL_PLAN_TP": "4"})
    assert json.loads(r.stdout)["tensor_parallel_size"] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("plan: [1, 2\n")
    r = run_glmctl("--config", bad, "plan")
    assert r.returncode == 2 and "bad.yaml" in r.stderr
