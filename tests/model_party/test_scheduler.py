"""The scheduler: fair shares across parties, generation before training, and gone parties' work dropped."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.cancel import ClientGone, cancelled_by
from splitprefix.model_party.generation import GenerationBackend
from splitprefix.model_party.scheduler import Job, Scheduler
from splitprefix.model_party.settings import ServerSettings
from top_helpers import SPLIT_AT, local_step, save_model_dir


@dataclass
class FakeStep:
    """What the scheduler reads of a prepared step."""

    party: str
    rows: int = 1
    keys: int = 4
    group: tuple[int, int] = (0, 1)
    session: object = field(default_factory=object)


def _queue_while_held(scheduler: Scheduler, jobs: list[Job]) -> list[threading.Thread]:
    """Submit `jobs` in order from threads while the worker is held; they are all queued on return."""
    threads = []
    for count, job in enumerate(jobs, start=1):
        threads.append(threading.Thread(target=scheduler.submit, args=(job,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while _queued(scheduler) < count and time.monotonic() < deadline:
            time.sleep(0.002)
    return threads


def _queued(scheduler: Scheduler) -> int:
    return sum(len(q) for q in (*scheduler._urgent.values(), *scheduler._training.values()))


def test_a_greedy_party_gets_no_more_training_tokens_than_a_modest_one():
    # Prepare: a greedy party queues big jobs first, a modest one small ones
    served: list[tuple[str, int]] = []
    scheduler = Scheduler(max_rows=8, max_keys=1000)

    def job(party: str, cost: int) -> Job:
        return Job(party, urgent=False, cost=cost, run=lambda: served.append((party, cost)))

    jobs = [job("greedy", 300) for _ in range(4)] + [job("modest", 100) for _ in range(8)]

    # Execute
    with scheduler.busy:
        threads = _queue_while_held(scheduler, jobs)
    for thread in threads:
        thread.join(timeout=10)

    # Assert: at every point, the two parties' tokens differ by at most one big job
    totals = {"greedy": 0, "modest": 0}
    for party, cost in served[:-3]:  # until the modest party runs out of work
        totals[party] += cost
        assert abs(totals["greedy"] - totals["modest"]) <= 300


def test_a_party_with_many_sessions_does_not_crowd_others_out_of_a_full_forward():
    # Prepare: forwards of at most 2 rows; one party with 6 sessions' steps, two with one each
    batches: list[list[str]] = []
    scheduler = Scheduler(max_rows=2, max_keys=1000)
    scheduler.merge = lambda works: batches.append([w.party for w in works]) or [None] * len(works)

    def step(party: str) -> Job:
        work = FakeStep(party)
        return Job(party, urgent=True, prepare=lambda: work)

    jobs = [step("greedy") for _ in range(6)] + [step("a"), step("b")]

    # Execute
    with scheduler.busy:
        threads = _queue_while_held(scheduler, jobs)
    for thread in threads:
        thread.join(timeout=10)

    # Assert: both small parties are in the first two forwards, which are full
    assert "a" in batches[0] + batches[1] and "b" in batches[0] + batches[1]
    assert [len(b) for b in batches[:2]] == [2, 2]


def test_a_close_neither_splits_a_merged_forward_nor_runs_before_its_partys_step():
    # Prepare: steps of parties a and b, a close from c between them, and a close from a behind a's step
    order: list[str] = []
    scheduler = Scheduler(max_rows=8, max_keys=1000)
    scheduler.merge = lambda works: order.append("+".join(w.party for w in works)) or [None] * len(works)

    def step(party: str) -> Job:
        work = FakeStep(party)
        return Job(party, urgent=True, prepare=lambda: work)

    def close(party: str) -> Job:
        return Job(party, urgent=True, run=lambda: order.append(f"close {party}"), quick=True)

    jobs = [step("a"), close("c"), step("b"), close("a")]

    # Execute
    with scheduler.busy:
        threads = _queue_while_held(scheduler, jobs)
    for thread in threads:
        thread.join(timeout=10)

    # Assert: one forward of both steps; c's close ran as the worker chose them, a's after a's step
    assert order == ["close c", "a+b", "close a"]
    assert list(scheduler.merged_rows) == [2]


def test_two_parties_whose_steps_alternate_meet_in_one_forward():
    # Prepare: forwards of 20 ms; two parties that each take 3 ms to send their next step, the
    # second starting half a forward later, so that without waiting each forward runs one row
    rows: list[int] = []
    scheduler = Scheduler(max_rows=8, max_keys=1000)

    def merge(works: list) -> list:
        time.sleep(0.02)
        rows.append(len(works))
        return [None] * len(works)

    scheduler.merge = merge

    def party(name: str, delay: float) -> None:
        work = FakeStep(name)  # one session: the same object at every step
        time.sleep(delay)
        for _ in range(12):
            scheduler.submit(Job(name, urgent=True, prepare=lambda: work))
            time.sleep(0.003)

    # Execute
    threads = [threading.Thread(target=party, args=(name, delay)) for name, delay in (("a", 0), ("b", 0.01))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    # Assert: once each party's pace is known, their steps run together (but the second party's last)
    assert sum(rows) == 24 and rows[4:-1] == [2] * (len(rows) - 5), rows


def test_a_party_that_stops_without_closing_delays_a_step_by_at_most_one_forward():
    # Prepare: forwards of 20 ms; a party that keeps a steady pace, then goes silent mid-session
    # (no close), and another party whose step comes just after that party's last answer
    scheduler = Scheduler(max_rows=8, max_keys=1000)
    scheduler.merge = lambda works: time.sleep(0.02) or [None] * len(works)
    quiet = FakeStep("quiet")
    for _ in range(5):
        scheduler.submit(Job("quiet", urgent=True, prepare=lambda: quiet))
        time.sleep(0.003)

    # Execute: the worker expects the quiet party's next step and waits for it
    other = FakeStep("other")
    _, queued = scheduler.submit(Job("other", urgent=True, prepare=lambda: other))

    # Assert: it waited, but for less than one forward plus scheduling slack
    assert 0.002 < queued < 0.02 + 0.015, queued


def test_a_party_that_disconnects_while_queued_leaves_the_queue_and_frees_its_share():
    # Prepare: two parties' jobs wait for the held model
    ran: list[str] = []
    scheduler = Scheduler(max_rows=8, max_keys=1000)
    gone = threading.Event()
    outcome: list[BaseException] = []

    def leaving() -> None:
        with cancelled_by(gone):
            try:
                scheduler.submit(Job("leaving", urgent=False, cost=10, run=lambda: ran.append("leaving")))
            except ClientGone as error:
                outcome.append(error)

    with scheduler.busy:
        thread = threading.Thread(target=leaving)
        thread.start()
        time.sleep(0.1)
        job = Job("staying", urgent=False, cost=10, run=lambda: ran.append("staying"))
        staying = threading.Thread(target=scheduler.submit, args=(job,))
        staying.start()
        time.sleep(0.1)
        # Execute: the first party goes away
        gone.set()
        thread.join(timeout=5)
        assert outcome and isinstance(outcome[0], ClientGone)
        assert "leaving" not in scheduler._training
    staying.join(timeout=5)

    # Assert: only the party that stayed used the model
    assert ran == ["staying"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = save_model_dir(tmp_path_factory.mktemp("llama"), "llama")
    backend = TopBackend(ServerSettings(directory, SPLIT_AT))
    return backend, GenerationBackend(backend)


def _open_session(generation: GenerationBackend) -> str:
    from session_helpers import open_request

    return generation.open(*open_request(generation.backend, top_k=1), "gen")[1]["session_id"]


def test_a_generation_step_runs_between_the_layers_of_a_training_forward(served):
    # Prepare: a training forward; a step arrives while its first layer runs
    backend, generation = served
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(backend.settings.model_dir)
    step = local_step(model, "client", backend.top.bottom_sha256)
    session = _open_session(generation)
    events: list[str] = []
    answered = threading.Event()
    merge = generation.scheduler.merge
    assert merge is not None

    def step_thread() -> None:
        from session_helpers import step_request

        generation.step(session, *step_request(backend), "gen")
        answered.set()

    def recorded_merge(works: list) -> list:
        events.append("step computed")  # on the model's thread, in the order of the work
        return merge(works)

    def first_layer(*_: object) -> None:
        if not events:
            events.append("training started")
            threading.Thread(target=step_thread).start()
            deadline = time.monotonic() + 10
            while not generation.scheduler._urgent and time.monotonic() < deadline:
                time.sleep(0.005)  # until the step is queued

    hook = backend.top.stack.layers[0].register_forward_pre_hook(first_layer)
    generation.scheduler.merge = recorded_merge
    try:
        # Execute
        backend.forward(step.tensors, step.meta | {"keep_graph": False}, "trainer")
        events.append("training answered")
    finally:
        hook.remove()
        generation.scheduler.merge = merge
    answered.wait(10)

    # Assert: the step did not wait for the whole training forward
    assert events == ["training started", "step computed", "training answered"]
    assert answered.is_set()


def test_a_party_that_disconnects_mid_step_stops_and_the_next_party_is_served(served):
    # Prepare: a training forward whose client goes away during its first layer
    backend, _ = served
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(backend.settings.model_dir)
    step = local_step(model, "client", backend.top.bottom_sha256)
    gone, layers = threading.Event(), []

    def count(*_: object) -> None:
        layers.append(1)
        gone.set()

    hook = backend.top.stack.layers[0].register_forward_pre_hook(count)
    try:
        # Execute
        with cancelled_by(gone), pytest.raises(ClientGone):
            backend.forward(step.tensors, step.meta | {"keep_graph": False}, "leaving")
    finally:
        hook.remove()
    out, _ = backend.forward(step.tensors, step.meta | {"keep_graph": False}, "staying")

    # Assert: it stopped after one layer, and the model serves the next party
    assert len(layers) == 1
    assert torch.isfinite(out["output"]).all()


def test_a_prefill_gives_way_to_one_forward_of_steps_and_no_more():
    # Prepare: a prefill queued before two other parties' steps; while those steps run, another
    # step comes
    order: list[str] = []
    scheduler = Scheduler(max_rows=8, max_keys=1000)

    def step(party: str) -> Job:
        work = FakeStep(party)
        return Job(party, urgent=True, prepare=lambda: work)

    late = step("d")

    def merge(works: list) -> list:
        if not order:
            scheduler.enqueue(late)
        order.append("+".join(w.party for w in works))
        return [None] * len(works)

    scheduler.merge = merge
    prefill = Job("a", urgent=True, run=lambda: order.append("prefill a"))

    # Execute
    with scheduler.busy:
        threads = _queue_while_held(scheduler, [prefill, step("b"), step("c")])
    for thread in threads:
        thread.join(timeout=10)
    late.done.wait(10)

    # Assert: the steps ran before the prefill queued ahead of them, and the prefill before the
    # step that came while they ran
    assert order == ["b+c", "prefill a", "d"]
