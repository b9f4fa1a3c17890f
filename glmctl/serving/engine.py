"""The serving engine: continuous (iteration-level) batching on glmctl.generation's decoding.

    engine = Engine(session, rt, max_batch_size=8, max_queue=64, metrics=m)
    engine.start()                          # rank 0: the decode loop in a thread
    engine.submit(job, sink)                # from any thread; QueueFull when the queue is full
    engine.cancel(job.id)                   # a client left or timed out: its slot is freed
    engine.stop()                           # after the HTTP server drained
    engine.follow()                         # ranks > 0 under torchrun: follow rank 0's steps

Every loop iteration: rank 0 takes the cancellations and as many queued jobs as there are free
slots, and (tensor parallel) broadcasts that plan; every rank applies it, the new jobs' contexts
(and the next blank of jobs that just finished one) join the running ``DecodeBatch`` with one
prefill, and one decoding step runs for all of them. Finished requests leave at once. The
decisions themselves (tokens, stop strings, blanks) are computed identically on every rank from
identical logits, as ``glmctl generate`` does under torchrun; only the plan travels.

A job is one prompt (one choice): its blanks are filled by ``generation.BlankFill`` round by
round with its own GenerationConfig, seed and stop strings, so its greedy text equals
``glmctl generate`` for the same prompt, alone or in a batch (docs/serve.md).

Sinks get ``("delta", text)``, then ``("done", Finished)`` or ``("error", message)``; they are
called on the engine thread and must only hand the event over (e.g. call_soon_threadsafe). A
step's events are handed over together once the step is done: the strategies' torch calls
release the GIL between rows, and an event loop woken by the first row's event would take the
GIL from the engine for every row (measured: a Python thread busy 9 % of the time slowed the
engine by 20-28 %; bench/RESULTS.md).
"""
from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from glmctl import console
from glmctl.blanks import Filler
from glmctl.generation import (BlankFill, DecodeBatch, GenerationConfig, Sampler, new_strategy,
                               span_generation)
from glmctl.session import Session

# Idle rank 0 broadcasts an empty plan this often, so the followers' collective never times out.
HEARTBEAT_S = 5.0


class QueueFull(Exception):
    """The queue holds --max-queue jobs already (HTTP 429)."""


@dataclass
class Job:
    """One prompt to complete; picklable (rank 0 broadcasts it to the other ranks)."""
    id: int
    tokens: list[int]  # the encoded prompt (glmctl.blanks.encode_prompt)
    gen: GenerationConfig
    seed: int  # this prompt's sampling seed (blank k uses derive_seed(seed, k))
    stop: tuple[str, ...] = ()
    continuation: bool = True  # return only the new text (a prompt without a mask); else the completed text
    record: bool = False  # also build the glmctl generate --json record (blanks with offsets)
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Finished:
    finish_reason: str  # "stop" (an end token or a stop string) or "length"
    completion_tokens: int
    record: dict | None = None  # with Job.record, unless a stop string cut the text


class CompletionText:
    """The text a job returns, as it grows: the continuation of a prompt without a mask, or the
    completed text of one with masks. Up to 3 trailing U+FFFD (maybe the byte pieces of an
    incomplete UTF-8 character, one U+FFFD each until it is complete) and a tail that may be the
    start of a stop string are held back; stop strings are looked for in generated text only
    (the current blank). The text sent is always the concatenation of the deltas."""

    def __init__(self, decode: Callable, prompt: list[int], continuation: bool, stop: tuple[str, ...]):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.offset = len(decode(prompt)) if continuation else 0
        self.sent = ""
        self.prefix: list[int] = []
        self.gen_from = 0
        self.stopped = False

    def blank(self, prefix: list[int]) -> str:
        """A blank starts after ``prefix`` (the tokens before its mask): send the text up to it."""
        self.prefix = list(prefix)
        text = self.decode(self.prefix)
        self.gen_from = len(text)
        return self._send(text)

    def grow(self, generated: list[int]) -> str:
        """The blank's tokens so far; returns the new text (sets ``stopped`` on a stop string)."""
        text = self.decode(self.prefix + list(generated))
        # byte pieces of an incomplete UTF-8 character decode to one U+FFFD each (at most 3)
        hold = len(text) - len(text.rstrip("\ufffd"))
        text = text[:len(text) - min(hold, 3)]
        if self.stop:
            region = text[self.gen_from:]
            hits = [region.find(s) for s in self.stop if s in region]
            if hits:
                self.stopped = True
                return self._send(text[:self.gen_from + min(hits)])
            hold = max((k for s in self.stop for k in range(1, len(s)) if region.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        return self._send(text)

    def final(self, tokens: list[int]) -> str:
        """The completed token sequence: send what is left."""
        return self._send(self.decode(tokens))

    def _send(self, full: str) -> str:
        shown = full[self.offset:]
        if len(shown) <= len(self.sent):
            return ""
        delta = shown[len(self.sent):]
        self.sent += delta
        return delta


class _Active:
    """A job in the batch (on every rank)."""

    def __init__(self, job: Job, fill: BlankFill, text: CompletionText, sink):
        self.job, self.fill, self.text, self.sink = job, fill, text, sink
        self.gen = span_generation(job.gen, fill.ids)
        self.strategy = None
        self.generated: list[int] = []
        self.tokens_out = 0
        self.last_token_at: float | None = None


class Engine:
    def __init__(self, session: Session, rt, max_batch_size: int = 8, max_queue: int = 64, metrics=None):
        self.session, self.rt = session, rt
        self.model = session.model
        self.ids = session.ids
        self.decode = session.tokenizer.decode
        self.max_len = session.config.max_sequence_length
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.metrics = metrics
        self.batch = DecodeBatch(self.model, self.ids.get("pad", 0))
        self.active: dict[int, _Active] = {}
        self.rejoin: list[_Active] = []  # jobs whose next blank joins at the next step
        # rank 0 only
        self._cv = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._sinks: dict[int, Callable] = {}
        self._cancels: set[int] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_id = 0
        self._outbox: list = []  # (sink, job id, event) of this step, handed over at its end
        self.failure: BaseException | None = None

    # ---- rank 0: the HTTP side ---------------------------------------------------------
    def new_id(self) -> int:
        with self._cv:
            self._next_id += 1
            return self._next_id

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        return len(self.active)

    def submit(self, jobs: list[Job], sink: Callable) -> None:
        """Queue ``jobs`` (all or none); ``sink(job_id, event)`` gets their events."""
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            for j in jobs:
                self._sinks[j.id] = sink
                self._pending.append(j)
            self._set_gauges()
            self._cv.notify()

    def cancel(self, job_ids) -> None:
        with self._cv:
            for jid in job_ids:
                if self._sinks.pop(jid, None) is None:
                    continue
                if self.metrics is not None:
                    self.metrics.cancel(1)
                queued = [j for j in self._pending if j.id == jid]
                if queued:
                    self._pending.remove(queued[0])
                else:
                    self._cancels.add(jid)
            self._set_gauges()
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="glmctl-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _set_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.set_gauges(queue_depth=len(self._pending), batch_size=len(self.active))

    def _plan(self):
        """Rank 0: wait for work, then take cancellations and new jobs for the free slots."""
        with self._cv:
            if not self.active and not self.rejoin and not self._pending and not self._stopping \
                    and not self._cancels:
                self._cv.wait(HEARTBEAT_S)
            cancels = sorted(self._cancels)
            self._cancels.clear()
            admit = []
            free = self.max_batch_size - (len(self.active) - len(set(cancels) & set(self.active)))
            while self._pending and len(admit) < free:
                admit.append(self._pending.popleft())
            return cancels, admit, self._stopping

    # ---- every rank ----------------------------------------------------------------------
    def follow(self) -> None:
        """Ranks > 0: apply rank 0's plans until it stops."""
        self._run()

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - the HTTP side reports it; nothing else can
            self.failure = e
            console.warn(f"serve: the engine stopped: {type(e).__name__}: {e}")
            if os.environ.get("GLMCTL_DEBUG"):
                traceback.print_exc()
            with self._cv:
                sinks = list(self._sinks.items())
                self._sinks.clear()
                self._pending.clear()
            for jid, sink in sinks:
                sink(jid, ("error", f"the engine stopped: {type(e).__name__}: {e}"))

    def _run(self) -> None:
        self.model.eval()
        tp = self.rt.distributed
        with torch.inference_mode():
            while True:
                plan = self._plan() if self.rt.is_main else None
                if tp:
                    plan = self.rt.broadcast(plan)
                cancels, admit, stopping = plan
                if stopping:
                    cancels = sorted(set(cancels) | set(self.active))
                self._drop(cancels)
                if stopping:
                    return
                for job in admit:
                    self._admit(job)
                self._join()
                if len(self.batch):
                    self._finish(self.batch.step())
                self._hand_over()
                if self.rt.is_main:
                    with self._cv:
                        self._set_gauges()

    def _emit(self, a: _Active, event) -> None:
        if self.rt.is_main:
            sink = self._sinks.get(a.job.id)
            if sink is not None:
                self._outbox.append((sink, a.job.id, event))

    def _hand_over(self) -> None:
        """The step's events to their sinks, back to back (no torch call in between)."""
        out, self._outbox = self._outbox, []
        for sink, job_id, event in out:
            sink(job_id, event)

    def _drop(self, job_ids) -> None:
        ids = [j for j in job_ids if j in self.active]
        self.batch.drop(ids)
        self.rejoin = [a for a in self.rejoin if a.job.id not in ids]
        for j in ids:
            a = self.active.pop(j)
            if self.metrics is not None:
                self.metrics.tokens(0, a.tokens_out)

    def _admit(self, job: Job) -> None:
        fill = BlankFill(job.tokens, self.ids, job.seed)
        a = _Active(job, fill, CompletionText(self.decode, job.tokens, job.continuation, job.stop), None)
        self.active[job.id] = a
        self.rejoin.append(a)

    def _join(self) -> None:
        """The next blank of every job in ``rejoin`` joins the batch (one prefill for all)."""
        if not self.rejoin:
            return
        todo, self.rejoin = self.rejoin, []
        keys, reqs, strategies, limits = [], [], [], []
        for a in todo:
            delta = a.text.blank(a.fill.tokens[:a.fill.mask_index])
            if delta:
                self._emit(a, ("delta", delta))
            req = a.fill.request()
            a.generated = []
            s, limit = new_strategy(req, a.gen, self.ids, self.batch.device, self.max_len, a.job.seed,
                                    on_token=lambda tok, _a=a: self._on_token(_a, tok))
            a.strategy = s
            keys.append(a.job.id)
            reqs.append(req)
            strategies.append(s)
            limits.append(limit)
        self._finish(self.batch.join(keys, reqs, strategies, limits))

    def _on_token(self, a: _Active, token: int) -> None:
        a.generated.append(token)
        a.tokens_out += 1
        if self.metrics is not None and self.rt.is_main:
            now = time.monotonic()
            if a.last_token_at is None:
                self.metrics.observe("ttft", now - a.job.arrived)
            else:
                self.metrics.observe("tpot", now - a.last_token_at)
            a.last_token_at = now
        delta = a.text.grow(a.generated)
        if delta:
            self._emit(a, ("delta", delta))
        if a.text.stopped:
            a.strategy.finish()  # leaves the batch in this same step

    def _finish(self, job_ids) -> None:
        """Jobs whose current blank ended: fill it in, then end the job or queue its next blank."""
        for jid in job_ids:
            a = self.active[jid]
            hyps = a.strategy.result()
            if not isinstance(a.strategy, Sampler):  # beam search: the tokens arrive at the end
                best = hyps[0].tokens if hyps else []
                a.tokens_out += len(best)
                if not a.text.stopped:
                    delta = a.text.grow(best)
                    if delta:
                        self._emit(a, ("delta", delta))
            a.fill.complete(hyps)
            if not a.text.stopped and not a.fill.done:
                self.rejoin.append(a)
                continue
            del self.active[jid]
            stop_token = hyps[0].stop_token if hyps else None
            reason = "stop" if a.text.stopped or stop_token is not None else "length"
            record = None
            if not a.text.stopped:
                result = a.fill.result()
                delta = a.text.final(result.tokens)
                if delta:
                    self._emit(a, ("delta", delta))
                if a.job.record and self.rt.is_main:
                    record = Filler(self.session, a.job.gen).record(result)
            if self.metrics is not None:
                self.metrics.tokens(0, a.tokens_out)
            self._emit(a, ("done", Finished(reason, a.tokens_out, record)))
            if self.rt.is_main:
                with self._cv:
                    self._sinks.pop(jid, None)
