"""The README cannot drift from the code: every glmctl command line it shows names a real
command, and every option it uses is in that command's --help. (tests/test_pipeline.py runs
the stage-by-stage sequence itself on a small corpus.)"""
import re
import shlex
from functools import lru_cache

from conftest import REPO, run_glmctl


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)  # every block, so fences stay paired
    cmds = []
    for lang, block in blocks:
        if lang not in ("", "bash", "cron"):
            continue
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#")[0] if not line.lstrip().startswith("0 3") else line
            m = re.search(r"(?:^|\s|/)glmctl\s+(.*)", line)
            if m and not line.lstrip().startswith(("make", "pip")):
                cmds.append(m.group(1).split(">>")[0].strip())
    return cmds


@lru_cache(maxsize=None)
def help_text(*words):
    r = run_glmctl(*words, "--help")
    assert r.returncode == 0, f"glmctl {' '.join(words)} --help failed: {r.stderr}"
    return r.stdout


def test_readme_commands_exist_with_their_options():
    cmds = readme_commands()
    assert len(cmds) >= 15
    top = help_text()
    for cmd in cmds:
        words = shlex.split(cmd)
        name = [words[0]]
        if words[0] == "tokenizer":
            name.append(words[1])
        assert re.search(rf"^\s+{words[0]}\s", top, flags=re.M), f"README uses unknown command: glmctl {cmd}"
        h = help_text(*name)
        for w in words:
            if w.startswith("--"):
                opt = w.split("=")[0]
                assert re.search(rf"{re.escape(opt)}\b", h), f"README: glmctl {' '.join(name)} has no option {opt}"
