"""SPEC section 7 (and `release` of section 9), black box: priorities,
background jobs, coalescing, time to run, timeouts, cancel, progress."""
import itertools
import time

import pytest

from rawhelpers import (
    did, do, expect_error, sync, sync_quiet, take_job, wait_metrics,
    worker)
from rawhelpers import warm_server  # noqa: F401 (the `server` fixture, from a warm spare)

_types = itertools.count()


@pytest.fixture
def refused(shared):
    """refused(msg_fields...): send a `do` with a fresh type; it must be
    refused with its id and queue nothing."""
    made = []

    def check(**fields):
        c = shared.connect()
        made.append(c)
        t = "jc-%d" % next(_types)
        c.send(do("x", t, 1, **fields))
        expect_error(c, id="x")
        m = sync_quiet(c)
        assert m["types"].get(t, {}).get("queued", 0) == 0, "a refused job was queued"
    yield check
    for c in made:
        c.close()


def cancel(id):
    return {"cmd": "cancel", "id": id}


def progress(wid, data):
    return {"cmd": "progress", "id": wid, "data": data}


def release(wid):
    return {"cmd": "release", "id": wid}


def args_of(jobs):
    return [j["arg"] for j in jobs]


# -- priority --------------------------------------------------------------------

def test_priority_higher_first_fifo_within(server, connect):
    s = connect()
    s.send(do(1, "t", "p0-a"), do(2, "t", "p5-a", priority=5), do(3, "t", "p0-b", priority=0),
           do(4, "t", "p5-b", priority=5), do(5, "t", "n1", priority=-1), do(6, "t", "p10", priority=10),
           do(7, "t", "p0-c"))
    sync_quiet(s)
    w = worker(server, "t", capacity=7)
    got = args_of([take_job(w, "t") for _ in range(7)])
    assert got == ["p10", "p5-a", "p5-b", "p0-a", "p0-b", "p0-c", "n1"]


def test_priority_extremes_of_64_bits(server, connect):
    s = connect()
    s.send(do(1, "t", "min", priority=-2 ** 63), do(2, "t", "zero"), do(3, "t", "max", priority=2 ** 63 - 1))
    sync_quiet(s)
    w = worker(server, "t", capacity=3)
    assert args_of([take_job(w, "t") for _ in range(3)]) == ["max", "zero", "min"]


def test_priority_one_at_a_time_with_arrivals(server, connect):
    s = connect()
    w = worker(server, "t")
    s.send(do(1, "t", "first"))
    j = take_job(w, "t")
    s.send(do(2, "t", "low"), do(3, "t", "high", priority=3))
    sync_quiet(s)
    w.send(did(j["id"], res=None))
    assert take_job(w, "t")["arg"] == "high"


def test_put_back_job_goes_to_front_of_its_priority(server, connect):
    s = connect()
    w1 = worker(server, "t")
    s.send(do(1, "t", "a"), do(2, "t", "b"))
    assert take_job(w1, "t")["arg"] == "a"
    s.send(do(3, "t", "urgent", priority=5))
    sync_quiet(s)
    w1.close()
    wait_metrics(s, lambda m: m["jobs_reassigned"] == 1)
    w2 = worker(server, "t", capacity=3)
    assert args_of([take_job(w2, "t") for _ in range(3)]) == ["urgent", "a", "b"]


@pytest.mark.parametrize("bad", ["1", 1.5, True, [1], {"p": 1}], ids=repr)
def test_priority_ill_typed_refused(refused, bad):
    refused(priority=bad)


@pytest.mark.parametrize("raw", [b"18446744073709551616", b"-9223372036854775809"])
def test_priority_beyond_64_bits_refused(shared, raw):
    """Such a number would silently become a float (a different priority)."""
    s = shared.connect()
    t = "jc-%d" % next(_types)
    s.send_raw(b'{"cmd":"do","id":"p","type":"' + t.encode() + b'","priority":' + raw + b'}\r\n')
    before, m = sync(s)
    s.close()
    assert before and before[0].get("cmd") == "error" and before[0].get("id") == "p", (
        "priority %s was accepted: %r" % (raw.decode(), before))
    assert m["types"].get(t, {}).get("queued", 0) == 0


# -- bg --------------------------------------------------------------------------

def test_bg_acknowledged_and_id_free_again(server, connect):
    s = connect()
    s.send(do(1, "t", "background", bg=True))
    s.expect("queued", id=1)
    s.send(do(1, "t", "foreground"))        # the id is free again
    m = sync_quiet(s)
    assert m["jobs_queued"] == 2
    w = worker(server, "t", capacity=2)
    jobs = [take_job(w, "t") for _ in range(2)]
    assert args_of(jobs) == ["background", "foreground"]
    for j in jobs:
        w.send(did(j["id"], res=j["arg"]))
    got = s.expect("did", id=1)
    assert got["res"] == "foreground", "no did for a bg job"
    assert s.nothing_within(0.15)
    assert w.nothing_within(0.1), "the worker's did for a bg job is accepted"


def test_bg_queued_even_with_a_worker_waiting(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do("b", "t", 1, bg=True))
    s.expect("queued", id="b")
    j = take_job(w, "t")
    w.send(did(j["id"], err="failed"))
    assert s.nothing_within(0.15)
    assert w.nothing_within(0.05)


def test_bg_false_is_a_normal_job(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do("n", "t", 1, bg=False))
    j = take_job(w, "t")
    w.send(did(j["id"], res=2))
    s.expect("did", id="n", res=2)


def test_bg_survives_submitter_disconnect(server, connect):
    s = connect()
    s.send(do(1, "t", "outlives", bg=True), do(2, "t", "does not"))
    s.expect("queued", id=1)
    s.close()
    mon = connect()
    m = wait_metrics(mon, lambda m: m["connections_open"] == 1 and m["jobs_queued"] == 1)
    w = worker(server, "t", capacity=2)
    j = take_job(w, "t")
    assert j["arg"] == "outlives"
    assert w.nothing_within(0.1)
    w.send(did(j["id"], res="ok"))
    assert w.nothing_within(0.1), "no error for finishing a bg job"
    m = sync_quiet(mon)
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0


def test_bg_job_whose_submitter_is_gone_when_it_finishes(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "bg", bg=True))
    s.expect("queued", id=1)
    j = take_job(w, "t")
    s.close()
    mon = connect()
    wait_metrics(mon, lambda m: m["connections_open"] == 2)
    assert w.nothing_within(0.1), "the job is not cancelled"
    w.send(did(j["id"], res="done anyway"))
    _, m = sync(w)
    assert _ == [], _
    assert m["jobs_running"] == 0
    # The worker is free for more.
    s2 = connect()
    s2.send(do(2, "t", "next"))
    assert take_job(w, "t")["arg"] == "next"


def test_cancel_by_id_of_a_bg_job_is_unknown(server, connect):
    s = connect()
    s.send(do(1, "t", "x", bg=True))
    s.expect("queued", id=1)
    s.send(cancel(1))
    expect_error(s, id=1)
    assert sync_quiet(s)["jobs_queued"] == 1


@pytest.mark.parametrize("bad", [1, 0, "true", [True]], ids=repr)
def test_bg_ill_typed_refused(refused, bad):
    refused(bg=bad)


# -- unique ----------------------------------------------------------------------

def test_unique_coalesces_into_one_execution(server, connect):
    s1, s2 = connect(), connect()
    s1.send(do("a", "t", "first arg", unique="k"))
    sync_quiet(s1)
    s2.send(do("b", "t", "second arg", unique="k"))
    sync_quiet(s2)
    w = worker(server, "t", capacity=5)
    j = take_job(w, "t")
    assert j["arg"] == "first arg", "the first submission's arg stands"
    assert w.nothing_within(0.1), "one execution"
    m = sync_quiet(s1)
    assert m["jobs_coalesced"] == 1
    w.send(did(j["id"], res={"shared": True}))
    s1.expect("did", id="a", res={"shared": True})
    s2.expect("did", id="b", res={"shared": True})
    assert s1.nothing_within(0.1) and s2.nothing_within(0.1)


def test_unique_join_while_running_and_same_connection(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "x", unique="k"))
    j = take_job(w, "t")
    s.send(do(2, "t", "y", unique="k"))
    other = connect()
    other.send(do(1, "t", "z", unique="k"))
    sync_quiet(other)
    assert w.nothing_within(0.1)
    w.send(did(j["id"], err="e"))
    got = sorted(s.expect("did", err="e")["id"] for _ in range(2))
    assert got == [1, 2]
    other.expect("did", id=1, err="e")
    assert sync_quiet(other)["jobs_coalesced"] == 2


def test_unique_keys_are_per_type_and_per_lifetime(server, connect):
    s = connect()
    s.send(do(1, "a", 1, unique="k"), do(2, "b", 2, unique="k"))
    w = worker(server, "a", "b", capacity=5)
    j1, j2 = take_job(w), take_job(w)
    assert {j1["type"], j2["type"]} == {"a", "b"}
    w.send(did(j1["id"], res=1))
    s.expect("did")
    # Finished: the same key makes a new job.
    s.send(do(3, j1["type"], "again", unique="k"))
    assert take_job(w)["arg"] == "again"
    assert sync_quiet(s)["jobs_coalesced"] == 0


def test_unique_first_priority_stands(server, connect):
    s = connect()
    s.send(do(1, "t", "coalesced", unique="k"), do(2, "t", "mid", priority=5),
           do(3, "t", "joiner", unique="k", priority=10))
    sync_quiet(s)
    w = worker(server, "t", capacity=2)
    assert args_of([take_job(w, "t"), take_job(w, "t")]) == ["mid", "coalesced"]


def coalesced_pair(server, connect):
    """A worker running job "one" of s1, which s2 joined as "two" (unique "k")."""
    w = worker(server, "t")
    s1, s2 = connect(), connect()
    s1.send(do("one", "t", 1, unique="k"))
    j = take_job(w, "t")
    s2.send(do("two", "t", 1, unique="k"))
    sync_quiet(s2)
    return w, s1, s2, j


def test_unique_joined_submitter_cancel_only_detaches(server, connect):
    w, s1, s2, j = coalesced_pair(server, connect)
    s2.send(cancel("two"))
    s2.expect("did", id="two", err="cancelled")
    assert w.nothing_within(0.1), "the job is not cancelled while s1 waits"
    w.send(did(j["id"], res="r"))
    s1.expect("did", id="one", res="r")
    assert s2.nothing_within(0.1)


def test_unique_cancelled_when_no_submitter_is_left(server, connect):
    w, s1, s2, j = coalesced_pair(server, connect)
    s1.send(cancel("one"))
    s1.expect("did", id="one", err="cancelled")
    s2.send(cancel("two"))
    s2.expect("did", id="two", err="cancelled")
    w.expect("cancel", id=j["id"])
    w.send(did(j["id"], res="late"))
    expect_error(w, id=j["id"])


def test_unique_joined_submitter_leaving_only_detaches(server, connect):
    w, s1, s2, j = coalesced_pair(server, connect)
    s2.close()
    wait_metrics(s1, lambda m: m["connections_open"] == 2)
    assert w.nothing_within(0.1)
    w.send(did(j["id"], res="r"))
    s1.expect("did", id="one", res="r")


def test_unique_running_job_cancelled_when_all_submitters_leave(server, connect):
    """SPEC 7: a unique job is cancelled when no submitter is left waiting,
    whether they cancelled, timed out or left (a plain job whose submitter
    leaves runs on: test_srv_semantics)."""
    w, s1, s2, j = coalesced_pair(server, connect)
    s1.close()
    assert w.nothing_within(0.1), "s2 still waits"
    s2.close()
    w.expect("cancel", id=j["id"])
    w.send(did(j["id"], res="late"))
    expect_error(w, id=j["id"])
    m = wait_metrics(w, lambda m: m["connections_open"] == 1)
    assert m["jobs_abandoned"] == 1 and m["jobs_running"] == 0 and m["jobs_cancelled"] == 0
    w.send(do("again", "t", 1, unique="k"))       # the key is free: a new job
    assert take_job(w, "t")["arg"] == 1


def test_a_departing_submitters_queued_job_never_fills_the_slot_its_unique_job_freed(
        server, connect):
    """Cancelling its running unique job frees the worker; the submitter's
    other jobs, queued behind it, are dropped all the same (SPEC 2.6)."""
    w = worker(server, "t")
    s = connect()
    s.send(do("u", "t", "unique", unique="k"))
    j = take_job(w, "t")
    s.send(do("p", "t", "plain"))
    wait_metrics(w, lambda m: m["jobs_queued"] == 1)
    s.close()
    w.expect("cancel", id=j["id"])
    m = wait_metrics(w, lambda m: m["connections_open"] == 1 and m["jobs_queued"] == 0)
    assert m["jobs_running"] == 0 and m["jobs_dispatched"] == 1
    assert w.nothing_within(0.15), "a job of a submitter that left was handed out"


def test_unique_queued_job_dropped_when_all_submitters_leave(server, connect):
    s1, s2 = connect(), connect()
    s1.send(do(1, "t", 1, unique="k"))
    s2.send(do(1, "t", 1, unique="k"))
    sync_quiet(s1), sync_quiet(s2)
    s1.close()
    s2.close()
    mon = connect()
    wait_metrics(mon, lambda m: m["connections_open"] == 1 and m["jobs_queued"] == 0)
    w = worker(server, "t")
    assert w.nothing_within(0.15)


def test_unique_bg_submission_keeps_it_alive(server, connect):
    w = worker(server, "t")
    s1, s2 = connect(), connect()
    s1.send(do("fg", "t", "x", unique="k"))
    j = take_job(w, "t")
    s2.send(do("bg", "t", "y", unique="k", bg=True))
    s2.expect("queued", id="bg")
    s1.send(cancel("fg"))
    s1.expect("did", id="fg", err="cancelled")
    assert w.nothing_within(0.1), "a bg submission keeps the job alive"
    w.send(did(j["id"], res="r"))
    assert w.nothing_within(0.1)
    assert s1.nothing_within(0.1) and s2.nothing_within(0.1)


def test_unique_job_whose_worker_dies(server, connect):
    s1, s2 = connect(), connect()
    w1 = worker(server, "t")
    s1.send(do(1, "t", "a", unique="k"))
    j = take_job(w1, "t")
    s2.send(do(2, "t", "b", unique="k"))
    sync_quiet(s2)
    w1.close()
    w2 = worker(server, "t", capacity=2)
    j2 = take_job(w2, "t")
    assert j2["arg"] == "a" and j2["id"] != j["id"]
    assert w2.nothing_within(0.1), "still one execution"
    w2.send(did(j2["id"], res="once"))
    s1.expect("did", id=1, res="once")
    s2.expect("did", id=2, res="once")
    # The key is free: a new submission is a new job.
    s2.send(do(3, "t", "c", unique="k"))
    assert take_job(w2, "t")["arg"] == "c"


def test_unique_joined_submitter_timeout_only_detaches(server, connect):
    w = worker(server, "t")
    s1, s2 = connect(), connect()
    s1.send(do("one", "t", 1, unique="k"))
    j = take_job(w, "t")
    s2.send(do("two", "t", 1, unique="k", timeout=0.2))
    s2.expect("did", id="two", err="timeout")
    assert w.nothing_within(0.1)
    w.send(did(j["id"], res="r"))
    s1.expect("did", id="one", res="r")


@pytest.mark.parametrize("bad", [5, ["k"], True, {"k": 1}, None], ids=repr)
def test_unique_ill_typed_refused(refused, bad):
    refused(unique=bad)


# -- ttr -------------------------------------------------------------------------

def test_ttr_takes_the_job_back(server, connect):
    w = worker(server, "t")
    s = connect()
    t0 = time.monotonic()
    s.send(do(1, "t", "slow", ttr=0.3), do(2, "t", "behind"))
    j = take_job(w, "t")
    w.expect("cancel", id=j["id"], timeout=3)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 2.0, elapsed
    # The slot is free at once and the job is queued again at the front:
    # it comes back (before "behind") with a new WID.
    j2 = take_job(w, "t")
    assert j2["arg"] == "slow" and j2["id"] != j["id"]
    # A late did for the old WID is refused, and never delivered.
    w.send(did(j["id"], res="late"))
    expect_error(w, id=j["id"])
    w.send(progress(j["id"], 1))
    expect_error(w, id=j["id"])
    w.send(release(j["id"]))
    expect_error(w, id=j["id"])
    assert s.nothing_within(0.1)
    w.send(did(j2["id"], res="on time"))
    s.expect("did", id=1, res="on time")
    assert take_job(w, "t")["arg"] == "behind"
    assert s.nothing_within(0.1)


def test_unique_first_ttr_stands(server, connect):
    w = worker(server, "t")
    s1, s2 = connect(), connect()
    s1.send(do(1, "t", "x", unique="k", ttr=0.2))
    sync_quiet(s1)
    s2.send(do(2, "t", "x", unique="k", ttr=30))
    sync_quiet(s2)
    j = take_job(w, "t")
    w.expect("cancel", id=j["id"], timeout=3)
    j2 = take_job(w, "t")
    w.send(did(j2["id"], res="r"))
    s1.expect("did", id=1, res="r")
    s2.expect("did", id=2, res="r")


def test_bg_job_with_timeout_is_dropped_silently(server, connect):
    s = connect()
    s.send(do("b", "t", 1, bg=True, timeout=0.2))
    s.expect("queued", id="b")
    assert s.nothing_within(0.4), "no did for a bg job, even on timeout"
    m = sync_quiet(s)
    assert m["jobs_queued"] == 0 and m["jobs_timed_out"] == 1
    w = worker(server, "t")
    assert w.nothing_within(0.1)


def test_ttr_expiry_is_a_lost_attempt(start_server):
    srv = start_server("--max-attempts", "2")
    w = worker(srv, "t")
    s = srv.connect()
    s.send(do(1, "t", "poison", ttr=0.15))
    j1 = take_job(w, "t")
    w.expect("cancel", id=j1["id"], timeout=3)
    j2 = take_job(w, "t")
    w.expect("cancel", id=j2["id"], timeout=3)
    msg = s.expect("did", id=1, timeout=3)
    assert msg.get("err") == "job failed: 2 attempts lost, the last by running past its ttr"
    assert w.nothing_within(0.15), "a failed job is not handed out again"


def test_server_default_ttr(start_server):
    srv = start_server("--ttr", "0.2")
    w = worker(srv, "t", capacity=2)
    s = srv.connect()
    s.send(do(1, "t", "default"), do(2, "t", "own", ttr=30))
    jobs = {j["arg"]: j for j in (take_job(w, "t"), take_job(w, "t"))}
    w.expect("cancel", id=jobs["default"]["id"], timeout=3)
    again = take_job(w, "t")
    assert again["arg"] == "default"
    # The job's own ttr wins over the default.
    w.send(did(jobs["own"]["id"], res="fine"))
    s.expect("did", id=2, res="fine")


def test_no_ttr_means_unlimited(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t"))
    j = take_job(w, "t")
    assert w.nothing_within(0.4)
    w.send(did(j["id"], res=1))
    s.expect("did", id=1, res=1)


def test_did_in_time_with_integer_ttr(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "x", ttr=1))
    j = take_job(w, "t")
    w.send(did(j["id"], res="quick"))
    s.expect("did", id=1, res="quick")
    assert w.nothing_within(1.1), "no cancel after the job is done"


def test_did_racing_ttr_expiry_gives_exactly_one_result(server, connect):
    w = worker(server, "t")
    s = connect()
    for i in range(6):
        s.send(do(i, "t", i, ttr=0.1))
        j = take_job(w, "t")
        wids = [j["id"]]
        time.sleep(0.085 + 0.01 * (i % 3))
        w.send(did(j["id"], res="r%d" % i))
        # Either the did was in time, or the job was taken back: then the
        # did is refused and the job comes again (with a new WID).
        msgs, _ = sync(w)
        while msgs:
            m = msgs.pop(0)
            if m["cmd"] in ("cancel", "error"):
                assert m["id"] in wids, (m, wids)
            else:
                assert m["cmd"] == "do" and m["arg"] == i, m
                assert m["id"] not in wids
                wids.append(m["id"])
                w.send(did(m["id"], res="r%d" % i))
                more, _ = sync(w)
                msgs.extend(more)
        s.expect("did", id=i, res="r%d" % i, timeout=3)
    assert s.nothing_within(0.15)


@pytest.mark.parametrize("bad", [0, -1, -0.5, "1", True, [1]], ids=repr)
def test_ttr_invalid_refused(refused, bad):
    refused(ttr=bad)


# -- timeout ---------------------------------------------------------------------

def test_timeout_of_a_queued_job(server, connect):
    s = connect()
    t0 = time.monotonic()
    s.send(do(1, "t", "never done", timeout=0.3))
    msg = s.expect("did", id=1, err="timeout", timeout=3)
    assert "res" not in msg
    assert 0.25 <= time.monotonic() - t0 < 2.0
    w = worker(server, "t")
    assert w.nothing_within(0.15), "a timed out job is dropped"
    m = sync_quiet(s)
    assert m["jobs_queued"] == 0
    assert m["jobs_timed_out"] == 1
    # The id is free again.
    s.send(do(1, "t", "again"))
    assert take_job(w, "t")["arg"] == "again"


def test_timeout_of_a_running_job_cancels_it_at_the_worker(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "slow", timeout=0.3), do(2, "t", "next"))
    j = take_job(w, "t")
    s.expect("did", id=1, err="timeout", timeout=3)
    w.expect("cancel", id=j["id"], timeout=1)
    # Its slot is free at once.
    assert take_job(w, "t")["arg"] == "next"
    w.send(did(j["id"], res="late"))
    expect_error(w, id=j["id"])
    assert s.nothing_within(0.1)


def test_timeout_not_reached(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "x", timeout=0.3))
    j = take_job(w, "t")
    w.send(did(j["id"], res="in time"))
    s.expect("did", id=1, res="in time")
    assert s.nothing_within(0.45), "no timeout after the result"
    assert w.nothing_within(0.05)


@pytest.mark.parametrize("bad", [0, -1, "1", False, [1]], ids=repr)
def test_timeout_invalid_refused(refused, bad):
    refused(timeout=bad)


# -- cancel ----------------------------------------------------------------------

def test_cancel_queued_job(server, connect):
    s = connect()
    s.send(do(1, "t", "x"), do(2, "t", "y"))
    s.send(cancel(1))
    msg = s.expect("did", id=1, err="cancelled")
    assert "res" not in msg
    w = worker(server, "t", capacity=2)
    assert take_job(w, "t")["arg"] == "y"
    assert w.nothing_within(0.1)
    assert sync_quiet(s)["jobs_cancelled"] == 1


def test_cancel_running_job(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "x"), do(2, "t", "y"))
    j = take_job(w, "t")
    s.send(cancel(1))
    s.expect("did", id=1, err="cancelled")
    w.expect("cancel", id=j["id"])
    # The slot is free at once.
    j2 = take_job(w, "t")
    assert j2["arg"] == "y"
    # The old job is no longer held: did, progress, release are refused.
    w.send(did(j["id"], res="late"))
    expect_error(w, id=j["id"])
    w.send(progress(j["id"], 50))
    expect_error(w, id=j["id"])
    w.send(release(j["id"]))
    expect_error(w, id=j["id"])
    assert s.nothing_within(0.1), "a late result is discarded"
    w.send(did(j2["id"], res="y done"))
    s.expect("did", id=2, res="y done")


def test_cancel_unknown_or_finished_id(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(cancel("nope"))
    expect_error(s, id="nope")
    s.send(do(1, "t"))
    j = take_job(w, "t")
    w.send(did(j["id"], res=None))
    s.expect("did", id=1)
    s.send(cancel(1))
    expect_error(s, id=1)
    s.send(cancel(1))
    expect_error(s, id=1)


def test_cancel_twice(server, connect):
    s = connect()
    s.send(do(1, "t"), cancel(1), cancel(1))
    s.expect("did", id=1, err="cancelled")
    expect_error(s, id=1)


def test_cancel_from_another_connection_is_unknown(server, connect):
    w = worker(server, "t")
    s, other = connect(), connect()
    s.send(do(1, "t", "mine"))
    j = take_job(w, "t")
    other.send(cancel(1))
    expect_error(other, id=1)
    other.send(cancel(j["id"]))
    expect_error(other, id=j["id"])
    assert w.nothing_within(0.1)
    w.send(did(j["id"], res="still mine"))
    s.expect("did", id=1, res="still mine")


@pytest.mark.parametrize("bad", [None, True, 1.5, [1]], ids=repr)
def test_cancel_ill_typed_id(shared, bad):
    s = shared.connect()
    s.send(cancel(bad))
    expect_error(s)
    sync_quiet(s)
    s.close()


def test_cancel_while_handing_out(server, connect):
    """do and cancel in one packet while a worker waits: whichever wins, the
    submitter gets exactly one did with "cancelled", and a worker that got
    the job gets a cancel for it and stays usable."""
    w = worker(server, "t")
    s = connect()
    for i in range(25):
        s.send(do(i, "t", i), cancel(i))
        s.expect("did", id=i, err="cancelled")
        msgs, _ = sync(w)
        if msgs:
            assert [m["cmd"] for m in msgs] == ["do", "cancel"], msgs
            assert msgs[1]["id"] == msgs[0]["id"]
            w.send(did(msgs[0]["id"], res="late"))
            expect_error(w, id=msgs[0]["id"])
    assert s.nothing_within(0.1)
    s.send(do("after", "t", "ok"))
    j = take_job(w, "t")
    w.send(did(j["id"], res="fine"))
    s.expect("did", id="after", res="fine")


def test_cancel_racing_the_result(server, connect):
    """did and cancel cross: the submitter gets exactly one did (the result
    or "cancelled"), and a refused cancel is an error with the id."""
    w = worker(server, "t")
    s = connect()
    for i in range(15):
        s.send(do(i, "t", i))
        j = take_job(w, "t")
        w.send(did(j["id"], res=i))
        s.send(cancel(i))
        first = s.recv()
        assert first["cmd"] == "did" and first["id"] == i, first
        if first.get("err") == "cancelled":
            extra, _ = sync(w)
            assert all(m["cmd"] in ("cancel", "error") for m in extra), extra
        else:
            assert first["res"] == i
            expect_error(s, id=i)
        sync(w)
    assert s.nothing_within(0.1)


# -- progress --------------------------------------------------------------------

def test_progress_reaches_the_submitter(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do("p", "t", "x"))
    j = take_job(w, "t")
    payloads = [0, 0.5, {"pct": 99, "msg": "é😀"}, [2 ** 64 - 1, -0.0], None, "done soon",
                "big: " + "z" * 40000]     # passed on as sent (string_as_sent)
    for data in payloads:
        w.send(progress(j["id"], data))
    for data in payloads:
        msg = s.expect("progress", id="p")
        assert msg["data"] == data and type(msg["data"]) is type(data)
    w.send(did(j["id"], res="fin"))
    s.expect("did", id="p", res="fin")
    w.send(progress(j["id"], 1))
    expect_error(w, id=j["id"])
    assert s.nothing_within(0.1)


def test_progress_without_data_is_refused(server, connect):
    """SPEC 1: a missing field gets an error (only `arg` defaults to null)."""
    w = worker(server, "t")
    s = connect()
    s.send(do("p", "t", "x"))
    j = take_job(w, "t")
    w.send({"cmd": "progress", "id": j["id"]})
    msg = expect_error(w, id=j["id"])
    assert "data" in msg["error"]
    assert s.nothing_within(0.1)
    w.send(progress(j["id"], None))         # null is a value: passed on
    assert s.expect("progress", id="p")["data"] is None


def test_progress_for_bg_job_goes_nowhere(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do("b", "t", "x", bg=True))
    s.expect("queued", id="b")
    j = take_job(w, "t")
    w.send(progress(j["id"], 10))
    assert w.nothing_within(0.1)
    assert s.nothing_within(0.1)


def test_progress_for_job_not_held_is_refused(server, connect):
    w, thief = worker(server, "t"), worker(server, "t")
    s = connect()
    s.send(do("p", "t"))
    j = take_job(w, "t")
    thief.send(progress(j["id"], "fake"))
    expect_error(thief, id=j["id"])
    thief.send(progress("p", "fake"))
    expect_error(thief, id="p")
    assert s.nothing_within(0.1)


def test_progress_reaches_every_joined_submitter(server, connect):
    w, s1, s2, j = coalesced_pair(server, connect)
    w.send(progress(j["id"], 42))
    s1.expect("progress", id="one", data=42)
    s2.expect("progress", id="two", data=42)


# -- release (SPEC 9) --------------------------------------------------------------

def test_release_puts_the_job_back_at_the_front(server, connect):
    w = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "a"), do(2, "t", "b"))
    j = take_job(w, "t")
    w.send(release(j["id"]))
    again = take_job(w, "t")
    assert again["arg"] == "a", "released job goes back to the front"
    w.send(did(j["id"], res="old wid"))
    expect_error(w, id=j["id"])
    w.send(did(again["id"], res="A"))
    s.expect("did", id=1, res="A")
    m = sync_quiet(s)
    assert m["jobs_released"] == 1
    assert m["jobs_reassigned"] == 0


def test_release_frees_the_slot_for_a_longer_waiting_worker(server, connect):
    w1 = worker(server, "t")
    s = connect()
    s.send(do(1, "t", "a"))
    j = take_job(w1, "t")
    w2 = worker(server, "t")
    w1.send(release(j["id"]))
    assert take_job(w2, "t")["arg"] == "a"
    assert w1.nothing_within(0.1)


def test_release_is_not_a_lost_attempt(start_server):
    srv = start_server("--max-attempts", "1")
    w = worker(srv, "t")
    s = srv.connect()
    s.send(do(1, "t", "x"))
    for _ in range(4):
        j = take_job(w, "t")
        w.send(release(j["id"]))
    j = take_job(w, "t")
    w.send(did(j["id"], res="finally"))
    s.expect("did", id=1, res="finally")
    assert sync_quiet(s)["jobs_released"] == 4


def test_release_of_job_not_held_is_refused(server, connect):
    w, thief = worker(server, "t"), worker(server, "t")
    s = connect()
    s.send(do(1, "t"))
    j = take_job(w, "t")
    thief.send(release(j["id"]))
    expect_error(thief, id=j["id"])
    thief.send(release(12345678))
    expect_error(thief, id=12345678)
    assert thief.nothing_within(0.1), "the job was not released to the thief"
    w.send(did(j["id"], res=1))
    s.expect("did", id=1, res=1)


def test_release_keeps_priority_front(server, connect):
    s = connect()
    s.send(do(1, "t", "low-a"), do(2, "t", "low-b"))
    w = worker(server, "t")
    j = take_job(w, "t")
    s.send(do(3, "t", "high", priority=1))
    sync_quiet(s)
    w.send(release(j["id"]))
    assert take_job(w, "t")["arg"] == "high"
