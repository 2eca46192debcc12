"""Dynamic micro-batching across concurrent requests, mixing tasks in one forward pass.

Requests are bounded and tokenized by the caller (`tokenizing.py`: bytes per text, cut before
tokenizing), queued, and served by one inference thread that gathers up to `max_batch_size`
examples / `max_batch_tokens` padded tokens, waiting at most `max_queue_delay_ms` for company. A full queue refuses new work (back-pressure, not
unbounded memory); expired or cancelled requests are dropped before they cost a forward.
The engine knows nothing of gRPC: callers get `concurrent.futures.Future`s.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ticketserve.core.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from ticketserve.runtime.executor import LoadedTask, Prediction, Runtime
from ticketserve.runtime.tokenizing import MAX_TEXT_BYTES, Tokenization


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, gt=0, description="examples per forward pass")
    max_batch_tokens: int = Field(8192, gt=0, description="padded tokens per forward pass")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests")
    queue_ms_per_token: float = Field(1.0, ge=0, description="queue order: a request's turn comes this much later "
                                      "per padded token it costs (0: first come, first served)")
    max_queue_size: int = Field(256, gt=0, description="queued requests before RESOURCE_EXHAUSTED")
    max_texts_per_request: int = Field(32, gt=0)
    max_tasks_per_request: int = Field(16, gt=0, description="tasks one fan-out may name (each is a request in "
                                       "the queue)")
    max_tokens_per_text: int = Field(256, gt=1)
    max_text_bytes: int = Field(MAX_TEXT_BYTES, gt=0, description="UTF-8 bytes per text (and per text pair); "
                                "longer ones are refused")
    truncate: bool = Field(True, description="truncate longer texts (true) or refuse them (false)")

    @model_validator(mode="after")
    def _request_fits_a_batch(self) -> EngineConfig:
        if self.max_texts_per_request > self.max_batch_size:
            raise ValueError("max_texts_per_request must not exceed max_batch_size")
        return self


@dataclass
class Result:
    predictions: list[Prediction]
    queue_seconds: float
    inference_seconds: float
    batch_size: int
    batch_tasks: int
    tokens: int  # the request's tokens (its texts' ids, special tokens included)


@dataclass
class _Request:
    task: LoadedTask
    features: list[dict[str, list[int]]]
    deadline: float | None  # time.monotonic() seconds
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    longest: int = field(init=False)  # tokens of its longest and shortest text
    shortest: int = field(init=False)

    def __post_init__(self) -> None:
        lengths = [len(f["input_ids"]) for f in self.features]
        self.longest, self.shortest = max(lengths), min(lengths)


class Engine:
    def __init__(self, runtime: Runtime, config: EngineConfig | None = None, observer=None):
        self.runtime = runtime
        self.config = config or EngineConfig()
        self.observer = observer  # optional: .batch(size, tasks, seconds), .queue(depth), .running(requests)
        self.tokenization = Tokenization.for_backbone(runtime.backbone, self.config.max_tokens_per_text,
                                                      self.config.max_text_bytes, self.config.truncate)
        self._queue: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._serve_forever, name="ticketserve-inference", daemon=True)
        self._thread.start()

    # -- admission (caller's thread) --------------------------------------------------------

    def submit(self, task: LoadedTask, texts: list[str], pairs: list[str | None] | None = None,
               deadline: float | None = None) -> Future:
        """Validate, tokenize and queue one request for a loaded task (which the caller keeps
        loaded until the future is done)."""
        return self.submit_all([(task, texts, pairs)], deadline)[0]

    def submit_all(self, requests: list[tuple[LoadedTask, list[str], list[str | None] | None]],
                   deadline: float | None = None) -> list[Future]:
        """Several requests (one task each) queued together, all or none: every one is
        validated and tokenized first, then all enter the queue at once, so they meet in one
        batch when they fit (a fan-out: the same texts to several tasks)."""
        if not self._accepting:
            raise Unavailable("the server is shutting down")
        if len(requests) > self.config.max_tasks_per_request:
            raise InvalidArgument(f"{len(requests)} tasks; at most {self.config.max_tasks_per_request} per request")
        with self._wake:  # refused before any tokenizing when the queue cannot take them all
            room = self.config.max_queue_size - len(self._queue)
        if len(requests) > room:
            raise Overloaded(f"request queue is full ({self.config.max_queue_size}); retry later")
        tokenized: dict = {}  # one tokenizer, so the same texts (a fan-out's) are tokenized once for every task
        prepared = [self._prepare(task, texts, pairs, deadline, tokenized) for task, texts, pairs in requests]
        with self._wake:
            if len(self._queue) + len(prepared) > self.config.max_queue_size:
                raise Overloaded(f"request queue is full ({self.config.max_queue_size}); retry later")
            self._queue.extend(prepared)
            self._wake.notify()
        self._observe_queue()
        return [request.future for request in prepared]

    def _prepare(self, task: LoadedTask, texts: list[str], pairs: list[str | None] | None,
                 deadline: float | None, tokenized: dict[tuple, list]) -> _Request:
        spec = task.spec
        if not texts:
            raise InvalidArgument("a request needs at least one input")
        if len(texts) > self.config.max_texts_per_request:
            raise InvalidArgument(f"{len(texts)} inputs; at most {self.config.max_texts_per_request} per request")
        pairs = pairs or [None] * len(texts)
        if len(pairs) != len(texts):
            raise InvalidArgument(f"{len(texts)} texts but {len(pairs)} text pairs")
        has_pairs = [p is not None for p in pairs]
        paired = spec.takes_pairs
        if paired and not all(has_pairs):
            raise InvalidArgument(f"task {spec.name} takes text pairs: every input needs text_pair")
        if not paired and any(has_pairs):
            raise InvalidArgument(f"task {spec.name} takes single texts: text_pair must be empty")
        spans = spec.type == "token_classification"  # its answer needs each piece's span
        key = (id(texts), id(pairs) if paired else None, spans)  # the same lists: the same tokens
        if key not in tokenized:
            tokenized[key] = self.tokenization.features(texts, pairs if paired else None, spans)
        return _Request(task, tokenized[key], deadline)

    # -- the inference thread ---------------------------------------------------------------

    def _serve_forever(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if self.observer is not None:
                self.observer.running(len(batch))
            try:
                self._run(batch)
            except Exception as exc:  # a failed forward fails its requests, never the engine
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
            finally:
                if self.observer is not None:
                    self.observer.running(0)

    def _next_batch(self) -> list[_Request] | None:
        """The request whose turn it is and every queued one that fits beside it, waiting up to the
        queue delay for company unless other requests are already waiting."""
        with self._wake:
            while not self._queue:
                if self._stopped:
                    return None
                self._wake.wait()
            head = min(self._queue, key=self._turn)
            self._queue.remove(head)
            batch = [head]
            flush_at = time.monotonic() + self.config.max_queue_delay_ms / 1000
            while True:
                self._gather(batch)
                remaining = flush_at - time.monotonic()
                if remaining <= 0 or self._stopped or self._queue:  # what is left waits for the next batch
                    break
                self._wake.wait(remaining)
        self._observe_queue()
        return [r for r in batch if self._live(r)]

    def _gather(self, batch: list[_Request]) -> None:
        """Move queued requests that fit the batch into it, in turn; the others keep their order."""
        left: collections.deque[_Request] = collections.deque()
        for request in sorted(self._queue, key=self._turn):
            (batch if self._fits(batch, request) else left).append(request)
        self._queue = left

    def _turn(self, request: _Request) -> float:
        """When a request's turn comes: its arrival, pushed back in proportion to its padded
        tokens, so cheap requests go before costly ones that came only a little earlier and a
        flood of long texts cannot take the server from short ones (every request still gets
        its turn: the push-back is bounded by its own size)."""
        return request.enqueued + request.longest * len(request.features) * self.config.queue_ms_per_token / 1000

    def _fits(self, batch: list[_Request], candidate: _Request) -> bool:
        """Within the batch limits, and of a like length: padding short texts to a long one
        would make every short request pay for the longest (a flood of long texts must not
        slow the short ones down), so the longest stays within 4× the shortest + 32 tokens —
        loose enough that sentences of ordinary lengths still share batches."""
        examples = sum(len(r.features) for r in batch) + len(candidate.features)
        longest = max(candidate.longest, *(r.longest for r in batch))
        shortest = min(candidate.shortest, *(r.shortest for r in batch))
        return (examples <= self.config.max_batch_size and examples * longest <= self.config.max_batch_tokens
                and longest <= 4 * shortest + 32)

    @staticmethod
    def _live(request: _Request) -> bool:
        if request.future.cancelled():
            return False
        if request.deadline is not None and time.monotonic() > request.deadline:
            request.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
            return False
        return request.future.set_running_or_notify_cancel()

    def _run(self, batch: list[_Request]) -> None:
        if not batch:
            return
        started = time.monotonic()
        tasks = [r.task for r in batch for _ in r.features]
        features = [f for r in batch for f in r.features]
        inputs = self.tokenization.pad(features, self.runtime.device)
        predictions = self.runtime.predictions(tasks, self.runtime.logits(tasks, inputs), features)
        seconds = time.monotonic() - started
        distinct = len({id(task) for task in tasks})
        offset = 0
        for request in batch:
            count = len(request.features)
            request.future.set_result(Result(predictions[offset:offset + count], started - request.enqueued,
                                             seconds, len(tasks), distinct,
                                             sum(len(f["input_ids"]) for f in request.features)))
            offset += count
        if self.observer is not None:
            self.observer.batch(len(tasks), distinct, seconds)

    def _observe_queue(self) -> None:
        if self.observer is not None:
            self.observer.queue(len(self._queue))

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        self._accepting = False
        with self._wake:
            self._stopped = True
            self._wake.notify_all()
        self._thread.join(timeout=30)
        for request in list(self._queue):
            if not request.future.done():
                request.future.set_exception(Unavailable("the server stopped"))

