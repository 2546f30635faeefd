"""Unit tests of the broker alone, driven through fake connections."""
import random
import time

import gevent
import orjson
import pytest

import deputy_server
from deputy_server import (
    FINISHED, QUEUED, Broker, Job, JobQueue, Peer, ProtocolError, do_tail, parse_did, parse_do)


class FakeLink:
    """Records what the broker sends to one connection."""

    def __init__(self):
        self.sent = []
        self.pieces = []
        self.closed = False

    def send(self, data):
        assert data.endswith(b"\r\n")
        self.sent.append(orjson.loads(data))

    send_now = send

    def send_many(self, pieces):
        self.pieces.append(pieces)
        self.send(b"".join(pieces))

    def close(self):
        self.closed = True

    def take(self):
        sent, self.sent = self.sent, []
        return sent


def wait_for(condition, seconds=5):
    """Let the loop run (timers fire) until condition() holds, within seconds:
    a fixed sleep is too short on a busy machine."""
    with gevent.Timeout(seconds):
        while not condition():
            gevent.sleep(0.001)


def sub(id, type="echo", arg=None, **options):
    """The job a `do` message with these fields becomes."""
    msg = dict({"cmd": "do", "id": id, "type": type, "arg": arg}, **options)
    return parse_do(msg, orjson.dumps(msg))


@pytest.fixture
def broker():
    return Broker(max_attempts=3)


def peer(broker):
    link = FakeLink()
    return broker.connect(Peer(link)), link


def worker(broker, types=("echo",), capacity=None):
    p, link = peer(broker)
    broker.can_do(p, list(types), capacity)
    return p, link


def answer_the_job_handed_out(broker, w, wl, res_json):
    """The worker w was handed exactly one job: answer it with res_json."""
    [do] = wl.take()
    broker.did(w, do["id"], res_json, None)
    return do


def test_jobs_of_one_type_go_out_in_submission_order(broker):
    client, _ = peer(broker)
    for i in range(5):
        broker.submit(client, sub(i, arg=i))
    w, wl = worker(broker, capacity=5)
    assert [m["arg"] for m in wl.take()] == [0, 1, 2, 3, 4]


def test_a_job_goes_to_the_worker_waiting_longest(broker):
    first, first_link = worker(broker)
    second, second_link = worker(broker)
    client, _ = peer(broker)
    broker.submit(client, sub(1))
    assert len(first_link.take()) == 1 and second_link.take() == []
    broker.submit(client, sub(2))
    assert len(second_link.take()) == 1


def test_capacity_limits_jobs_held_and_the_latest_value_wins(broker):
    w, wl = worker(broker, capacity=2)
    client, cl = peer(broker)
    for i in range(4):
        broker.submit(client, sub(i))
    handed = wl.take()
    assert len(handed) == 2
    broker.can_do(w, [], capacity=3)
    assert len(wl.take()) == 1
    broker.did(w, handed[0]["id"], b"1", None)
    assert len(wl.take()) == 1
    assert cl.take() == [{"cmd": "did", "id": 0, "res": 1}]


def test_result_goes_to_the_submitter_under_its_own_id(broker):
    w, wl = worker(broker)
    client, cl = peer(broker)
    broker.submit(client, sub("mine", arg={"a": 1}))
    job = wl.take()[0]
    assert job["arg"] == {"a": 1} and job["type"] == "echo"
    broker.did(w, job["id"], b'"ok"', None)
    assert cl.take() == [{"cmd": "did", "id": "mine", "res": "ok"}]
    broker.submit(client, sub("mine"))      # the id is free again


def test_duplicate_unfinished_id_is_refused_and_the_first_job_stays(broker):
    client, cl = peer(broker)
    broker.submit(client, sub(7, arg="first"))
    with pytest.raises(ProtocolError) as refused:
        broker.submit(client, sub(7, arg="second"))
    assert refused.value.id == 7
    w, wl = worker(broker, capacity=2)
    assert [m["arg"] for m in wl.take()] == ["first"]


def test_did_for_a_job_not_held_changes_nothing(broker):
    w, wl = worker(broker)
    thief, _ = worker(broker, types=("other",))
    client, cl = peer(broker)
    broker.submit(client, sub(1))
    wid = wl.take()[0]["id"]
    with pytest.raises(ProtocolError) as refused:
        broker.did(thief, wid, b"1", None)
    assert refused.value.id == wid
    assert cl.take() == []
    broker.did(w, wid, b"2", None)
    assert cl.take() == [{"cmd": "did", "id": 1, "res": 2}]


def test_lost_worker_jobs_go_back_to_the_front_in_order(broker):
    client, cl = peer(broker)
    for i in range(4):
        broker.submit(client, sub(i, arg=i))
    w, wl = worker(broker, capacity=2)
    assert [m["arg"] for m in wl.take()] == [0, 1]
    broker.disconnect(w)
    assert broker.counters.jobs_reassigned == 2
    other, ol = worker(broker, capacity=4)
    assert [m["arg"] for m in ol.take()] == [0, 1, 2, 3]


def test_a_job_lost_max_attempts_times_fails(broker):
    client, cl = peer(broker)
    broker.submit(client, sub("x"))
    for attempt in range(3):
        w, wl = worker(broker)
        assert len(wl.take()) == 1
        broker.disconnect(w)
    reply = cl.take()
    assert len(reply) == 1 and reply[0]["id"] == "x" and "lost 3 times" in reply[0]["err"]
    assert broker.metrics()["jobs_queued"] == 0 and broker.metrics()["jobs_failed"] == 1


def test_the_failure_text_counts_lost_attempts_in_words():
    """With --max-attempts 1 the err reads "once", not "1 times"."""
    broker = Broker(max_attempts=1, default_ttr=0.01)
    client, cl = peer(broker)
    broker.submit(client, sub("lost"))
    w, wl = worker(broker)
    assert len(wl.take()) == 1
    broker.disconnect(w)
    assert cl.take()[0]["err"] == "job failed: its worker was lost once"
    w, wl = worker(broker)
    broker.submit(client, sub("late"))
    wait_for(lambda: cl.sent)               # past the default ttr of 10 ms
    assert cl.take()[0]["err"] == "job failed: 1 attempt lost, the last by running past its ttr"


def test_lost_submitter_queued_jobs_are_dropped_and_results_discarded(broker):
    client, cl = peer(broker)
    w, wl = worker(broker)
    broker.submit(client, sub(1))
    broker.submit(client, sub(2))
    wid = wl.take()[0]["id"]
    broker.disconnect(client)
    assert broker.counters.jobs_abandoned == 2
    assert broker.metrics()["jobs_queued"] == 0
    broker.did(w, wid, b"1", None)          # accepted, delivered to nobody
    assert wl.take() == [] and cl.take() == []
    assert broker.kinds["echo"].stats()["idle"] == 1


def test_paused_submitter_jobs_wait_and_others_go_first(broker):
    slow, sl = peer(broker)
    fast, fl = peer(broker)
    broker.submit(slow, sub("s1"))
    broker.submit(fast, sub("f1"))
    broker.pause(slow)
    w, wl = worker(broker)
    job = wl.take()[0]
    broker.did(w, job["id"], b"1", None)
    assert fl.take() == [{"cmd": "did", "id": "f1", "res": 1}]
    assert wl.take() == []                  # s1 is held back
    broker.resume(slow)
    assert len(wl.take()) == 1


def test_paused_worker_gets_no_job_until_resumed(broker):
    """...and does not count as idle meanwhile (README: metrics)."""
    w, wl = worker(broker)
    assert broker.kinds["echo"].stats()["idle"] == 1
    broker.pause(w)
    assert broker.kinds["echo"].stats()["idle"] == 0
    client, _ = peer(broker)
    broker.submit(client, sub(1))
    assert wl.take() == []
    broker.resume(w)
    assert len(wl.take()) == 1


def test_higher_priority_first_fifo_within_and_requeue_to_front_of_own_priority(broker):
    client, _ = peer(broker)
    broker.submit(client, sub("low", priority=-1))
    broker.submit(client, sub("a", priority=5))
    broker.submit(client, sub("b", priority=5))
    broker.submit(client, sub("mid"))
    w, wl = worker(broker)
    first = wl.take()[0]
    assert first["arg"] is None
    broker.disconnect(w)
    w2, wl2 = worker(broker, capacity=4)
    jobs = [w2.held[m["id"]].owner_id for m in wl2.take()]
    assert jobs == ["a", "b", "mid", "low"]


def test_unique_submissions_share_one_execution(broker):
    a, al = peer(broker)
    b, bl = peer(broker)
    broker.submit(a, sub(1, unique="k", arg="first"))
    broker.submit(b, sub(9, unique="k", arg="second"))
    assert broker.counters.jobs_coalesced == 1
    w, wl = worker(broker, capacity=2)
    handed = wl.take()
    assert [m["arg"] for m in handed] == ["first"]
    broker.did(w, handed[0]["id"], b'"r"', None)
    assert al.take() == [{"cmd": "did", "id": 1, "res": "r"}]
    assert bl.take() == [{"cmd": "did", "id": 9, "res": "r"}]


def test_a_joined_submitter_leaving_does_not_cancel_for_the_others(broker):
    a, al = peer(broker)
    b, bl = peer(broker)
    w, wl = worker(broker)
    broker.submit(a, sub(1, unique="k"))
    broker.submit(b, sub(2, unique="k"))
    wid = wl.take()[0]["id"]
    broker.disconnect(a)
    broker.did(w, wid, b"5", None)
    assert bl.take() == [{"cmd": "did", "id": 2, "res": 5}]


def test_cancel_of_a_running_job_tells_the_worker_and_frees_its_slot(broker):
    client, cl = peer(broker)
    w, wl = worker(broker)
    broker.submit(client, sub(1))
    broker.submit(client, sub(2))
    wid = wl.take()[0]["id"]
    broker.cancel(client, 1)
    sent = wl.take()
    assert sent[0] == {"cmd": "cancel", "id": wid}
    assert sent[1]["cmd"] == "do"           # slot freed: the next job
    assert cl.take() == [{"cmd": "did", "id": 1, "err": "cancelled"}]
    with pytest.raises(ProtocolError):
        broker.did(w, wid, b"1", None)


def test_ttr_takes_a_job_back_and_a_late_did_is_refused(broker):
    client, cl = peer(broker)
    w, wl = worker(broker)
    broker.submit(client, sub(1, ttr=0.01))
    wid = wl.take()[0]["id"]
    wait_for(lambda: len(wl.sent) >= 2)
    sent = wl.take()
    assert sent[0] == {"cmd": "cancel", "id": wid}
    assert sent[1]["cmd"] == "do" and sent[1]["id"] != wid
    with pytest.raises(ProtocolError):
        broker.did(w, wid, b"1", None)
    assert broker.counters.jobs_reassigned >= 1
    wait_for(lambda: cl.sent)               # each expiry is a lost attempt
    reply = cl.take()
    assert len(reply) == 1 and reply[0]["err"] == "job failed: 3 attempts lost, the last by running past its ttr"


def test_a_ttr_counts_from_the_hand_out_even_late_in_a_long_loop_turn(broker):
    """The event loop reads the clock once per turn: a timer started late in
    a long turn (time.sleep stands for one) must not count from its start."""
    client, cl = peer(broker)
    w, wl = worker(broker)
    gevent.sleep(0.01)
    time.sleep(0.5)                 # this turn of the loop began 0.5 s ago
    handed_out = time.monotonic()
    broker.submit(client, sub(1, ttr=0.3))
    wid = wl.take()[0]["id"]
    give_up = handed_out + 5
    while not wl.sent and time.monotonic() < give_up:
        gevent.sleep(0.01)
    assert wl.take()[:1] == [{"cmd": "cancel", "id": wid}]
    assert time.monotonic() - handed_out >= 0.28


def test_timeout_answers_the_submitter_and_drops_the_job(broker):
    client, cl = peer(broker)
    broker.submit(client, sub(1, timeout=0.01))
    wait_for(lambda: cl.sent)
    assert cl.take() == [{"cmd": "did", "id": 1, "err": "timeout"}]
    w, wl = worker(broker)
    assert wl.take() == []
    assert broker.counters.jobs_timed_out == 1 and broker.metrics()["jobs_queued"] == 0


def test_background_job_is_acknowledged_and_survives_its_submitter(broker):
    client, cl = peer(broker)
    broker.submit(client, sub(1, bg=True))
    assert cl.take() == [{"cmd": "queued", "id": 1}]
    broker.submit(client, sub(1, bg=True))  # the id is free again
    broker.disconnect(client)
    w, wl = worker(broker, capacity=2)
    handed = wl.take()
    assert len(handed) == 2
    broker.did(w, handed[0]["id"], b"1", None)
    assert broker.metrics()["jobs_done"] == 1


def test_release_puts_the_job_back_without_counting_an_attempt(broker):
    client, cl = peer(broker)
    w, wl = worker(broker)
    other, ol = worker(broker, types=("echo",))
    broker.submit(client, sub(1))
    broker.submit(client, sub(2))
    broker.submit(client, sub(3))
    wid = wl.take()[0]["id"]
    ol.take()
    broker.release(w, wid)
    assert broker.counters.jobs_released == 1 and broker.counters.jobs_reassigned == 0
    again = wl.take()
    assert len(again) == 1 and again[0]["id"] != wid


def test_draining_refuses_new_jobs_and_hands_out_none(broker):
    client, cl = peer(broker)
    w, wl = worker(broker)
    broker.submit(client, sub(1))
    broker.submit(client, sub(2))
    wid = wl.take()[0]["id"]
    broker.start_draining()
    with pytest.raises(ProtocolError) as refused:
        broker.submit(client, sub(3))
    assert refused.value.text == "draining" and refused.value.id == 3
    assert not broker.drained.is_set()
    broker.did(w, wid, b"1", None)
    assert wl.take() == []
    assert broker.drained.is_set()


@pytest.mark.parametrize("last", ["a", "b"])
def test_a_drain_ends_when_the_last_running_job_of_any_type_ends(broker, last):
    """check_drained looks only at the types still running when the drain
    began, whichever of them finishes last."""
    client, _ = peer(broker)
    wa, wal = worker(broker, types=("a",))
    wb, wbl = worker(broker, types=("b",))
    broker.submit(client, sub(1, type="a"))
    broker.submit(client, sub(2, type="b"))
    broker.submit(client, sub(3, type="idle-type"))
    broker.start_draining()
    first, then = ((wb, wbl), (wa, wal)) if last == "a" else ((wa, wal), (wb, wbl))
    broker.did(first[0], first[1].take()[0]["id"], b"1", None)
    assert not broker.drained.is_set()
    broker.did(then[0], then[1].take()[0]["id"], b"1", None)
    assert broker.drained.is_set()


def test_dead_queue_entries_are_compacted(broker):
    client, _ = peer(broker)
    for i in range(3000):
        broker.submit(client, sub(i))
    broker.disconnect(client)
    queue = broker.kinds["echo"].queue
    assert sum(len(jobs) for jobs in queue.by_priority.values()) < 3000
    w, wl = worker(broker)
    assert wl.take() == []


def test_a_can_do_beyond_max_types_is_refused_and_changes_nothing():
    broker = Broker(max_types=3)
    w, wl = worker(broker, types=("a", "b"))
    with pytest.raises(ProtocolError, match="at most 3 types"):
        broker.can_do(w, ["c", "d", "a"], capacity=5)
    assert [kind.name for kind in w.kinds] == ["a", "b"] and w.capacity == 1
    broker.can_do(w, ["a", "c", "c"])       # the ones it has, and repeats, do not count
    assert [kind.name for kind in w.kinds] == ["a", "b", "c"]


def test_a_workers_list_of_types_follows_its_can_do_and_cant_do(broker):
    """The tuple the hot path walks stays the dict's keys, in order, and a
    job goes to the worker exactly when it can do the job's type now."""
    rng = random.Random(3)
    w, wl = worker(broker, types=(), capacity=100)
    for _ in range(300):
        names = rng.sample("abcdefgh", rng.randint(0, 3))
        if rng.random() < 0.6:
            broker.can_do(w, names)
        else:
            broker.cant_do(w, names)
        assert w.kind_list == tuple(w.kinds)
    client, _ = peer(broker)
    for number, name in enumerate("abcdefgh"):
        broker.submit(client, sub(number, type=name))
    able = [kind.name for kind in w.kinds]
    assert 0 < len(able) < 8
    assert sorted(do["type"] for do in wl.take()) == sorted(able)


def test_metrics_count_types_seen(broker):
    client, _ = peer(broker)
    broker.submit(client, sub(1, type="resize"))
    w, wl = worker(broker, types=("thumb",))
    m = broker.metrics()
    assert m["types"]["resize"]["queued"] == 1
    assert m["types"]["thumb"] == {"queued": 0, "running": 0, "workers": 1, "idle": 1,
                                   "done": 0, "failed": 0}
    assert m["workers"] == 1 and m["connections_open"] == 2


def test_a_coalesced_job_set_aside_for_its_paused_owner_survives_the_owner(broker):
    a, _ = peer(broker)
    b, bl = peer(broker)
    broker.submit(a, sub("a1", unique="k"))
    broker.pause(a)
    w, wl = worker(broker)
    assert wl.take() == []                  # set aside: only paused a waits for it
    broker.submit(b, sub("b1", unique="k"))         # b joins: it goes ahead for b
    handed = wl.take()
    assert len(handed) == 1
    broker.disconnect(a)                    # the owner leaves; b still waits
    broker.did(w, handed[0]["id"], b"8", None)
    assert bl.take() == [{"cmd": "did", "id": "b1", "res": 8}]
    assert broker.metrics()["jobs_queued"] == 0 and broker.metrics()["jobs_running"] == 0


def test_a_set_aside_unique_job_whose_owner_leaves_leaves_no_zombie(broker):
    a, _ = peer(broker)
    d, dl = peer(broker)
    broker.submit(a, sub("a1", unique="k"))
    broker.pause(a)
    w, wl = worker(broker)
    assert wl.take() == []
    broker.disconnect(a)
    assert broker.metrics()["jobs_queued"] == 0
    broker.submit(d, sub("d1", unique="k"))         # a new job, not a dead one
    handed = wl.take()
    assert len(handed) == 1
    broker.did(w, handed[0]["id"], b"1", None)
    assert dl.take() == [{"cmd": "did", "id": "d1", "res": 1}]


def test_a_set_aside_job_whose_owner_leaves_is_dropped_not_stuck(broker):
    a, _ = peer(broker)
    broker.submit(a, sub(1))
    broker.submit(a, sub(2, bg=True))
    broker.pause(a)
    w, wl = worker(broker, capacity=2)
    assert len(wl.take()) == 1              # the bg job goes; job 1 is set aside
    broker.cancel(a, 1)
    assert broker.metrics()["jobs_queued"] == 0
    broker.disconnect(a)
    assert broker.metrics()["types"]["echo"]["queued"] == 0


def test_a_worker_of_many_types_and_a_huge_capacity_gets_its_jobs_over_several_turns(broker):
    """One can_do of 10,000 types with capacity 10**9, with jobs queued,
    stalled the server for 20 s (each job scanned every type): the types
    with jobs are found once, and HAND_OUT_PER_TURN jobs go out a turn, so
    another worker is served in between."""
    per_turn = deputy_server.HAND_OUT_PER_TURN
    client, cl = peer(broker)
    count = per_turn * 2 + 5
    for n in range(count):
        broker.submit(client, sub(n))
    types = ["junk%d" % n for n in range(deputy_server.FEW_TYPES * 4)] + ["echo"]
    big, bl = worker(broker, types, capacity=10 ** 9)
    assert len(big.held) == per_turn            # the rest next turn
    other, ol = worker(broker, ["other"])
    broker.submit(client, sub("o", type="other"))
    [do] = ol.take()                            # served before big's next turn
    assert len(big.held) == per_turn
    wait_for(lambda: len(big.held) == count)
    assert [m["arg"] for m in bl.take()] == [None] * count
    assert [big.held[w].owner_id for w in sorted(big.held)] == list(range(count))   # in order


def test_a_worker_of_many_types_gets_the_highest_priority_then_oldest_job_across_them(broker):
    """Its hand-out goes through a heap of each type's head (one look per
    type, not one per job): the order is still SPEC 2's, also past a turn."""
    client, _ = peer(broker)
    types = ["t%d" % n for n in range(deputy_server.FEW_TYPES * 3)]
    count = deputy_server.HAND_OUT_PER_TURN + 200
    for n in range(count):
        broker.submit(client, sub(n, type=types[n * 7 % len(types)], priority=n % 3))
    big, _ = worker(broker, types, capacity=10 ** 9)
    wait_for(lambda: len(big.held) == count)
    got = [job.owner_id for _, job in sorted(big.held.items())]      # in hand-out order
    assert got[:deputy_server.HAND_OUT_PER_TURN] == sorted(
        range(count), key=lambda n: (-(n % 3), n))[:deputy_server.HAND_OUT_PER_TURN]
    assert sorted(got) == list(range(count))


def test_a_queue_kicked_to_an_idle_worker_of_huge_capacity_goes_out_over_several_turns(broker):
    """kick() too: a paused submitter's set-aside jobs come back when it
    drains, and an idle worker of capacity 10**9 takes them a turn's worth
    at a time."""
    per_turn = deputy_server.HAND_OUT_PER_TURN
    big, bl = worker(broker, ["echo"], capacity=10 ** 9)
    slow, _ = peer(broker)
    broker.pause(slow)
    count = per_turn * 2 + 5
    for n in range(count):
        broker.submit(slow, sub(n))
    assert big.held == {}
    broker.resume(slow)
    assert len(big.held) == per_turn
    wait_for(lambda: len(big.held) == count)
    assert sorted(job.owner_id for job in big.held.values()) == list(range(count))


def test_a_worker_that_leaves_before_its_next_turn_is_given_nothing_more(broker):
    per_turn = deputy_server.HAND_OUT_PER_TURN
    client, cl = peer(broker)
    for n in range(per_turn + 5):
        broker.submit(client, sub(n))
    big, bl = worker(broker, ["junk%d" % n for n in range(40)] + ["echo"], capacity=10 ** 9)
    assert len(big.held) == per_turn
    for _ in broker.leave(big):
        pass
    gevent.sleep(0.01)
    assert broker.metrics()["jobs_queued"] == per_turn + 5 and big.held == {}


def test_unused_types_are_forgotten_beyond_a_bound_and_their_counts_stay_in_the_totals(
        broker, monkeypatch):
    """Type names came for ever: can_do and cant_do of fresh names grew the
    server by 900 bytes a name. Types with no job and no worker are kept up
    to KEEP_UNUSED_TYPES, the newest; the others are never forgotten."""
    monkeypatch.setattr(deputy_server, "KEEP_UNUSED_TYPES", 5)
    client, cl = peer(broker)
    busy, bl = worker(broker, ["busy"])             # a worker: kept
    broker.submit(client, sub("q", type="queued"))  # a queued job: kept
    for n in range(3):                              # done jobs: counted, then unused
        w, wl = worker(broker, ["done%d" % n])
        broker.submit(client, sub("d%d" % n, type="done%d" % n))
        answer_the_job_handed_out(broker, w, wl, b"1")
        broker.cant_do(w, ["done%d" % n])
    for n in range(40):
        w, _ = worker(broker, ["junk%d" % n])
        broker.cant_do(w, ["junk%d" % n])
    m = broker.metrics()
    unused = [t for t, f in m["types"].items() if not (f["queued"] or f["running"] or f["workers"])]
    assert "busy" in m["types"] and "queued" in m["types"]
    assert len(unused) <= 2 * 5 + 1                 # swept every 5 new ones, the newest kept
    assert "junk39" in m["types"] and "junk0" not in m["types"]
    assert m["jobs_done"] == 3 and m["jobs_queued"] == 1
    broker.submit(client, sub("b", type="busy"))    # still works for the kept ones
    assert bl.take()[0]["type"] == "busy"


def test_types_with_long_names_are_forgotten_by_their_bytes_too(broker, monkeypatch):
    monkeypatch.setattr(deputy_server, "KEEP_UNUSED_TYPE_BYTES", 10000)
    for n in range(50):
        w, _ = worker(broker, ["%04d" % n + "x" * 1000])
        broker.cant_do(w, ["%04d" % n + "x" * 1000])
    names = broker.metrics()["types"]
    assert sum(map(len, names)) <= 2 * 10000 + 1004
    assert "0049" + "x" * 1000 in names


def test_a_long_run_of_a_paused_connections_jobs_is_set_aside_over_several_turns(broker):
    """Setting aside 200,000 queued jobs in one go stalled everyone for
    400 ms: a bounded number per turn, and the job behind them goes out
    once the run is set aside."""
    slow, _ = peer(broker)
    fast, fl = peer(broker)
    count = deputy_server.SET_ASIDE_PER_TURN * 3
    for n in range(count):
        broker.submit(slow, sub(n))
    broker.submit(fast, sub("f"))
    broker.pause(slow)
    w, wl = worker(broker)
    assert wl.take() == [] and len(slow.held_back) == deputy_server.SET_ASIDE_PER_TURN
    wait_for(lambda: w.held)
    [do] = wl.take()
    assert w.held[do["id"]].owner is fast and len(slow.held_back) == count
    broker.did(w, do["id"], b"1", None)
    assert fl.take() == [{"cmd": "did", "id": "f", "res": 1}]
    broker.resume(slow)             # all back, in their order
    assert not slow.held_back
    assert [w.held[m["id"]].owner_id for m in wl.take()] == [0]


def test_a_connection_leaves_in_steps_and_none_of_its_jobs_goes_out_meanwhile(broker):
    """Dropping a million queued jobs at once stalled everyone for 0.8 s:
    leave() pauses every LEAVE_PER_TURN jobs; meanwhile the departed
    connection's jobs are never handed out (SPEC 2.6), others' are."""
    leaving, _ = peer(broker)
    other, ol = peer(broker)
    count = deputy_server.LEAVE_PER_TURN * 2 + 10
    for n in range(count):
        broker.submit(leaving, sub(n))
    broker.submit(other, sub("o"))
    steps = broker.leave(leaving)
    next(steps)
    assert 0 < broker.counters.jobs_abandoned < count
    broker.resume(leaving)          # its output drained meanwhile: it stays paused
    w, wl = worker(broker)
    wait_for(lambda: w.held)        # a set-aside that needs more turns gets them
    [do] = wl.take()
    assert w.held[do["id"]].owner is other
    broker.did(w, do["id"], b"1", None)
    assert wl.take() == []
    for _ in steps:
        pass
    m = broker.metrics()
    assert m["jobs_abandoned"] == count and m["jobs_queued"] == 0 and leaving.jobs == {}


def test_a_running_job_of_a_connection_leaving_in_steps_is_abandoned_at_once(broker):
    """Its result must not reach it between leave()'s steps (SPEC 2.6)."""
    leaving, ll = peer(broker)
    w, wl = worker(broker)
    broker.submit(leaving, sub("r"))
    [do] = wl.take()
    for n in range(deputy_server.LEAVE_PER_TURN * 2):
        broker.submit(leaving, sub(n, type="nobody"))
    steps = broker.leave(leaving)
    next(steps)
    assert broker.counters.jobs_abandoned >= 1
    broker.did(w, do["id"], b"1", None)
    assert ll.take() == []
    for _ in steps:
        pass
    assert broker.metrics()["jobs_abandoned"] == deputy_server.LEAVE_PER_TURN * 2 + 1


def test_a_job_only_one_paused_connection_waits_for_is_set_aside_however_often_it_joined(broker):
    """SPEC 5: joining its own unique job must not let a paused connection
    make results pile up that it does not read."""
    slow, sl = peer(broker)
    broker.submit(slow, sub(1, unique="k"))
    broker.submit(slow, sub("again", unique="k"))
    broker.pause(slow)
    w, wl = worker(broker)
    assert wl.take() == []
    assert broker.metrics()["types"]["echo"]["queued"] == 1
    broker.resume(slow)
    wid = wl.take()[0]["id"]
    broker.did(w, wid, b"5", None)
    assert sorted(sl.take(), key=lambda m: str(m["id"])) == [
        {"cmd": "did", "id": 1, "res": 5}, {"cmd": "did", "id": "again", "res": 5}]


def test_a_job_several_paused_connections_wait_for_waits_for_them_all_to_drain(broker):
    a, al = peer(broker)
    b, bl = peer(broker)
    broker.submit(a, sub("a", unique="k"))
    broker.submit(b, sub("b", unique="k"))
    broker.pause(a)
    broker.pause(b)
    w, wl = worker(broker)
    broker.resume(a)            # b is still paused: a's share is split off and goes
    handed = wl.take()
    assert len(handed) == 1
    broker.did(w, handed[0]["id"], b"1", None)
    assert al.take() == [{"cmd": "did", "id": "a", "res": 1}] and bl.take() == []
    broker.resume(b)            # b gets a run of its own
    handed = wl.take()
    assert len(handed) == 1
    broker.did(w, handed[0]["id"], b"2", None)
    assert bl.take() == [{"cmd": "did", "id": "b", "res": 2}]
    m = broker.metrics()
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0


def test_a_paused_joiner_gets_a_run_of_its_own_and_holds_no_result_meanwhile(broker):
    """A job others wait for goes ahead without its paused submitters; each
    gets one result of its own, under its own id, once it drains."""
    fast, fl = peer(broker)
    slow, sl = peer(broker)
    broker.submit(fast, sub("f", arg="work", unique="k", priority=3))
    broker.submit(slow, sub("s", unique="k"))
    broker.pause(slow)
    w, wl = worker(broker)
    do = answer_the_job_handed_out(broker, w, wl, b'"first"')
    assert fl.take() == [{"cmd": "did", "id": "f", "res": "first"}]
    assert sl.take() == []                  # nothing piled up for the paused one
    assert broker.metrics()["types"]["echo"]["queued"] == 1
    broker.resume(slow)
    [again] = wl.take()
    assert again["arg"] == "work" and again["id"] != do["id"]
    assert w.held[again["id"]].priority == 3
    broker.did(w, again["id"], b'"second"', None)
    assert sl.take() == [{"cmd": "did", "id": "s", "res": "second"}]
    m = broker.metrics()
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0 and m["jobs_done"] == 2


def test_a_paused_owner_of_a_job_others_joined_is_split_off_too(broker):
    slow, sl = peer(broker)
    fast, fl = peer(broker)
    broker.submit(slow, sub("s", unique="k"))
    broker.submit(fast, sub("f", unique="k"))
    broker.pause(slow)
    w, wl = worker(broker)
    answer_the_job_handed_out(broker, w, wl, b"1")
    assert fl.take() == [{"cmd": "did", "id": "f", "res": 1}] and sl.take() == []
    broker.submit(fast, sub("f2", unique="k"))      # the key is free again: a new job
    answer_the_job_handed_out(broker, w, wl, b"2")
    assert fl.take() == [{"cmd": "did", "id": "f2", "res": 2}]
    broker.resume(slow)
    answer_the_job_handed_out(broker, w, wl, b"3")
    assert sl.take() == [{"cmd": "did", "id": "s", "res": 3}]


def test_a_paused_joiner_of_a_background_job_is_split_off(broker):
    submitter, _ = peer(broker)
    slow, sl = peer(broker)
    broker.submit(submitter, sub("bg", unique="k", bg=True))
    broker.submit(slow, sub("s", unique="k"))
    broker.pause(slow)
    w, wl = worker(broker)
    answer_the_job_handed_out(broker, w, wl, b"1")      # the bg job goes
    assert sl.take() == []
    broker.resume(slow)
    answer_the_job_handed_out(broker, w, wl, b"2")
    assert sl.take() == [{"cmd": "did", "id": "s", "res": 2}]


def test_a_split_off_job_is_cancelled_timed_out_or_abandoned_like_any_other(broker):
    fast, _ = peer(broker)
    slow, sl = peer(broker)
    for n in range(3):
        broker.submit(fast, sub("f%d" % n, unique="k%d" % n))
        broker.submit(slow, sub(n, unique="k%d" % n, timeout=60))
    broker.pause(slow)
    w, wl = worker(broker, capacity=3)
    assert len(wl.take()) == 3              # they go ahead for fast
    assert broker.metrics()["types"]["echo"]["queued"] == 3     # slow's own, set aside
    broker.cancel(slow, 0)
    assert sl.take() == [{"cmd": "did", "id": 0, "err": "cancelled"}]
    broker.deadline_passed(slow, 1)
    assert sl.take() == [{"cmd": "did", "id": 1, "err": "timeout"}]
    assert broker.metrics()["types"]["echo"]["queued"] == 1
    broker.disconnect(slow)
    m = broker.metrics()
    assert m["types"]["echo"]["queued"] == 0 and m["jobs_abandoned"] == 1
    broker.resume(slow)                     # too late: nothing is handed out for it
    assert wl.take() == []


def a_job_set_aside_for_two_paused_submitters(broker):
    """An owner and a joiner of one unique job, both paused, and an idle
    worker: the job is set aside."""
    owner, ol = peer(broker)
    joiner, jl = peer(broker)
    broker.submit(owner, sub("o", unique="k"))
    broker.submit(joiner, sub("j", unique="k"))
    broker.pause(owner)
    broker.pause(joiner)
    w, wl = worker(broker)
    assert wl.take() == []
    return (owner, ol), (joiner, jl), (w, wl)


def test_a_job_set_aside_for_a_submitter_that_cancels_goes_ahead_for_the_others(broker):
    """(Found by the model check below.) Set aside while its owner and a
    joiner are both paused; the owner cancels: the job goes to the idle
    worker as soon as the joiner drains, not never."""
    (owner, _), (joiner, jl), (w, wl) = a_job_set_aside_for_two_paused_submitters(broker)
    broker.cancel(owner, "o")
    assert wl.take() == []          # the joiner is still paused
    broker.resume(joiner)
    answer_the_job_handed_out(broker, w, wl, b"1")
    assert jl.take() == [{"cmd": "did", "id": "j", "res": 1}]


def test_a_paused_joiner_that_drains_first_is_not_stuck_behind_a_paused_owner(broker):
    """Whichever of the paused submitters drains first gets the job run; the
    one still paused gets a run of its own once it drains."""
    (owner, ol), (joiner, jl), (w, wl) = a_job_set_aside_for_two_paused_submitters(broker)
    broker.resume(joiner)
    answer_the_job_handed_out(broker, w, wl, b"1")
    assert jl.take() == [{"cmd": "did", "id": "j", "res": 1}] and ol.take() == []
    assert owner.held_back and not joiner.held_back
    broker.resume(owner)
    answer_the_job_handed_out(broker, w, wl, b"2")
    assert ol.take() == [{"cmd": "did", "id": "o", "res": 2}]
    m = broker.metrics()
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0 and owner.held_back == {}


def test_a_departing_connection_that_joined_one_job_twice_leaves_nothing_behind(broker):
    """(Found by the model check below.) Its first id's detach lets the job
    go ahead for another submitter and splits off a job of its own for the
    second id: that one is dropped too, not left set aside for nobody."""
    twice, _ = peer(broker)
    other, ol = peer(broker)
    broker.submit(twice, sub("a", unique="k"))
    broker.submit(twice, sub("b", unique="k"))
    broker.submit(other, sub("o", unique="k"))
    broker.pause(twice)
    broker.pause(other)
    w, wl = worker(broker)
    assert wl.take() == []          # set aside for both
    broker.disconnect(twice)
    assert wl.take() == []          # other is still paused
    broker.resume(other)
    answer_the_job_handed_out(broker, w, wl, b"1")
    assert ol.take() == [{"cmd": "did", "id": "o", "res": 1}]
    m = broker.metrics()
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0 and twice.held_back == {}


def check_set_aside_and_idle(broker, submitters):
    """The invariants of backpressure: a job is set aside exactly under its
    submitters, all of them paused; a kind with an idle worker has no job in
    its queue that could go; every queued job is in a queue or set aside."""
    set_aside = {}
    for client, _ in submitters:
        for job in client.held_back:
            set_aside[job] = None
    for job in set_aside:
        waiting = list(dict.fromkeys(entry[0] for entry in job.submitters()))
        assert list(job.held_back) == waiting and not job.bg
        assert all(client.paused and job in client.held_back for client in waiting)
    for kind in broker.kinds.values():
        live = [job for jobs in kind.queue.by_priority.values() for job in jobs
                if job.state == QUEUED]
        assert not (kind.idle and live)
        aside = [job for job in set_aside if job.kind is kind]
        assert kind.queued == len(live) + len(aside)


@pytest.mark.parametrize("seed", range(500))
def test_random_pauses_joins_and_losses_still_give_each_submission_one_result(seed):
    """A model check of backpressure with unique: random submissions (some
    joining each other, some bg), pauses, resumes, results, releases, lost
    workers, cancels and departures; then everyone drains and every job is
    answered. Each submission still waiting gets exactly one did, nothing
    stays queued, running or set aside; check_set_aside_and_idle holds after
    every step."""
    rng = random.Random(seed)
    broker = Broker(max_attempts=100)
    submitters = [peer(broker) for _ in range(3)]
    workers = []

    def add_worker():
        workers.append(worker(broker, capacity=rng.choice([1, 2])))

    add_worker()
    waiting, gone, dids = set(), set(), {}

    def read_results():
        for index, (_, link) in enumerate(submitters):
            for msg in link.take():
                key = (index, msg["id"])
                dids[key] = dids.get(key, 0) + 1

    for number in range(60):
        index = rng.randrange(len(submitters))
        client = submitters[index][0]
        if index in gone:
            continue
        choice = rng.random()
        if choice < 0.35:
            options = {}
            if rng.random() < 0.8:
                options["unique"] = rng.choice("abc")
            if rng.random() < 0.1:
                options["bg"] = True
            broker.submit(client, sub(number, **options))
            if not options.get("bg"):
                waiting.add((index, number))
        elif choice < 0.5:
            broker.pause(client)
        elif choice < 0.6:
            if client.paused:
                broker.resume(client)
        elif choice < 0.8:
            w, wl = rng.choice([entry for entry in workers if not entry[0].closed])
            wl.take()
            if w.held:
                wid = rng.choice(list(w.held))
                roll = rng.random()
                if roll < 0.7:
                    broker.did(w, wid, b"1", None)
                elif roll < 0.85:
                    broker.release(w, wid)
                else:
                    broker.disconnect(w)
                    add_worker()
        elif choice < 0.88:
            mine = [key[1] for key in waiting if key[0] == index and key[1] in client.jobs]
            if mine:
                broker.cancel(client, rng.choice(mine))
        elif choice < 0.92:
            broker.disconnect(client)
            gone.add(index)
        read_results()
        check_set_aside_and_idle(broker, submitters)
    for index, (client, _) in enumerate(submitters):
        if client.paused and index not in gone:
            broker.resume(client)
    for _ in range(200):
        answered = 0
        for w, wl in workers:
            wl.take()
            for wid in list(w.held):
                broker.did(w, wid, b"1", None)
                answered += 1
        if not answered:
            break
    read_results()
    assert all(count == 1 for count in dids.values())
    assert all(dids.get(key) == 1 for key in waiting if key[0] not in gone)
    m = broker.metrics()
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0
    for index, (client, _) in enumerate(submitters):
        if index not in gone:
            assert client.jobs == {} and client.held_back == {}


def test_progress_for_a_paused_submitter_is_dropped(broker):
    client, cl = peer(broker)
    w, wl = worker(broker)
    broker.submit(client, sub(1))
    wid = wl.take()[0]["id"]
    broker.progress(w, wid, b"1")
    broker.pause(client)
    broker.progress(w, wid, b"2")
    assert cl.take() == [{"cmd": "progress", "id": 1, "data": 1}]


def test_a_result_fanned_out_to_joined_submitters_is_shared_not_copied(broker):
    client, cl = peer(broker)
    for i in range(50):
        broker.submit(client, sub(i, unique="same"))
    w, wl = worker(broker)
    wid = wl.take()[0]["id"]
    value = b'"' + b"v" * 10000 + b'"'
    broker.did(w, wid, value, None)
    assert len(cl.take()) == 50
    assert all(pieces[1] is value for pieces in cl.pieces) and len(cl.pieces) == 49


def test_a_lost_submitter_job_it_held_itself_is_not_handed_out_again(broker):
    both, _ = worker(broker)
    other, ol = worker(broker)
    broker.submit(both, sub("own"))
    assert len(both.held) == 1 and ol.take() == []
    broker.disconnect(both)
    assert ol.take() == []
    assert broker.counters.jobs_reassigned == 0 and broker.metrics()["jobs_queued"] == 0


def test_a_released_job_of_a_lost_submitter_is_dropped(broker):
    client, _ = peer(broker)
    w1, wl1 = worker(broker)
    broker.submit(client, sub(1))
    wid = wl1.take()[0]["id"]
    broker.disconnect(client)
    w2, wl2 = worker(broker)
    broker.release(w1, wid)
    assert wl1.take() == [] and wl2.take() == []
    assert broker.metrics()["jobs_queued"] == 0


def test_many_distinct_priorities_keep_their_order(broker):
    client, _ = peer(broker)
    order = [5, -3, 9, 0, 9, 2, -3, 7] * 50
    for i, priority in enumerate(order):
        broker.submit(client, sub(i, priority=priority))
    for i in range(0, len(order), 3):
        broker.cancel(client, i)            # dead entries, some levels emptied
    w, wl = worker(broker, capacity=len(order))
    got = [w.held[m["id"]].owner_id for m in wl.take()]
    expected = sorted((i for i in range(len(order)) if i % 3),
                      key=lambda i: (-order[i], i))
    assert got == expected


def test_a_lost_job_nobody_waits_for_ends_without_failing_anyone():
    broker = Broker(max_attempts=1)
    client, cl = peer(broker)
    w, wl = worker(broker)
    broker.submit(client, sub(1))
    assert len(wl.take()) == 1
    broker.disconnect(client)               # abandoned while running
    broker.disconnect(w)                    # then its worker is lost
    assert broker.metrics()["jobs_failed"] == 0 and broker.counters.jobs_reassigned == 0
    assert broker.metrics()["jobs_running"] == 0 and broker.metrics()["jobs_queued"] == 0


def test_a_big_payload_is_handed_out_and_delivered_without_a_copy(broker):
    """Issue 4: no needless copies of payloads. A big arg goes to the worker
    as the bytes the job keeps (copied once, out of orjson's buffer), and a
    big result to the submitter as the bytes the protocol layer encoded, in
    a piece of their own."""
    client, cl = peer(broker)
    w, wl = worker(broker)
    broker.submit(client, sub(1, arg="x" * 100000))
    [job] = w.held.values()
    assert any(piece is job.arg_tail for piece in wl.pieces[-1])
    [do] = wl.take()
    assert do["arg"] == "x" * 100000
    result = orjson.dumps("y" * 100000)
    broker.did(w, do["id"], result, None)
    assert any(piece is result for piece in cl.pieces[-1])
    assert cl.take() == [{"cmd": "did", "id": 1, "res": "y" * 100000}]


def test_a_queued_payload_is_copied_into_a_right_sized_object(broker):
    """orjson's bytes keep a 4 KiB buffer each (more for big ones): a queued
    job keeps a copy of its own, the tail of the worker's `do`."""
    client, _ = peer(broker)
    for size in (5, 100000):
        for arg in ("x" * size, ["x" * size]):
            arg_json = orjson.dumps(arg)
            assert do_tail(arg_json) is not arg_json
            line = b'{"cmd":"do","id":"%d-%b","type":"echo","arg":%b}' % (size, type(arg).__name__.encode(), arg_json)
            job = parse_do(orjson.loads(line), line)
            broker.submit(client, job)
            queued = broker.kinds["echo"].queue.by_priority[0][-1]
            assert queued is job
            if size > 5 and type(arg) is str:       # as sent: a view of its line
                assert type(queued.arg_tail) is memoryview and queued.arg_tail.obj is line
            else:
                assert queued.arg_tail == arg_json + b"}\r\n"


def test_a_big_string_sliced_out_of_its_line_is_queued_and_delivered_as_sent(broker):
    """string_as_sent hands the broker views of the lines, and neither is
    copied: a queued arg goes to the worker as the view the job keeps, a
    result to the submitter as the view itself."""
    client, cl = peer(broker)
    body = b'"' + b"q" * 100000 + b'\\u00e9"'
    line = b'{"cmd":"do","id":7,"type":"echo","arg":%b}' % body
    job = parse_do(orjson.loads(line), line)
    assert type(job.arg_tail) is memoryview and job.arg_tail == body
    assert job.arg_tail.obj is line        # a view of the line, not a copy
    broker.submit(client, job)
    w, wl = worker(broker)
    assert any(piece is job.arg_tail for piece in wl.pieces[-1])
    [do] = wl.take()
    assert do["arg"] == "q" * 100000 + "\u00e9"
    did_line = b'{"cmd":"did","id":%d,"res":%b}\r' % (do["id"], body)
    wid, res_json, err = parse_did(orjson.loads(did_line), did_line)
    assert type(res_json) is memoryview and bytes(res_json) == body
    broker.did(w, wid, res_json, err)
    assert any(piece is res_json for piece in cl.pieces[-1])
    assert cl.take() == [{"cmd": "did", "id": 7, "res": "q" * 100000 + "\u00e9"}]


@pytest.mark.parametrize("seed", range(20))
def test_the_job_queue_gives_jobs_in_priority_then_arrival_order(seed, monkeypatch):
    """Against a plain model: pushes at new and old priorities (also
    after the head was looked up), jobs put back at the front, jobs dying
    in place (and the compactions that follow), and heads taken."""
    monkeypatch.setattr(deputy_server, "COMPACT_AFTER", 8)
    rng = random.Random(seed)
    queue, model = JobQueue(), []       # model: live jobs in the order due
    made = 0

    def due(job):
        return (-job.priority, job.seq)

    for _ in range(6000):
        action = rng.random()
        if action < 0.45:
            made += 1
            job = Job(made, "t", b"1")
            job.priority, job.seq = rng.choice([0, 0, 0, 1, 5, -3, rng.randint(-50, 50)]), made
            queue.push(job)
            model.append(job)
        elif action < 0.55 and model:           # a taken job returns to the front
            job = queue.head()
            queue.pop_head()
            model.remove(job)
            job.seq = -made                     # first among its priority
            queue.push_front(job)
            model.append(job)
        elif action < 0.7 and model:            # cancelled while queued
            for job in rng.sample(model, 1 if action < 0.69 else (len(model) + 1) // 2):
                job.state = FINISHED            # now and then half at once
                model.remove(job)
                queue.forget_one(len(model))
        else:
            model.sort(key=due)
            head = queue.head()
            assert head is (model[0] if model else None)
            if head is not None and rng.random() < 0.8:
                queue.pop_head()
                model.pop(0)
    model.sort(key=due)
    drained = []
    while queue.head() is not None:
        drained.append(queue.head())
        queue.pop_head()
    assert drained == model and all(job.state == QUEUED for job in drained)


def test_a_worker_given_queued_work_goes_to_the_back_of_the_idle_line(broker):
    """SPEC 2.2, longest-waiting worker first: a worker idle on one type
    that takes a queued job of a type it just added has not waited longest
    any more."""
    first, first_link = worker(broker, ("A",), capacity=2)
    second, second_link = worker(broker, ("A",), capacity=2)
    client, _ = peer(broker)
    broker.submit(client, sub(1, type="B"))
    broker.can_do(first, ["B"])
    assert [do["type"] for do in first_link.take()] == ["B"]
    broker.submit(client, sub(2, type="A", arg="second job"))
    assert first_link.take() == [] and [do["arg"] for do in second_link.take()] == ["second job"]
