"""Artifact directories: atomic build, manifest last, staleness, locks."""
import json
import subprocess
import sys

import pytest

from glmctl.artifacts import ArtifactWriter, file_lock, is_up_to_date, read_manifest, sha256_file
from glmctl.errors import InputError, LockHeld


def test_writer_builds_atomically_and_records_outputs(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    out = tmp_path / "art"
    with ArtifactWriter(out, stage="demo", config={"a": 1}, inputs=[src], argv=["x"]) as w:
        (w.path / "data.bin").write_bytes(b"abc")
        assert not out.exists()  # nothing visible until complete
    m = read_manifest(out, "demo")
    assert m["outputs"] == [{"path": "data.bin", "size": 3, "sha256": sha256_file(out / "data.bin")}]
    assert m["inputs"][0]["sha256"] == sha256_file(src)
    assert is_up_to_date(out, "demo", {"a": 1}, [src])
    assert not is_up_to_date(out, "demo", {"a": 2}, [src])
    src.write_text("changed")
    assert not is_up_to_date(out, "demo", {"a": 1}, [src])


def test_failure_keeps_previous_artifact(tmp_path):
    out = tmp_path / "art"
    with ArtifactWriter(out, stage="demo", config={}) as w:
        (w.path / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, stage="demo", config={}) as w:
            (w.path / "v").write_text("2")
            raise RuntimeError("boom")
    assert (out / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary left behind


def test_incomplete_artifact_is_rejected(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="incomplete"):
        read_manifest(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(InputError, match="not complete"):
        read_manifest(tmp_path / "x")


def test_lock_is_exclusive_across_processes(tmp_path):
    lock = tmp_path / "l.lock"
    code = ("import sys,time; from glmctl.artifacts import file_lock\n"
            "with file_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld):
            with file_lock(lock, timeout=0):
                pass
    finally:
        p.kill()
        p.wait()
    with file_lock(lock, timeout=5):  # released when the holder dies
        pass
