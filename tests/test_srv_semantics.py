"""SPEC section 2, black box: how a real server hands out jobs and routes
results, rule by rule."""
import socket
import struct

from rawhelpers import (
    can_do, cant_do, did, do, expect_error, sync, sync_quiet, take_job,
    wait_metrics, worker)
from rawhelpers import warm_server  # noqa: F401 (the `server` fixture, from a warm spare)


def ids_of(jobs):
    return [j["arg"] for j in jobs]


# -- 2.1 FIFO per type ---------------------------------------------------------

def test_fifo_per_type_queued_before_worker(server, connect):
    s = connect()
    msgs = []
    for i in range(30):
        msgs.append(do(i, "a", "a%d" % i))
        if i % 3 == 0:
            msgs.append(do("b%d" % i, "b", "b%d" % i))
    s.send(*msgs)
    sync_quiet(s)
    w = worker(server, "a", "b", capacity=100)
    jobs = [take_job(w) for _ in range(40)]
    assert [j["arg"] for j in jobs if j["type"] == "a"] == ["a%d" % i for i in range(30)]
    assert [j["arg"] for j in jobs if j["type"] == "b"] == ["b%d" % i for i in range(0, 30, 3)]


def test_fifo_one_job_at_a_time(server, connect):
    """With capacity 1 the worker sees the jobs strictly in submission order,
    also across several submitters."""
    s1, s2 = connect(), connect()
    order = []
    for i in range(10):
        conn = s1 if i % 2 else s2
        conn.send(do(i, "t", i))
        sync_quiet(conn)
        order.append(i)
    w = worker(server, "t")
    seen = []
    for _ in range(10):
        job = take_job(w, "t")
        seen.append(job["arg"])
        assert w.nothing_within(0.02), "capacity 1: one job at a time"
        w.send(did(job["id"], res=job["arg"]))
    assert seen == order
    got1 = [s1.expect("did")["id"] for _ in range(5)]
    got2 = [s2.expect("did")["id"] for _ in range(5)]
    assert got1 == [1, 3, 5, 7, 9] and got2 == [0, 2, 4, 6, 8]


# -- 2.2 capacity and the longest-waiting worker -------------------------------

def test_capacity_is_honoured(server, connect):
    s = connect()
    s.send(*[do(i, "t", i) for i in range(10)])
    w = worker(server, "t", capacity=3)
    jobs = [take_job(w, "t") for _ in range(3)]
    assert ids_of(jobs) == [0, 1, 2]
    assert w.nothing_within(0.1), "capacity 3 holds at most 3"
    w.send(did(jobs[1]["id"], res=None))
    job = take_job(w, "t")
    assert job["arg"] == 3
    assert w.nothing_within(0.1)
    before, m = sync(s)
    assert before == [{"cmd": "did", "id": 1, "res": None}]
    assert m["jobs_running"] == 3 and m["jobs_queued"] == 6


def test_default_capacity_is_one(server, connect):
    s = connect()
    s.send(do(1, "t"), do(2, "t"))
    w = worker(server, "t")
    job = take_job(w, "t")
    assert w.nothing_within(0.1)
    w.send(did(job["id"], res=1))
    take_job(w, "t")


def test_capacity_counts_all_types_together(server, connect):
    s = connect()
    s.send(do(1, "a"), do(2, "b"), do(3, "a"), do(4, "b"))
    w = worker(server, "a", "b", capacity=2)
    take_job(w), take_job(w)
    assert w.nothing_within(0.1), "capacity is for all the types together"


def test_only_to_connections_that_can_do_the_type(server, connect):
    wa = worker(server, "a")
    wb = worker(server, "b")
    s = connect()
    s.send(do(1, "b", "for b"))
    assert take_job(wb, "b")["arg"] == "for b"
    assert wa.nothing_within(0.1)


def test_longest_waiting_worker_first(server, connect):
    w1 = worker(server, "t")
    w2 = worker(server, "t")
    w3 = worker(server, "t")
    s = connect()
    s.send(do(1, "t", 1))
    j1 = take_job(w1, "t")          # w1 waited longest
    s.send(do(2, "t", 2))
    j2 = take_job(w2, "t")
    s.send(do(3, "t", 3))
    j3 = take_job(w3, "t")
    # w2 becomes free before w1: it has been waiting longer now.
    w2.send(did(j2["id"], res=2))
    s.expect("did", id=2)
    w1.send(did(j1["id"], res=1))
    s.expect("did", id=1)
    s.send(do(4, "t", 4))
    assert take_job(w2, "t")["arg"] == 4
    s.send(do(5, "t", 5))
    assert take_job(w1, "t")["arg"] == 5
    assert w3.nothing_within(0.1)
    w3.send(did(j3["id"], res=3))
    s.expect("did", id=3)


def test_new_worker_after_waiting_ones_is_last(server, connect):
    w1 = worker(server, "t")
    w2 = worker(server, "t")
    s = connect()
    s.send(do(1, "t"))
    take_job(w1, "t")
    s.send(do(2, "t"))
    take_job(w2, "t")
    assert w1.nothing_within(0.05)


# -- 2.3 no limit on pipelined submissions -------------------------------------

def test_5000_pipelined_jobs_before_reading(server, connect):
    n = 5000
    s = connect()
    s.send(*[do(i, "t", {"n": i}) for i in range(n)])
    w = worker(server, "t", capacity=200)
    handled = 0
    held = set()
    while handled < n:
        job = take_job(w, "t")
        assert job["id"] not in held, "a WID is unique among unfinished jobs"
        held.add(job["id"])
        if len(held) >= 100 or handled + len(held) == n:
            w.send(*[did(wid, res=None) for wid in held])
            handled += len(held)
            held.clear()
    got = [s.expect("did") for _ in range(n)]
    assert sorted(m["id"] for m in got) == list(range(n))
    # And once more, each result checked.
    s.send(*[do(i, "t", {"n": i}) for i in range(n)])
    handled = 0
    while handled < n:
        job = take_job(w, "t")
        w.send(did(job["id"], res=job["arg"]["n"] * 2))
        handled += 1
    seen = {}
    for _ in range(n):
        msg = s.expect("did")
        assert "err" not in msg, msg
        assert msg["id"] not in seen, "two dids for id %r" % msg["id"]
        seen[msg["id"]] = msg["res"]
    assert seen == {i: i * 2 for i in range(n)}
    m = sync_quiet(s)
    assert m["jobs_added"] == 2 * n and m["jobs_done"] == 2 * n


# -- 2.4 unknown types wait -----------------------------------------------------

def test_jobs_for_unknown_types_wait(server, connect):
    s = connect()
    s.send(do(1, "later", "x"), do(2, "later", "y"))
    other = worker(server, "other")
    assert other.nothing_within(0.15)
    m = sync_quiet(s)
    assert m["types"]["later"]["queued"] == 2
    w = worker(server, "later", capacity=2)
    assert ids_of([take_job(w, "later"), take_job(w, "later")]) == ["x", "y"]


def test_can_do_adds_to_what_was_said_before(server, connect):
    w = worker(server, "a")
    w.send(can_do("b"))
    sync_quiet(w)
    s = connect()
    s.send(do(1, "a", "A"))
    j = take_job(w, "a")
    w.send(did(j["id"], res=1))
    s.send(do(2, "b", "B"))
    assert take_job(w, "b")["arg"] == "B"


def test_a_connection_can_do_at_most_max_types_types(start_server):
    """--max-types bounds what handing a worker its next job looks at; a
    can_do beyond it is refused whole and the worker keeps what it had."""
    srv = start_server("--max-types", "3")
    w = srv.connect()
    w.send({"cmd": "can_do", "types": ["a", "b"]})
    w.send({"cmd": "can_do", "types": ["c", "d"], "capacity": 2})
    assert "at most 3 types" in expect_error(w)["error"]
    m = sync_quiet(w)
    assert sorted(t for t, stats in m["types"].items() if stats["workers"]) == ["a", "b"]
    s = srv.connect()
    s.send(do(1, "a", "A"), do(2, "a", "A2"))
    take_job(w, "a")
    assert w.nothing_within(0.2), "the refused can_do raised its capacity"


# -- 2.5 worker lost -----------------------------------------------------------

def test_lost_worker_job_goes_to_front_and_out_again(server, connect):
    s = connect()
    w1 = worker(server, "t")
    s.send(do(1, "t", "j1"), do(2, "t", "j2"), do(3, "t", "j3"))
    first = take_job(w1, "t")
    assert first["arg"] == "j1"
    w1.close()
    m = wait_metrics(s, lambda m: m["jobs_reassigned"] == 1)
    assert m["types"]["t"]["queued"] == 3
    w2 = worker(server, "t", capacity=10)
    jobs = [take_job(w2, "t") for _ in range(3)]
    assert ids_of(jobs) == ["j1", "j2", "j3"], "the lost job goes back to the front"
    for j in jobs:
        w2.send(did(j["id"], res=j["arg"]))
    got = sorted(s.expect("did")["id"] for _ in range(3))
    assert got == [1, 2, 3]
    assert s.nothing_within(0.1), "exactly one did per job"


def test_lost_worker_with_several_jobs(server, connect):
    s = connect()
    w1 = worker(server, "t", capacity=2)
    s.send(*[do(i, "t", i) for i in range(4)])
    take_job(w1, "t"), take_job(w1, "t")
    w1.close()
    wait_metrics(s, lambda m: m["jobs_reassigned"] == 2)
    w2 = worker(server, "t", capacity=4)
    jobs = ids_of([take_job(w2, "t") for _ in range(4)])
    assert set(jobs[:2]) == {0, 1} and jobs[2:] == [2, 3], jobs


def test_lost_worker_job_goes_to_waiting_worker(server, connect):
    s = connect()
    w1 = worker(server, "t")
    s.send(do("x", "t", "payload"))
    take_job(w1, "t")
    w2 = worker(server, "t")
    assert w2.nothing_within(0.1)
    # An abrupt close (RST) is a loss like any other.
    w1.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w1.close()
    again = take_job(w2, "t")
    assert again["arg"] == "payload"
    w2.send(did(again["id"], res="ok"))
    s.expect("did", id="x", res="ok")


def test_max_attempts_then_err(start_server):
    srv = start_server("--max-attempts", "2")
    s = srv.connect()
    s.send(do("j", "t", "poison"))
    w1 = worker(srv, "t")
    take_job(w1, "t")
    w1.close()
    w2 = worker(srv, "t")
    assert take_job(w2, "t")["arg"] == "poison"
    w2.close()
    msg = s.expect("did", id="j")
    assert isinstance(msg.get("err"), str) and msg["err"], msg
    assert "res" not in msg
    w3 = worker(srv, "t")
    assert w3.nothing_within(0.15), "a failed job is not handed out again"
    m = sync_quiet(s)
    assert m["jobs_reassigned"] == 1
    assert m["jobs_failed"] == 1
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0
    # The id is free again.
    s.send(do("j", "t", "fresh"))
    assert take_job(w3, "t")["arg"] == "fresh"


def test_default_max_attempts_is_five(server, connect):
    s = connect()
    s.send(do(1, "t", "p"))
    for attempt in range(1, 5):
        w = worker(server, "t")
        assert take_job(w, "t")["arg"] == "p"
        w.close()
        wait_metrics(s, lambda m: m["jobs_reassigned"] == attempt)
    assert s.nothing_within(0.1), "four losses are not yet a failure"
    w = worker(server, "t")
    take_job(w, "t")
    w.close()
    msg = s.expect("did", id=1)
    assert isinstance(msg.get("err"), str) and msg["err"]


def test_max_attempts_one_fails_on_first_loss(start_server):
    srv = start_server("--max-attempts", "1")
    s = srv.connect()
    w = worker(srv, "t")
    s.send(do(1, "t"))
    take_job(w, "t")
    w.close()
    msg = s.expect("did", id=1)
    assert isinstance(msg.get("err"), str)


# -- 2.6 submitter lost --------------------------------------------------------

def test_submitter_lost(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "running"), do(2, "t", "queued"), do(3, "t", "queued too"))
    job = take_job(w, "t")
    assert job["arg"] == "running"
    s.close()
    watch = connect()
    wait_metrics(watch, lambda m: m["connections_open"] == 2 and m["jobs_queued"] == 0)
    w.send(did(job["id"], res="nobody wants this"))
    extra, m = sync(w)
    for msg in extra:
        # Only news about the job it held, never another job.
        assert msg.get("cmd") in ("cancel", "error") and msg.get("id") == job["id"], msg
    assert w.nothing_within(0.15), "queued jobs of a lost submitter are never handed out"
    m = wait_metrics(watch, lambda m: m["jobs_abandoned"] == 3)
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0
    assert m["types"]["t"]["queued"] == 0
    # The worker is free and works for others.
    s2 = connect()
    s2.send(do(1, "t", "next"))
    j = take_job(w, "t")
    assert j["arg"] == "next"
    w.send(did(j["id"], res="ok"))
    s2.expect("did", id=1, res="ok")


def test_submitter_lost_then_worker_lost_job_is_not_handed_out_again(server, connect):
    w1 = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "orphan"))
    take_job(w1, "t")
    s.close()
    mon = connect()
    wait_metrics(mon, lambda m: m["connections_open"] == 2)
    w1.close()
    wait_metrics(mon, lambda m: m["connections_open"] == 1)
    w2 = worker(server, "t")
    assert w2.nothing_within(0.2), "a lost submitter's job came back after its worker was lost"
    m = wait_metrics(mon, lambda m: m["jobs_abandoned"] == 1)
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0


def test_connection_that_works_its_own_job_and_leaves(server, connect):
    c = connect()
    c.send(can_do("t"), do(1, "t", "mine"))
    take_job(c, "t")
    c.close()
    mon = connect()
    wait_metrics(mon, lambda m: m["connections_open"] == 1)
    w = worker(server, "t")
    assert w.nothing_within(0.2), "the job of a gone submitter was handed out again"
    m = sync_quiet(mon)
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0


def test_submitter_lost_does_not_touch_other_submitters(server, connect):
    s1, s2 = connect(), connect()
    s1.send(do(1, "t", "s1-a"), do(2, "t", "s1-b"))
    s2.send(do(1, "t", "s2-a"))
    sync_quiet(s1), sync_quiet(s2)
    s1.close()
    wait_metrics(s2, lambda m: m["jobs_queued"] == 1)
    w = worker(server, "t")
    j = take_job(w, "t")
    assert j["arg"] == "s2-a"
    w.send(did(j["id"], res="yes"))
    s2.expect("did", id=1, res="yes")


# -- 2.7 did for a job not held -----------------------------------------------

def test_did_for_job_not_held_is_refused_and_changes_nothing(server, connect):
    w = worker(server, "t")
    thief = worker(server, "t")
    s = connect()
    s.send(do("mine", "t", "secret-arg"))
    job = take_job(w, "t")
    wid = job["id"]
    before = sync_quiet(s)
    # Another worker of the same type cannot finish it...
    thief.send(did(wid, res="stolen"))
    expect_error(thief, id=wid)
    thief.send(did(wid, err="stolen"))
    expect_error(thief, id=wid)
    # ...nor can the submitter, nor an unrelated connection.
    s.send(did(wid, res="self-served"))
    expect_error(s, id=wid)
    s.send(did("mine", res="self-served"))
    expect_error(s, id="mine")
    other = connect()
    other.send(did(wid, res="x"))
    expect_error(other, id=wid)
    for unknown in (wid + 1000 if isinstance(wid, int) else wid + "x", 0, -1, "nope", 2 ** 63 - 1):
        other.send(did(unknown, res="x"))
        expect_error(other, id=unknown)
    after = sync_quiet(s)
    for key in ("jobs_done", "jobs_failed", "jobs_running", "jobs_queued", "jobs_dispatched"):
        assert after[key] == before[key], key
    assert thief.nothing_within(0.1), "nobody else sees the job"
    # The real worker still holds it.
    w.send(did(wid, res="real"))
    s.expect("did", id="mine", res="real")
    assert s.nothing_within(0.1)


def test_second_did_for_same_job_is_refused(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t"))
    wid = take_job(w, "t")["id"]
    w.send(did(wid, res="one"))
    s.expect("did", id=1, res="one")
    w.send(did(wid, res="two"))
    expect_error(w, id=wid)
    w.send(did(wid, err="three"))
    expect_error(w, id=wid)
    assert s.nothing_within(0.1)
    assert sync_quiet(s)["jobs_done"] == 1


def test_old_worker_cannot_finish_a_reassigned_job(server, connect):
    """A new WID for every hand-out: the job handed out again is held by the
    new worker only."""
    s = connect()
    w1 = worker(server, "t", capacity=2)
    s.send(do(1, "t", "a"))
    first = take_job(w1, "t")
    w1.close()
    w2 = worker(server, "t")
    second = take_job(w2, "t")
    assert second["id"] != first["id"], "a new WID for every hand-out"
    w3 = worker(server, "t")
    w3.send(did(second["id"], res="stolen"))
    expect_error(w3, id=second["id"])
    w2.send(did(second["id"], res="real"))
    s.expect("did", id=1, res="real")


# -- cant_do, capacity updates -------------------------------------------------

def test_cant_do_stops_new_jobs_of_that_type(server, connect):
    w = worker(server, "a", "b", capacity=5)
    w.send(cant_do("a"))
    sync_quiet(w)
    s = connect()
    s.send(do(1, "a", "A"))
    assert w.nothing_within(0.1)
    s.send(do(2, "b", "B"))
    assert take_job(w, "b")["arg"] == "B"
    m = sync_quiet(s)
    assert m["types"]["a"]["queued"] == 1 and m["types"]["a"]["workers"] == 0


def test_can_do_again_after_cant_do(server, connect):
    w = worker(server, "a")
    w.send(cant_do("a"), can_do("a"))
    sync_quiet(w)
    s = connect()
    s.send(do(1, "a", "back"))
    assert take_job(w, "a")["arg"] == "back"


def test_lost_worker_jobs_go_back_to_their_own_types(server, connect):
    s = connect()
    w1 = worker(server, "a", "b", "c", capacity=3)
    s.send(do(1, "a", "A"), do(2, "b", "B"), do(3, "c", "C"))
    [take_job(w1) for _ in range(3)]
    w1.close()
    m = wait_metrics(s, lambda m: m["jobs_reassigned"] == 3)
    for t in "abc":
        assert m["types"][t]["queued"] == 1 and m["types"][t]["running"] == 0
    wb = worker(server, "b")
    assert take_job(wb, "b")["arg"] == "B"


def test_cant_do_leaves_held_jobs_alone(server, connect):
    w = worker(server, "a", capacity=2)
    s = connect()
    s.send(do(1, "a", "held"), do(2, "a", "held too"), do(3, "a", "waits"))
    j1, j2 = take_job(w, "a"), take_job(w, "a")
    w.send(cant_do("a"))
    sync_quiet(w)
    w.send(did(j1["id"], res=1), did(j2["id"], err="e"))
    s.expect("did", id=1, res=1)
    s.expect("did", id=2, err="e")
    assert w.nothing_within(0.1)


def test_cant_do_everything_is_no_worker(server, connect):
    w = worker(server, "a", "b")
    assert sync_quiet(w)["workers"] == 1
    w.send(cant_do("a", "b"))
    m = sync_quiet(w)
    assert m["workers"] == 0
    assert m["types"]["a"]["workers"] == 0 and m["types"]["b"]["workers"] == 0


def test_capacity_latest_value_wins_up(server, connect):
    s = connect()
    s.send(*[do(i, "t", i) for i in range(6)])
    w = worker(server, "t", capacity=1)
    take_job(w, "t")
    assert w.nothing_within(0.1)
    w.send(can_do("t", capacity=4))
    jobs = [take_job(w, "t") for _ in range(3)]
    assert ids_of(jobs) == [1, 2, 3]
    assert w.nothing_within(0.1)


def test_capacity_latest_value_wins_down(server, connect):
    s = connect()
    s.send(*[do(i, "t", i) for i in range(6)])
    w = worker(server, "t", capacity=3)
    jobs = [take_job(w, "t") for _ in range(3)]
    w.send(can_do("t", capacity=1))
    sync(w)
    w.send(did(jobs[0]["id"], res=0))
    assert w.nothing_within(0.1), "holds 2 with capacity 1: no new job"
    w.send(did(jobs[1]["id"], res=1))
    assert w.nothing_within(0.1), "holds 1 with capacity 1: no new job"
    w.send(did(jobs[2]["id"], res=2))
    assert take_job(w, "t")["arg"] == 3
    assert w.nothing_within(0.1)


# -- 2.8 exactly one did ---------------------------------------------------------

def test_exactly_one_did_per_job_through_losses_and_errors(server, connect):
    s = connect()
    n = 60
    s.send(*[do(i, "t", i) for i in range(n)])
    done = {}
    # A worker that dies holding jobs, a worker that fails some, one that
    # finishes the rest.
    w1 = worker(server, "t", capacity=5)
    [take_job(w1, "t") for _ in range(5)]
    w1.close()
    w2 = worker(server, "t", capacity=7)
    while len(done) < n:
        j = take_job(w2, "t")
        if j["arg"] % 3 == 0:
            w2.send(did(j["id"], err="e%d" % j["arg"]))
        else:
            w2.send(did(j["id"], res=j["arg"]))
        done[j["arg"]] = True
    seen = set()
    for _ in range(n):
        msg = s.expect("did")
        assert msg["id"] not in seen
        seen.add(msg["id"])
        if msg["id"] % 3 == 0:
            assert msg["err"] == "e%d" % msg["id"] and "res" not in msg
        else:
            assert msg["res"] == msg["id"] and "err" not in msg
    assert seen == set(range(n))
    assert s.nothing_within(0.1)
