"""Property-based fuzzing of a real server process (SPEC sections 1, 2.7
and 5): random bytes and random JSON messages, valid and invalid shapes of
every command, then a normal round trip must still work."""
import socket
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rawhelpers import (
    ServerProcess, did, do, line, roundtrip_ok, sync, sync_quiet, take_job,
    wait_metrics, worker)

FUZZ = settings(max_examples=70, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

CMDS = ["can_do", "cant_do", "do", "did", "metrics", "cancel", "progress", "release",
        "auth", "bogus", "", "DO"]
TYPES = ["fz-a", "fz-b", "", "é", "x" * 50]

json_scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=6)
ids = st.integers(-2 ** 63, 2 ** 63 - 1) | st.text(max_size=10) | json_values
types_field = st.lists(st.sampled_from(TYPES), max_size=3) | json_values


@st.composite
def messages(draw):
    cmd = draw(st.sampled_from(CMDS) | json_values)
    msg = {"cmd": cmd}
    optional = {
        "id": ids,
        "type": st.sampled_from(TYPES) | json_values,
        "types": types_field,
        "arg": json_values,
        "res": json_values,
        "err": st.text(max_size=20) | json_values,
        "capacity": st.integers(-3, 5) | json_values,
        "priority": st.integers(-5, 5) | json_values,
        "bg": st.booleans() | json_values,
        "unique": st.text(max_size=5) | json_values,
        "ttr": st.floats(0.001, 0.2) | json_values,
        "timeout": st.floats(0.001, 0.2) | json_values,
        "data": json_values,
        "secret": json_values,
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=6, unique=True)):
        msg[key] = draw(optional[key])
    if draw(st.booleans()):
        del msg["cmd"]
    return msg


small_ids = st.integers(0, 5) | st.sampled_from(["a", "b", ""])


@st.composite
def valid_messages(draw):
    """Well-formed messages of every command, so the fuzz also walks the
    real code paths (hand-outs, cancels, coalescing, ttr, timeouts)."""
    cmd = draw(st.sampled_from(["can_do", "cant_do", "do", "do", "do", "did", "metrics",
                                "cancel", "progress", "release"]))
    if cmd in ("can_do", "cant_do"):
        msg = {"cmd": cmd, "types": draw(st.lists(st.sampled_from(TYPES[:2]), min_size=1, max_size=2))}
        if cmd == "can_do" and draw(st.booleans()):
            msg["capacity"] = draw(st.integers(1, 4))
        return msg
    if cmd == "do":
        msg = {"cmd": "do", "id": draw(small_ids), "type": draw(st.sampled_from(TYPES[:2])),
               "arg": draw(json_values)}
        if draw(st.booleans()):
            msg["priority"] = draw(st.integers(-2, 2))
        if draw(st.booleans()):
            msg["bg"] = draw(st.booleans())
        if draw(st.booleans()):
            msg["unique"] = draw(st.sampled_from(["k1", "k2"]))
        if draw(st.booleans()):
            msg["ttr"] = draw(st.sampled_from([0.01, 0.05, 1]))
        if draw(st.booleans()):
            msg["timeout"] = draw(st.sampled_from([0.01, 0.05, 1]))
        return msg
    if cmd == "did":
        msg = {"cmd": "did", "id": draw(small_ids | st.integers(0, 1000))}
        if draw(st.booleans()):
            msg["res"] = draw(json_values)
        else:
            msg["err"] = draw(st.text(max_size=10))
        return msg
    if cmd == "progress":
        return {"cmd": cmd, "id": draw(small_ids | st.integers(0, 1000)), "data": draw(json_values)}
    if cmd in ("cancel", "release"):
        return {"cmd": cmd, "id": draw(small_ids | st.integers(0, 1000))}
    return {"cmd": "metrics"}


def raw_line(msg):
    try:
        return orjson.dumps(msg) + b"\r\n"
    except orjson.JSONEncodeError:
        return b"{}\r\n"


@pytest.fixture(scope="module")
def fuzz_server():
    srv = ServerProcess()
    yield srv
    srv.stop()


def drain_until_metrics(conn):
    """Everything the server says before the metrics answer is well formed."""
    before, metrics = sync(conn)
    for msg in before:
        assert isinstance(msg, dict) and isinstance(msg.get("cmd"), str), msg
        if msg["cmd"] == "error":
            assert isinstance(msg.get("error"), str)
    return before


def assert_healthy(srv):
    assert srv.proc.poll() is None, "server died: " + srv.stderr()[-2000:]
    assert roundtrip_ok(srv, type_="fz-check")


def assert_no_leftovers(srv):
    """Once every fuzz connection is gone, only background jobs (which
    outlive their submitters) may be left; a worker finishes those, and
    then nothing is queued or running."""
    mon = srv.connect()
    sweeper = srv.connect()
    try:
        wait_metrics(mon, lambda m: m["connections_open"] == 2, timeout=5,
                     what="the fuzz connections to close")
        sweeper.send({"cmd": "can_do", "types": [t for t in TYPES if t], "capacity": 10})
        deadline = time.monotonic() + 5
        while True:
            for msg in sync(sweeper)[0]:
                assert msg["cmd"] in ("do", "cancel"), msg
                if msg["cmd"] == "do":
                    sweeper.send({"cmd": "did", "id": msg["id"], "res": None})
            m = mon.metrics()
            if m["jobs_queued"] == 0 and m["jobs_running"] == 0:
                break
            assert time.monotonic() < deadline, "jobs left behind: %r" % m
            time.sleep(0.02)
    finally:
        mon.close()
        sweeper.close()
    assert "Traceback" not in srv.stderr()


@FUZZ
@given(data=st.binary(max_size=300), newline=st.booleans())
def test_random_bytes(fuzz_server, data, newline):
    c = fuzz_server.connect()
    try:
        c.send_raw(data + (b"\r\n" if newline else b""))
        # Finish any half line, then make sure the connection (or, if the
        # bytes happened to close it, the server) still answers.
        try:
            c.send_raw(b"\n")
            drain_until_metrics(c)
        except (ConnectionError, OSError):
            pass
    finally:
        c.close()
    assert fuzz_server.proc.poll() is None


def test_random_bytes_leave_server_healthy(fuzz_server):
    assert_healthy(fuzz_server)
    assert_no_leftovers(fuzz_server)


@FUZZ
@given(batch=st.lists(messages() | valid_messages(), min_size=1, max_size=8),
       workers=st.integers(0, 2))
def test_random_messages(fuzz_server, batch, workers):
    """A batch of random messages, with itself and up to two more
    connections working whatever it hands out by echoing dids; each
    connection must hear only well-formed messages."""
    c = fuzz_server.connect()
    helpers = [fuzz_server.connect() for _ in range(workers)]
    try:
        for h in helpers:
            h.send({"cmd": "can_do", "types": TYPES[:2], "capacity": 2})
        c.send_raw(b"".join(raw_line(m) for m in batch))
        try:
            for conn in [c] + helpers:
                for msg in drain_until_metrics(conn):
                    if msg["cmd"] == "do":
                        conn.send({"cmd": "did", "id": msg["id"], "res": msg["arg"]})
            drain_until_metrics(c)
        except (ConnectionError, OSError):
            pass
    finally:
        c.close()
        for h in helpers:
            h.close()
    assert fuzz_server.proc.poll() is None


def test_random_messages_leave_server_healthy(fuzz_server):
    assert_healthy(fuzz_server)
    assert_no_leftovers(fuzz_server)


@FUZZ
@given(batch=st.lists(messages() | valid_messages(), min_size=1, max_size=6), cut=st.integers(0, 400))
def test_random_messages_split_anywhere(fuzz_server, batch, cut):
    data = b"".join(raw_line(m) for m in batch)
    c = fuzz_server.connect()
    try:
        c.send_raw(data[:cut])
        c.send_raw(data[cut:])
        try:
            drain_until_metrics(c)
        except (ConnectionError, OSError):
            pass
    finally:
        c.close()


def test_fuzzing_cannot_touch_a_job_held_elsewhere(start_server):
    """SPEC 2.7 under fuzz: while a real worker holds a job, random did,
    cancel, progress and release messages with guessed ids from other
    connections change nothing; the real result still arrives, once."""
    srv = start_server()
    s = srv.connect()
    w = worker(srv, "held")
    s.send(do("real", "held", "arg"))
    job = take_job(w, "held")
    wid = job["id"]
    guesses = [wid, "real", 0, 1, -1, 2, 3]
    if isinstance(wid, int):
        guesses += [wid - 1, wid + 1, str(wid)]
    else:
        guesses += [wid + "x", wid[:-1]]

    @settings(max_examples=120, deadline=None)
    @given(cmd=st.sampled_from(["did", "cancel", "progress", "release"]),
           guess=st.sampled_from(guesses), extra=st.sampled_from([{}, {"res": 1}, {"err": "x"},
                                                                  {"data": 2}, {"res": 1, "err": "y"}]),
           also_worker=st.booleans())
    def attack(cmd, guess, extra, also_worker):
        c = srv.connect()
        try:
            if also_worker:
                c.send({"cmd": "can_do", "types": ["held"]})
            msg = dict({"cmd": cmd, "id": guess}, **extra)
            c.send(msg)
            before = drain_until_metrics(c)
            for m in before:
                assert m["cmd"] == "error", "a stranger got %r" % (m,)
        finally:
            c.close()

    attack()
    assert s.nothing_within(0.2), "the submitter heard something"
    w.send(did(wid, res="the real one"))
    s.expect("did", id="real", res="the real one")
    assert s.nothing_within(0.2)
    m = sync_quiet(s)
    assert m["jobs_done"] == 1 and m["jobs_running"] == 0


def test_fuzz_server_survives_half_open_sockets(fuzz_server):
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=5)
        sock.sendall(line(do(1, "fz-a", 1))[:7])
        sock.shutdown(socket.SHUT_WR)
        sock.close()
    assert_healthy(fuzz_server)
