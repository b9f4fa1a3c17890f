"""`glmctl serve` end to end: live servers on 127.0.0.1 with tiny checkpoints made here, the
official `openai` client and httpx as clients, results checked against `glmctl generate` (the
stage in process, and the CLI's --json), bad input, limits, disconnects, metrics, SIGTERM, and
TP=2 under torchrun equal to TP=1."""
import concurrent.futures as cf
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import free_port, run_glmctl
from test_generate import make_tokenizer, varied

from glmctl.checkpoint import save_model
from glmctl.config import get_preset
from glmctl.generation import GenerationConfig
from glmctl.model import GLM
from glmctl.stages import generate as generate_stage

GLMCTL = Path(sys.executable).parent / "glmctl"
PROMPTS = ["The quick brown", "Tsinghua [MASK] is in [MASK], China.", "清华大学", "A [sMASK] model.",
           "Hello [MASK] this is a test.", "天气很好，[MASK]。", "Tsinghua University is in Beijing, China. The quick",
           "A language model fills"]


# ---- fixtures: checkpoints and servers -------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = make_tokenizer(root / "tok")
    cfg = get_preset("tiny").replace(**tok.config_overrides(), hidden_dropout=0.0, attention_dropout=0.0)
    save_model(varied(GLM(cfg).init_weights(3)), root / "tiny", tokenizer=root / "tok")
    # a long window, so that one request can run for thousands of steps (queue, disconnect, timeout)
    save_model(varied(GLM(cfg.replace(max_sequence_length=4096)).init_weights(3)), root / "long", tokenizer=root / "tok")
    return root


class Server:
    def __init__(self, cmd: list[str], port: int, env=None, stderr_path=None, ready=True):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        self.err = open(stderr_path, "w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, env=e, text=True)
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.stderr()}"
            try:  # ready=False: wait until it answers at all (a loading server answers 503)
                if httpx.get(self.url + "/health", timeout=2).status_code in ((200,) if ready else (200, 503)):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready: " + self.stderr()
            time.sleep(0.2)

    def stderr(self) -> str:
        if not self.err.closed:
            self.err.flush()
        return Path(self.err.name).read_text()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metrics(self) -> dict:
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def stop_rank0(self, timeout=60) -> int:
        """Under torchrun: SIGTERM to rank 0's process, which drains and then stops the others."""
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in children:
            if "RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0"):
                os.kill(int(pid), signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.err.close()

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout=60) -> int:
        """The exit code of a server that stops by itself (no signal sent: one arriving while the
        interpreter shuts down, its handlers gone, would end it with -SIGTERM)."""
        try:
            return self.proc.wait(timeout)
        finally:
            self.err.close()


def start(model: Path, *args, tmp: Path, env=None, launcher=None, ready=True) -> Server:
    port = free_port()
    cmd = (launcher or [str(GLMCTL)]) + ["serve", str(model), "--port", str(port), "--model-name", "tiny"]
    return Server(cmd + [str(a) for a in args], port, env, tmp / f"serve-{port}.log", ready)


@pytest.fixture(scope="module")
def server(models):
    s = start(models / "tiny", tmp=models)
    yield s
    s.stop()


def expected(models, prompt: str, gen: GenerationConfig) -> dict:
    """`glmctl generate`'s record for one prompt (the stage, in this process)."""
    cfg = generate_stage.GenerateConfig(model=str(models / "tiny"), prompts=(prompt,), json=False, interactive=False,
                                        format="jsonl", generation=gen)
    res = generate_stage.run(cfg, stdin=io.StringIO(""), stdout=io.StringIO())
    return res.records[0]


def completion_text(prompt: str, rec: dict) -> str:
    """What /v1/completions returns: the continuation for a prompt without a mask, else the completed text."""
    if re.search(r"\[(MASK|sMASK|gMASK)\]", prompt):
        return rec["text"]
    assert rec["text"].startswith(prompt)
    return rec["text"][len(prompt):]


# ---- completions -------------------------------------------------------------------------------
def test_completion_equals_generate(server, models):
    client = server.client()
    for prompt, kw, gen in [
        ("The quick brown", {}, GenerationConfig(max_new_tokens=6)),
        ("Tsinghua [MASK] is in [MASK], China.", {}, GenerationConfig(max_new_tokens=5)),
        ("Hello [MASK] this is a test.", {"extra_body": {"strategy": "beam", "num_beams": 3}},
         GenerationConfig(max_new_tokens=5, strategy="beam", num_beams=3)),
    ]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=gen.max_new_tokens, temperature=0, **kw)
        rec = expected(models, prompt, gen)
        assert r.choices[0].text == completion_text(prompt, rec)
        assert r.object == "text_completion" and r.model == "tiny"
        assert r.usage.completion_tokens == rec["new_tokens"]
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        stops = {b["stop"] for b in rec["blanks"]}
        assert r.choices[0].finish_reason == ("length" if rec["blanks"][-1]["stop"] == "length" else "stop"), stops
    # the prompt's token count: the encoded text (masks count as one token each)
    r = client.completions.create(model="tiny", prompt="[MASK]", max_tokens=1)
    assert r.usage.prompt_tokens == 1


def test_stream_equals_non_stream(server):
    client = server.client()
    for prompt in ["The quick brown", "Tsinghua [MASK] is in [MASK], China.", "天气很好，[MASK]。"]:
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=8)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
        assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it did arrive in pieces
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [whole.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # raw SSE: OpenAI's framing, ending with [DONE]
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": "tiny", "prompt": "The quick", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [x for x in r.iter_text() for x in x.split("\n\n") if x.strip()]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_fill_two_blanks_equals_generate_json(server, models):
    prompt = "Tsinghua [MASK] is in [MASK], China."
    r = httpx.post(server.url + "/v1/fill", json={"prompt": [prompt, "清华大学"], "max_tokens": 5}, timeout=60)
    assert r.status_code == 200, r.text
    cli = run_glmctl("generate", models / "tiny", prompt, "清华大学", "-n", "5", "--json")
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)["results"]
    got = r.json()["results"]
    for g, w in zip(got, want):
        assert {k: g[k] for k in ("prompt", "text", "mask", "blanks", "new_tokens")} == \
               {k: w[k] for k in ("prompt", "text", "mask", "blanks", "new_tokens")}
    assert len(got[0]["blanks"]) == 2
    for b in got[0]["blanks"]:
        assert got[0]["text"][b["start"]:b["end"]] == b["text"]
    assert r.json()["usage"]["completion_tokens"] == sum(w["new_tokens"] for w in want)


def test_concurrent_clients_equal_sequential(server):
    client = server.client()
    jobs = [(p, 4 + (i % 3) * 3) for i, p in enumerate(PROMPTS)]  # mixed prompt and output lengths

    def one(job):
        prompt, n = job
        return server.client().completions.create(model="tiny", prompt=prompt, max_tokens=n).choices[0].text

    sequential = [client.completions.create(model="tiny", prompt=p, max_tokens=n).choices[0].text for p, n in jobs]
    with cf.ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, jobs))
    assert concurrent == sequential
    # a list prompt with n choices: one choice per (prompt, n), in order
    r = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=4, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices][::2] == [c.text for c in r.choices][1::2]  # greedy: both choices agree


def test_sampling_seed_is_reproducible_and_matches_generate(server, models):
    client = server.client()
    kw = dict(model="tiny", prompt="The quick brown", max_tokens=6, temperature=0.8, top_p=0.9, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    rec = expected(models, "The quick brown", GenerationConfig(max_new_tokens=6, strategy="sample", temperature=0.8,
                                                               top_p=0.9, seed=11))
    assert a.choices[0].text == completion_text("The quick brown", rec)


def test_stop_sequence_cuts_the_text(server):
    client = server.client()
    full = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12).choices[0].text
    stop = full[3:5]
    assert stop and stop not in full[:4]
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


# ---- bad input -----------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_bad_inputs_answer_openai_errors_and_nothing_else_is_affected(server):
    url = server.url + "/v1/completions"
    ok = {"model": "tiny", "prompt": "The quick", "max_tokens": 3}
    _error(httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert _error(httpx.post(url, json={**ok, "max_tokens": "many"}), 400)["param"] == "max_tokens"
    assert _error(httpx.post(url, json={**ok, "temperature": [1]}), 400)["param"] == "temperature"
    assert _error(httpx.post(url, json={**ok, "max_tokenz": 3}), 400)["param"] == "max_tokenz"
    assert _error(httpx.post(url, json={**ok, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    assert "limit" in _error(httpx.post(url, json={**ok, "max_tokens": 100000}), 400)["message"]
    long = "The quick brown fox " * 200  # far beyond the tiny model's 256 tokens
    assert "maximum length" in _error(httpx.post(url, json={**ok, "prompt": long}), 400)["message"]
    assert "[mask]" in _error(httpx.post(url, json={**ok, "prompt": "a [mask] b"}), 400)["message"]
    _error(httpx.post(url, json={**ok, "logprobs": 2}), 400)
    chat = _error(httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []}), 404)
    assert "chat" in chat["message"] and "/v1/completions" in chat["message"]
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="other", prompt="x")
    # the server still answers normally
    r = httpx.post(url, json=ok)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_metrics_counters_add_up(server):
    before = server.metrics()
    client = server.client()
    rs = [client.completions.create(model="tiny", prompt=p, max_tokens=5) for p in PROMPTS[:4]]
    httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    after = server.metrics()

    def d(key):
        return after.get(key, 0) - before.get(key, 0)
    assert d('glmctl_serve_requests_total{endpoint="/v1/completions",status="200"}') == 4
    assert d('glmctl_serve_requests_total{endpoint="/v1/completions",status="404"}') == 1
    assert d("glmctl_serve_completion_tokens_total") == sum(r.usage.completion_tokens for r in rs)
    assert d("glmctl_serve_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in rs)
    assert d("glmctl_serve_time_to_first_token_seconds_count") == 4
    # one interval per token after the first (every blank's tokens are timed)
    assert d("glmctl_serve_time_per_output_token_seconds_count") == sum(r.usage.completion_tokens for r in rs) - 4
    assert after['glmctl_serve_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        after["glmctl_serve_time_to_first_token_seconds_count"]
    assert after["glmctl_serve_queue_depth"] == 0 and after["glmctl_serve_batch_size"] == 0


# ---- limits: queue, disconnect, timeout, key, SIGTERM ---------------------------------------------
def _wait_for(cond, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


LONG = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 4000, "min_tokens": 4000, "stream": True}


@pytest.mark.slow
def test_full_queue_429_and_disconnect_frees_the_slot(models):
    s = start(models / "long", "--max-batch-size", "1", "--max-queue", "1", "--max-new-tokens-limit", "4000",
              tmp=models)
    try:
        before = s.metrics()
        with httpx.Client(timeout=60) as a_client, httpx.Client(timeout=60) as b_client:
            a = a_client.send(a_client.build_request("POST", s.url + "/v1/completions", json=LONG), stream=True)
            a_events = a.iter_text()  # kept: dropping the iterator would close the response
            next(a_events)  # A is decoding
            b = b_client.send(b_client.build_request("POST", s.url + "/v1/completions", json=LONG), stream=True)
            _wait_for(lambda: s.metrics()["glmctl_serve_queue_depth"] == 1, "B to wait in the queue")
            c = httpx.post(s.url + "/v1/completions", json={**LONG, "stream": False})
            assert _error(c, 429)["code"] == "queue_full" and c.headers["retry-after"] == "1"
            b.close()
            a.close()  # both clients leave mid-stream
        _wait_for(lambda: s.metrics()["glmctl_serve_cancelled_total"] == 2, "both jobs to be cancelled")
        _wait_for(lambda: s.metrics()["glmctl_serve_batch_size"] == 0, "the slot to be freed")
        after = s.metrics()
        assert after["glmctl_serve_completion_tokens_total"] - before["glmctl_serve_completion_tokens_total"] < 4000
        # further requests are served normally
        r = s.client().completions.create(model="tiny", prompt="The quick brown", max_tokens=5)
        assert r.choices[0].text and r.usage.completion_tokens >= 1
    finally:
        assert s.stop() == 0


@pytest.mark.slow
def test_api_key_and_request_timeout(models, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    s = start(models / "long", "--api-key-file", key, "--request-timeout", "1", "--max-new-tokens-limit", "4000",
              tmp=models)
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client().completions.create(model="tiny", prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert _error(httpx.get(s.url + "/v1/models"), 401)["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/health").status_code == 200  # health and the page need no key
        r = s.client(api_key="s3cret").completions.create(model="tiny", prompt="The quick", max_tokens=3)
        assert r.choices[0].text
        # 4000 steps take several seconds: the request times out after 1 s and its slot is freed
        t = httpx.post(s.url + "/v1/completions", json={**LONG, "stream": False},
                       headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert _error(t, 504)["code"] == "request_timeout"
        _wait_for(lambda: s.metrics()["glmctl_serve_batch_size"] == 0, "the timed-out job to leave")
        assert s.metrics()["glmctl_serve_cancelled_total"] == 1
        # streamed: the stream has started (200), so the timeout arrives as its last event
        with httpx.stream("POST", s.url + "/v1/completions", json={**LONG, "stream": True},
                          headers={"Authorization": "Bearer s3cret"}, timeout=60) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "request_timeout" and "choices" in events[0]
        _wait_for(lambda: s.metrics()["glmctl_serve_batch_size"] == 0, "the timed-out stream to leave")
        assert s.metrics()["glmctl_serve_cancelled_total"] == 2
    finally:
        assert s.stop() == 0


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.ConnectError:
        return True
    except (httpx.ReadError, httpx.RemoteProtocolError):  # reset while the socket closes: ask again
        return False
    return False


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(models):
    s = start(models / "long", "--max-new-tokens-limit", "4000", tmp=models)
    body = {**LONG, "max_tokens": 1500, "min_tokens": 1500, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", s.url + "/v1/completions", json=body) as r:
            it = r.iter_text()
            first = next(it)
            s.proc.send_signal(signal.SIGTERM)  # mid-stream
            # while it drains, the server takes no new connection
            _wait_for(lambda: _refused(s.url + "/health"), "the listening socket to close", timeout=10)
            text = first + "".join(it)
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert text.rstrip().endswith("data: [DONE]")
    assert events[-1]["usage"]["completion_tokens"] == 1500  # the request ran to its end
    assert s.wait() == 0  # the one SIGTERM: it exits by itself once drained
    assert "serve: stopped" in s.stderr()
    with pytest.raises(httpx.TransportError):
        httpx.get(s.url + "/health")


def test_health_is_503_until_the_model_is_loaded(models, tmp_path):
    gate = tmp_path / "gate"
    script = Path(__file__).parent / "scripts" / "gated_serve_load.py"
    s = start(models / "tiny", tmp=models, launcher=[sys.executable, str(script), str(gate)], ready=False)
    try:
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "The quick", "max_tokens": 2})
        assert _error(r, 503)["code"] == "not_ready" and r.headers["retry-after"] == "1"
        assert httpx.get(s.url + "/").status_code == 200  # the page loads and polls /health
        gate.touch()
        _wait_for(lambda: httpx.get(s.url + "/health").status_code == 200, "the model to load")
        r = s.client().completions.create(model="tiny", prompt="The quick", max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        assert s.stop() == 0


def test_missing_checkpoint_is_one_line_exit_3(tmp_path):
    r = run_glmctl("serve", tmp_path / "missing", "--port", str(free_port()))
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("glmctl: error: ") and "missing" in r.stderr


# ---- tensor parallel -------------------------------------------------------------------------------
@pytest.mark.distributed
def test_tp2_under_torchrun_gives_the_tp1_text(server, models):
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "-m", "glmctl"]
    tp = start(models / "tiny", tmp=models, launcher=torchrun, env={"MASTER_ADDR": "127.0.0.1"})
    try:
        assert httpx.get(tp.url + "/v1/models").json()["data"][0]["tensor_parallel_size"] == 2

        def texts(srv):
            with cf.ThreadPoolExecutor(4) as pool:  # concurrently: batched on both
                return list(pool.map(lambda p: srv.client().completions.create(
                    model="tiny", prompt=p, max_tokens=6).choices[0].text, PROMPTS[:4]))
        assert texts(tp) == texts(server)
    finally:
        assert tp.stop_rank0() == 0
