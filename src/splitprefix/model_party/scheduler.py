"""One worker thread owns the model; every request's compute is a job in its queues.

Requests enqueue a job and wait for it (from the thread pool); the worker takes, in this order:

1. Generation work (`urgent` jobs), round-robin across parties. A session's prefill runs alone.
   When its turn comes while other parties' steps are queued, it lets one forward of them go
   first, once, so that the decoding parties do not all wait for it. A session's check or close
   (`quick` jobs) runs as the worker chooses work. Generation steps of different sessions are
   merged into one forward (`merged.run_steps`) of at most `max_rows` rows and `max_keys` padded
   keys (rows x keys per row), one step per session, and the round starts one party later each
   time, so that a party with many sessions cannot crowd the others out of a full forward.
2. Training work (forward, backward, loss), one job at a time, chosen by deficit round-robin over
   the parties with each job costing its tokens, so that each party gets the same tokens per
   second whatever its batch size.

Before a merged forward, the worker may wait a little for more steps (`_linger`): for the steps
of sessions that were answered recently and whose parties, at the pace each has kept, will send
their next step soon. It waits only where the wait costs less of the worker's time than the forward
it saves: for k more rows, less than k / q of a forward's time when q rows are queued. Two parties
whose steps would otherwise alternate, one row per forward, then meet in one forward.

A training job is preempted before each of its layers, on the forward and on the backward: the
worker then runs one batch of waiting generation work, so that a step waits for at most one layer
of someone's training, not for the whole job.

A job whose client disconnects before it starts leaves its queue (its party's share goes to the
others); one that runs stops at its next layer (`model_party.cancel`). Every job reports the
seconds it waited in the queue, which answers carry as `queue_ms` in their metadata.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from splitprefix.model_party import cancel


class Done(Exception):
    """`Job.prepare` answered the job itself (a replayed step, or a refusal): nothing to merge."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


@dataclass(eq=False)
class Job:
    """One request's compute. Set `run` (a job run alone) or `prepare` (a mergeable step)."""

    party: str
    """The data party, for fair queueing."""
    urgent: bool
    """Generation work, served before training work."""
    cost: int = 1
    """Tokens of a training job, for deficit round-robin."""
    run: Callable[[], Any] | None = None
    """Computes the job's result, alone."""
    quick: bool = False
    """`run` is bookkeeping without the model (a session's check or close): the worker runs it as it
    chooses work, without a turn of its own, so that it neither delays nor splits a merged forward."""
    prepare: Callable[[], Any] | None = None
    """Checks a step against its session and returns its `merged.StepWork` (or raises `Done`)."""
    gave_way: bool = False
    """A job run alone (a prefill) let one forward of other parties' queued steps go first."""
    gone: threading.Event | None = None
    result: Any = None
    error: BaseException | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[], None] | None = None
    """Called on the worker once the job is finished (an event loop's wake-up)."""

    @property
    def queue_s(self) -> float:
        return (self.started_at or time.perf_counter()) - self.queued_at

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.on_done is not None:
            self.on_done()


Merge = Callable[[list[Any]], list[Any]]
"""Runs the prepared steps of one group as one forward; their results, in order."""

PACE_MEMORY_S = 5.0
"""A session's pace is forgotten this long after its last answer (its party has stopped)."""


@dataclass
class Pace:
    """When a session's last step was answered, and how long its party then takes to send the next."""

    party: str
    answered: float
    rows: int
    turnaround: float | None = None
    """Seconds from an answer to the next step's arrival, a moving average."""

    def expected(self) -> float | None:
        return None if self.turnaround is None else self.answered + self.turnaround


class Scheduler:
    """The queues and the worker thread that runs every job on the model."""

    def __init__(self, max_rows: int, max_keys: int, merge: Merge | None = None) -> None:
        self.max_rows, self.max_keys = max_rows, max_keys
        self.merge = merge
        self.busy = threading.Lock()
        """Held by the worker while it runs work (tests hold it to keep the model busy)."""
        self._cond = threading.Condition()
        self._urgent: dict[str, deque[Job]] = {}
        self._training: dict[str, deque[Job]] = {}
        self._deficit: dict[str, int] = {}
        self._worker: threading.Thread | None = None
        self._preempting = False
        """True while generation work runs: only training work is preempted."""
        self.merged_rows: deque[int] = deque(maxlen=1000)
        """Rows of recent merged forwards (the last 1000), for tests and the log."""
        self._pace: dict[int, Pace] = {}
        """Each recently answered session's pace, by the id of its session."""
        self._forward_s: float | None = None
        """Seconds of a merged forward, a moving average."""

    def submit(self, job: Job) -> tuple[Any, float]:
        """Run `job` on the worker; its result and its queue time in seconds. Raises its error, or
        ClientGone once this thread's client disconnects before the job started."""
        job.gone = cancel.current()
        queues = self.enqueue(job)
        while not job.done.wait(0.05):
            if job.gone is not None and job.gone.is_set() and self._withdraw(job, queues):
                raise cancel.ClientGone
        if job.error is not None:
            raise job.error
        return job.result, job.queue_s

    def enqueue(self, job: Job) -> dict[str, deque[Job]]:
        """Queue `job` without waiting for it (see `on_done`); the queues it joined."""
        queues = self._urgent if job.urgent else self._training
        with self._cond:
            queues.setdefault(job.party, deque()).append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="model-scheduler", daemon=True)
                self._worker.start()
            self._cond.notify()
        return queues

    def _withdraw(self, job: Job, queues: dict[str, deque[Job]]) -> bool:
        """Take a job that has not started out of its queue; False if it already left it."""
        with self._cond:
            queue = queues.get(job.party)
            if queue is None or job not in queue:
                return False
            queue.remove(job)
            if not queue:
                del queues[job.party]
            return True

    def preempt(self) -> None:
        """Called before each layer: inside a training job, run one batch of waiting generation work."""
        if self._preempting or threading.current_thread() is not self._worker:
            return
        with self._cond:
            batch = self._take_urgent()
        if batch:
            self._run_urgent(batch)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._urgent and not self._training:
                    self._cond.wait()
            with self.busy:  # choose only once the model is free, from everything queued by then
                with self._cond:
                    batch = self._take_urgent()
                    job = None if batch else self._take_training()
                    if batch and batch[0][1] is not None:
                        batch = self._linger(batch)
                if batch:
                    self._run_urgent(batch)
                elif job is not None:
                    self._run_alone(job)

    # --- choosing work (under the condition's lock) ----------------------------------------------

    def _take_urgent(self, taken: list[tuple[Job, Any]] | None = None) -> list[tuple[Job, Any]]:
        """A job run alone, or the steps of one merged forward: (job, prepared step) pairs; with
        `taken`, the steps of a forward so far and those that may join them."""
        taken = list(taken or [])
        blocked: set[str] = set()
        sessions = {id(work.session) for _, work in taken}
        rows, keys = sum(work.rows for _, work in taken), max((work.keys for _, work in taken), default=0)
        progress = True
        while progress:
            progress = False
            for party in list(self._urgent):
                if party in blocked or party not in self._urgent:
                    continue
                job = self._urgent[party][0]
                if job.quick:
                    if any(taker.party == party for taker, _ in taken):  # after that party's step
                        blocked.add(party)
                        continue
                    self._pop(self._urgent, party)
                    self._run_alone(job)
                    progress = True
                    continue
                if job.run is not None:
                    if taken or (not job.gave_way and self._steps_queued(party)):
                        job.gave_way = True  # a prefill gives way to one forward of steps, no more
                        blocked.add(party)
                        continue
                    self._pop(self._urgent, party)
                    self._rotate(self._urgent, party)
                    return [(job, None)]
                work = self._prepared(job)
                if work is None:  # answered already
                    self._pop(self._urgent, party)
                    progress = True
                    continue
                fits = not taken or (
                    work.group == taken[0][1].group
                    and id(work.session) not in sessions
                    and rows + work.rows <= self.max_rows
                    and (rows + work.rows) * max(keys, work.keys) <= self.max_keys
                )
                if not fits:
                    blocked.add(party)
                    continue
                self._pop(self._urgent, party)
                taken.append((job, work))
                self._arrived(job, work)
                sessions.add(id(work.session))
                rows, keys, progress = rows + work.rows, max(keys, work.keys), True
        if taken:
            self._rotate(self._urgent, taken[0][0].party)
        return taken

    def _steps_queued(self, party: str) -> bool:
        """Another party's step waits at the head of its queue."""
        return any(other != party and queue[0].prepare is not None for other, queue in self._urgent.items())

    def _linger(self, batch: list[tuple[Job, Any]]) -> list[tuple[Job, Any]]:
        """Wait for the steps expected soon where the wait pays (module docstring); `batch` grown by
        the steps that came meanwhile."""
        deadline, expected = self._linger_plan(batch)
        while expected and (left := deadline - time.perf_counter()) > 0:
            self._cond.wait(left)
            batch = self._take_urgent(batch)
            for _, work in batch:
                expected.pop(id(work.session), None)
            for key, party in list(expected.items()):
                queue = self._urgent.get(party)
                if key not in self._pace or (queue and queue[0].run is not None):
                    del expected[key]  # closed, or its next step would queue behind that job
        return batch

    def _linger_plan(self, batch: list[tuple[Job, Any]]) -> tuple[float, dict[int, str]]:
        """Until when to wait, and for which sessions (their parties; none: run now)."""
        now, forward = time.perf_counter(), self._forward_s
        for key in [k for k, pace in self._pace.items() if now - pace.answered > PACE_MEMORY_S]:
            del self._pace[key]
        if forward is None:
            return now, {}
        queued = sum(work.rows for _, work in batch)
        taken = {id(work.session) for _, work in batch}
        soon = sorted(
            (at, key, pace)
            for key, pace in self._pace.items()
            if key not in taken and (at := pace.expected()) is not None and now - forward < at < now + forward
        )
        deadline, expected, rows = now, {}, 0
        for i, (at, _, pace) in enumerate(soon):
            rows += pace.rows
            if at - now < forward * rows / queued:  # the wait costs less than the forwards it saves
                deadline = max(at, now) + forward / 4  # a little slack for a party a little late
                expected = {key: later.party for _, key, later in soon[: i + 1]}
        return min(deadline, now + forward), expected

    def forget(self, session: object) -> None:
        """A session closed: wait for no more of its steps."""
        with self._cond:
            self._pace.pop(id(session), None)

    def _arrived(self, job: Job, work: Any) -> None:
        """A session's step was taken: learn how long its party took since the last answer."""
        pace = self._pace.get(id(work.session))
        if pace is not None and job.queued_at >= pace.answered:
            sample = job.queued_at - pace.answered
            pace.turnaround = sample if pace.turnaround is None else 0.7 * pace.turnaround + 0.3 * sample

    def _answered(self, batch: list[tuple[Job, Any]], started: float) -> None:
        """A merged forward finished: remember when each session was answered, and the forward's time."""
        now = time.perf_counter()
        seconds = now - started
        self._forward_s = seconds if self._forward_s is None else 0.7 * self._forward_s + 0.3 * seconds
        for job, work in batch:
            pace = self._pace.setdefault(id(work.session), Pace(job.party, now, work.rows))
            pace.answered, pace.rows = now, work.rows

    def _prepared(self, job: Job) -> Any:
        """The job's step checked against its session now, or None once the job is finished."""
        assert job.prepare is not None
        try:
            return job.prepare()
        except Done as done:
            job.finish(done.result)
        except Exception as error:  # a refusal (e.g. an expired session) of this job only
            job.finish(error=error)
        return None

    def _take_training(self) -> Job | None:
        """Deficit round-robin: each party's turn adds the largest waiting cost to its credit."""
        if not self._training:
            return None
        quantum = max(queue[0].cost for queue in self._training.values())
        while True:
            party = next(iter(self._training))
            queue = self._training[party]
            if self._deficit.get(party, 0) >= queue[0].cost:
                job = queue[0]
                self._deficit[party] -= job.cost
                self._pop(self._training, party)
                if party not in self._training:
                    self._deficit.pop(party)  # credit is for parties that wait, not for idle ones
                return job
            self._deficit[party] = self._deficit.get(party, 0) + quantum
            self._rotate(self._training, party)

    @staticmethod
    def _pop(queues: dict[str, deque[Job]], party: str) -> None:
        queue = queues[party]
        queue.popleft()
        if not queue:
            del queues[party]

    @staticmethod
    def _rotate(queues: dict[str, deque[Job]], party: str) -> None:
        """Move `party` to the end of the round (dicts keep insertion order)."""
        if party in queues:
            queues[party] = queues.pop(party)

    # --- running work (on the worker thread) ------------------------------------------------------

    def _run_alone(self, job: Job) -> None:
        job.started_at = time.perf_counter()
        try:
            with cancel.cancelled_by(job.gone):
                cancel.check()  # a client that went away while its job waited gets nothing
                job.finish(job.run() if job.run is not None else None)
        except BaseException as error:  # the job's own error, raised in its request's thread
            job.finish(error=error)

    def _run_urgent(self, batch: list[tuple[Job, Any]]) -> None:
        """Run generation work; its own layers do not preempt it (a session's next step would run
        inside its current one)."""
        outer, self._preempting = self._preempting, True
        try:
            self._run_batch(batch)
        finally:
            self._preempting = outer

    def _run_batch(self, batch: list[tuple[Job, Any]]) -> None:
        if batch[0][1] is None:
            self._run_alone(batch[0][0])
            return
        now = time.perf_counter()
        for job, _ in batch:
            job.started_at = now
        self.merged_rows.append(sum(work.rows for _, work in batch))
        assert self.merge is not None
        try:
            with cancel.cancelled_by(None):  # one party gone does not stop the others' step
                results = self.merge([work for _, work in batch])
        except BaseException as error:
            for job, _ in batch:
                job.finish(error=error)
            return
        with self._cond:
            self._answered(batch, now)
        for (job, _), result in zip(batch, results, strict=True):
            job.finish(result)
