"""SPEC section 3, black box: the metrics of a real server after a known
sequence of events, and the -v metrics lines on stderr."""
import time

import orjson

from rawhelpers import (
    did, do, sync, sync_quiet, take_job, wait_for, wait_metrics, worker)
from rawhelpers import warm_server  # noqa: F401 (the `server` fixture, from a warm spare)

KEYS = ["up_since", "connections", "connections_open", "workers", "jobs_added",
        "jobs_dispatched", "jobs_done", "jobs_failed", "jobs_reassigned",
        "jobs_abandoned", "jobs_queued", "jobs_running", "types"]
COUNTERS = [k for k in KEYS if k not in ("types", "up_since")]


def check_shape(m):
    for key in KEYS:
        assert key in m, "metrics lack %r: %r" % (key, m)
    for key in COUNTERS + ["up_since"]:
        assert type(m[key]) is int and m[key] >= 0, (key, m[key])
    assert isinstance(m["types"], dict)
    for name, t in m["types"].items():
        assert set(t) >= {"queued", "running", "workers", "idle"}, (name, t)
        for k in ("queued", "running", "workers", "idle"):
            assert type(t[k]) is int and t[k] >= 0, (name, k, t)


def test_fresh_server_metrics(server, connect):
    started = time.time()
    c = connect()
    m = c.metrics()
    check_shape(m)
    for key in ("workers", "jobs_added", "jobs_dispatched", "jobs_done", "jobs_failed",
                "jobs_reassigned", "jobs_abandoned", "jobs_queued", "jobs_running"):
        assert m[key] == 0, (key, m)
    assert m["types"] == {}
    # up_since: milliseconds since the epoch, when the server started.
    assert started - 30 < m["up_since"] / 1000.0 <= time.time() + 1, m["up_since"]
    assert m["up_since"] > 10 ** 12, "milliseconds, not seconds"
    # The fixture's readiness probe was one connection, this is another.
    assert m["connections"] >= 1
    m2 = c.metrics()
    assert m2["up_since"] == m["up_since"]


def test_connections_counts(server, connect):
    c = connect()
    base = wait_metrics(c, lambda m: m["connections_open"] == 1)
    others = [connect() for _ in range(5)]
    for o in others:
        sync_quiet(o)
    m = c.metrics()
    assert m["connections"] == base["connections"] + 5
    assert m["connections_open"] == 6
    for o in others[:3]:
        o.close()
    m = wait_metrics(c, lambda m: m["connections_open"] == 3)
    assert m["connections"] == base["connections"] + 5, "accepted since start: closing does not lower it"


def test_metrics_after_a_known_sequence(server, connect):
    mon = connect()
    base = wait_metrics(mon, lambda m: m["connections_open"] == 1)
    w1 = worker(server, "a", capacity=2)
    s = connect()
    s.send(do(1, "a", 1), do(2, "a", 2), do(3, "a", 3), do(4, "b", 4), do(5, "c", 5))
    j1, j2 = take_job(w1, "a"), take_job(w1, "a")
    w2 = worker(server, "b")
    take_job(w2, "b")
    w1.send(did(j1["id"], res="r1"))
    s.expect("did", id=1)
    j3 = take_job(w1, "a")
    w1.send(did(j2["id"], err="failed"))
    s.expect("did", id=2, err="failed")
    m = sync_quiet(mon)
    check_shape(m)
    assert m["connections"] == base["connections"] + 3
    assert m["connections_open"] == 4
    assert m["workers"] == 2
    assert m["jobs_added"] == 5
    assert m["jobs_dispatched"] == 4
    assert m["jobs_done"] == 1
    assert m["jobs_failed"] == 1
    assert m["jobs_reassigned"] == 0
    assert m["jobs_abandoned"] == 0
    assert m["jobs_queued"] == 1
    assert m["jobs_running"] == 2
    assert m["types"]["a"] == dict(m["types"]["a"], queued=0, running=1, workers=1, idle=1)
    assert m["types"]["b"] == dict(m["types"]["b"], queued=0, running=1, workers=1, idle=0)
    assert m["types"]["c"] == dict(m["types"]["c"], queued=1, running=0, workers=0, idle=0)

    # The b worker is lost: its job goes back.
    w2.close()
    m = wait_metrics(mon, lambda m: m["jobs_reassigned"] == 1)
    assert m["workers"] == 1 and m["connections_open"] == 3
    assert m["jobs_queued"] == 2 and m["jobs_running"] == 1
    assert m["types"]["b"] == dict(m["types"]["b"], queued=1, running=0, workers=0, idle=0)
    assert m["types"]["a"]["running"] == 1

    # The submitter is lost: its queued jobs are dropped, its running one
    # discarded when the result comes.
    s.close()
    m = wait_metrics(mon, lambda m: m["connections_open"] == 2 and m["jobs_queued"] == 0)
    assert m["jobs_abandoned"] in (2, 3)
    w1.send(did(j3["id"], res="late"))
    sync(w1)
    m = wait_metrics(mon, lambda m: m["jobs_abandoned"] == 3)
    assert m["jobs_queued"] == 0 and m["jobs_running"] == 0
    assert m["jobs_added"] == 5 and m["jobs_dispatched"] == 4
    assert m["jobs_failed"] == 1 and m["jobs_reassigned"] == 1
    # Types stay once seen.
    assert set(m["types"]) >= {"a", "b", "c"}
    assert m["types"]["a"] == dict(m["types"]["a"], queued=0, running=0, workers=1, idle=1)
    assert m["types"]["c"]["queued"] == 0


def test_jobs_dispatched_counts_each_hand_out(server, connect):
    s = connect()
    s.send(do(1, "t"))
    w = worker(server, "t")
    take_job(w, "t")
    w.close()
    w2 = worker(server, "t")
    j = take_job(w2, "t")
    w2.send(did(j["id"], res=None))
    s.expect("did", id=1)
    m = sync_quiet(s)
    assert m["jobs_dispatched"] == 2 and m["jobs_reassigned"] == 1 and m["jobs_done"] == 1


def test_idle_is_workers_with_a_free_slot(server, connect):
    w1 = worker(server, "t", capacity=3)
    w2 = worker(server, "t")
    w3 = worker(server, "t", "u")
    s = connect()
    m = sync_quiet(s)
    assert m["types"]["t"] == dict(m["types"]["t"], workers=3, idle=3, running=0, queued=0)
    assert m["types"]["u"] == dict(m["types"]["u"], workers=1, idle=1)
    s.send(*[do(i, "t", i) for i in range(4)])
    m = wait_metrics(s, lambda m: m["types"]["t"]["running"] == 4)
    # 5 slots, 4 jobs: exactly one worker has a free slot.
    assert m["types"]["t"]["idle"] == 1
    assert m["types"]["t"]["workers"] == 3
    assert m["workers"] == 3
    # w3 is idle for u exactly when its one slot is free.
    held = [len(sync(w)[0]) for w in (w1, w2, w3)]
    assert sum(held) == 4 and held[0] <= 3 and held[1] <= 1 and held[2] <= 1, held
    assert m["types"]["u"]["idle"] == (1 if held[2] == 0 else 0)
    assert m["types"]["u"]["workers"] == 1


def test_idle_and_workers_for_a_type_seen_only_in_can_do(server, connect):
    w = worker(server, "only-can-do")
    m = sync_quiet(w)
    assert m["types"]["only-can-do"] == dict(m["types"]["only-can-do"], queued=0, running=0, workers=1, idle=1)
    w.close()
    c = connect()
    m = wait_metrics(c, lambda m: m["workers"] == 0)
    assert m["types"]["only-can-do"]["workers"] == 0
    assert m["types"]["only-can-do"]["idle"] == 0


def metrics_lines(text):
    found = []
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw.startswith("{"):
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("metrics"), dict):
            obj = obj["metrics"]
        if isinstance(obj, dict) and "jobs_added" in obj:
            found.append(obj)
    return found


def test_verbose_prints_metrics_lines_periodically(start_server):
    srv = start_server("-v", "--metrics-interval", "0.2")
    c = srv.connect()
    c.send(do(1, "t", "x"))
    sync_quiet(c)
    t0 = time.monotonic()
    lines = wait_for(lambda: [m for m in metrics_lines(srv.stderr()) if m["jobs_added"] == 1][2:],
                     timeout=5, what="three metrics lines after the job")
    assert lines
    time.sleep(0.6)
    elapsed = time.monotonic() - t0
    all_lines = metrics_lines(srv.stderr())
    for m in all_lines:
        check_shape(m)
    # About one every 0.2 s: not a flood, not a trickle.
    recent = [m for m in all_lines if m["jobs_added"] == 1]
    assert 3 <= len(recent) <= elapsed / 0.2 + 4, (len(recent), elapsed)
    assert all_lines[-1]["types"]["t"]["queued"] == 1


def test_no_metrics_lines_without_verbose(start_server):
    srv = start_server("--metrics-interval", "0.1")
    c = srv.connect()
    sync_quiet(c)
    time.sleep(0.35)
    assert metrics_lines(srv.stderr()) == []
