"""SPEC section 1, black box: the wire protocol of a real server process,
spoken with raw JSON lines over real sockets."""
import itertools
import os
import time

import orjson
import pytest

from rawhelpers import (
    MISSING, ServerProcess, assert_same, can_do, cant_do, did, do, expect_error,
    roundtrip_ok, sync_quiet, take_job, wait_metrics, worker)

_types = itertools.count()


def fresh_type():
    return "proto-%d" % next(_types)


@pytest.fixture
def conn(shared):
    """Factory of connections to the shared server, closed after the test."""
    made = []

    def make():
        c = shared.connect()
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def still_usable(c, shared):
    """The connection answers a round trip and can still submit a job."""
    sync_quiet(c)
    t = fresh_type()
    w = worker(shared, t)
    try:
        c.send(do("after", t, [1, "x"]))
        job = take_job(w, t)
        w.send(did(job["id"], res="fine"))
        c.expect("did", id="after", res="fine")
    finally:
        w.close()


# -- framing -------------------------------------------------------------------

def test_every_reply_ends_in_crlf(conn, shared):
    c = conn()
    t = fresh_type()
    w = worker(shared, t)
    try:
        c.send({"cmd": "metrics"})
        assert c.recv_line().endswith(b"\r")
        c.send({"cmd": "bogus"})
        assert c.recv_line().endswith(b"\r")
        c.send(do(1, t, "a"))
        job_line = w.recv_line()
        assert job_line.endswith(b"\r") and b"\n" not in job_line
        wid = orjson.loads(job_line)["id"]
        w.send(did(wid, res="r"))
        assert c.recv_line().endswith(b"\r")
        # One message per line: the line holds exactly one JSON object.
        assert isinstance(orjson.loads(job_line), dict)
    finally:
        w.close()


def test_bare_lf_accepted(conn, shared):
    c = conn()
    c.send_raw(b'{"cmd":"metrics"}\n')
    c.expect("metrics")
    t = fresh_type()
    w = conn()
    w.send_raw(orjson.dumps(can_do(t)) + b"\n")
    c.send_raw(orjson.dumps(do(5, t, "lf")) + b"\n")
    job = take_job(w, t)
    w.send_raw(orjson.dumps(did(job["id"], res="ok")) + b"\n")
    c.expect("did", id=5, res="ok")


def test_mixed_line_endings_in_one_packet(conn):
    c = conn()
    c.send_raw(b'{"cmd":"metrics"}\r\n{"cmd":"metrics"}\n{"cmd":"metrics"}\r\n')
    for _ in range(3):
        c.expect("metrics")
    assert c.nothing_within(0.2)


def test_blank_lines_ignored(conn):
    c = conn()
    c.send_raw(b'\r\n\n\r\n{"cmd":"metrics"}\r\n\n\r\n\n{"cmd":"metrics"}\n\r\n')
    c.expect("metrics")
    c.expect("metrics")
    assert c.nothing_within(0.3), "blank lines must get no reply"


@pytest.mark.parametrize("space", [b"\f", b"\v", b" \x0c ", b"\x00"], ids=repr)
def test_a_line_of_what_json_does_not_call_white_space_is_refused(conn, space):
    """Blank is JSON's white space: space, tab, CR. A form feed is not."""
    c = conn()
    c.send_raw(space + b"\r\n" + b" \t \r\n")
    expect_error(c)
    assert c.nothing_within(0.2)
    c.send({"cmd": "metrics"})
    c.expect("metrics")


def test_message_split_across_packets(conn):
    c = conn()
    data = b'{"cmd":"metrics"}\r\n'
    for i in range(len(data)):
        c.send_raw(data[i:i + 1])
        if i in (3, 10, 17):
            time.sleep(0.02)
    c.expect("metrics")
    # CR and LF in different packets.
    c.send_raw(b'{"cmd":"metrics"}\r')
    time.sleep(0.05)
    c.send_raw(b"\n")
    c.expect("metrics")


def test_many_messages_in_one_packet(conn):
    c = conn()
    c.send_raw(b'{"cmd":"metrics"}\r\n' * 200)
    for _ in range(200):
        c.expect("metrics")


# -- max line ------------------------------------------------------------------

def padded_do(t, total, ending=b"\r\n"):
    """A valid `do` line of exactly `total` bytes before the line ending."""
    head = orjson.dumps(do(1, t, ""))
    pad = total - len(head)
    assert pad >= 0
    text = orjson.dumps(do(1, t, "x" * pad))
    assert len(text) == total
    return text + ending, "x" * pad


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_line_of_exactly_max_line_bytes_accepted(start_server, ending):
    srv = start_server("--max-line", "200")
    c = srv.connect()
    c.send(can_do("t"))
    data, arg = padded_do("t", 200, ending)
    c.send_raw(data)
    job = take_job(c, "t")
    assert job["arg"] == arg
    c.send(did(job["id"], res=1))
    c.expect("did", id=1, res=1)


def test_max_line_cr_and_lf_in_separate_packets(start_server):
    """The CR of a CR LF ending is not part of the line, even when the LF
    comes in a later packet."""
    srv = start_server("--max-line", "200")
    c = srv.connect()
    c.send(can_do("t"))
    data, arg = padded_do("t", 200)
    c.send_raw(data[:-1])
    time.sleep(0.05)
    c.send_raw(data[-1:])
    job = take_job(c, "t")
    assert job["arg"] == arg


def test_line_longer_than_max_line_gets_error_then_close(start_server):
    srv = start_server("--max-line", "200")
    t = "t"
    # Another connection with a job in flight is not affected.
    s = srv.connect()
    w = worker(srv, t)
    s.send(do("before", t, "keep"))
    job = take_job(w, t)

    bad = srv.connect()
    data, _ = padded_do(t, 201)
    bad.send_raw(data)
    expect_error(bad)
    assert bad.is_closed(3), "an over-long line closes that connection"

    # Nothing else is affected: the job is finished, and a new round trip works.
    w.send(did(job["id"], res="kept"))
    s.expect("did", id="before", res="kept")
    m = sync_quiet(s)
    assert m["jobs_added"] == 1, "the over-long line must not have queued a job"
    assert roundtrip_ok(srv)


def test_max_line_counts_bytes_not_characters(start_server):
    srv = start_server("--max-line", "200")
    ok = srv.connect()
    ok.send(can_do("t"))
    head = orjson.dumps(do(1, "t", ""))
    arg = "é" * ((200 - len(head)) // 2)
    text = orjson.dumps(do(1, "t", arg))
    assert len(text) <= 200
    ok.send_raw(text + b"\r\n")
    assert take_job(ok, "t")["arg"] == arg
    bad = srv.connect()
    text = orjson.dumps(do(1, "t", arg + "é"))       # 201 or 202 bytes, < 200 characters
    assert len(text) > 200 and len(text.decode()) < 200
    bad.send_raw(text + b"\r\n")
    expect_error(bad)
    assert bad.is_closed(3)


def test_messages_before_an_over_long_line_are_answered(start_server):
    srv = start_server("--max-line", "100")
    c = srv.connect()
    c.send_raw(b'{"cmd":"metrics"}\n{"cmd":"bogus","id":5}\r\n'
               + b'{"cmd":"do","id":1,"type":"t","arg":"' + b"x" * 200 + b'"}\r\n')
    c.expect("metrics")
    expect_error(c, id=5)
    expect_error(c)
    assert c.is_closed(3)


def test_over_long_line_without_newline_is_refused_early(start_server):
    """The server does not wait for a newline that may never come."""
    srv = start_server("--max-line", "1000")
    bad = srv.connect()
    bad.send_raw(b'{"cmd":"do","id":1,"type":"t","arg":"' + b"y" * 5000)
    expect_error(bad)
    assert bad.is_closed(3)
    assert roundtrip_ok(srv)


def test_default_max_line_is_one_mib(server):
    ok = server.connect()
    ok.send(can_do("t"))
    data, arg = padded_do("t", 1024 * 1024)
    ok.send_raw(data)
    job = take_job(ok, "t", timeout=10)
    assert job["arg"] == arg
    bad = server.connect()
    data, _ = padded_do("t", 1024 * 1024 + 1)
    bad.send_raw(data)
    expect_error(bad, timeout=10)
    assert bad.is_closed(5)
    # The good connection is unaffected.
    ok.send(did(job["id"], res="done"))
    ok.expect("did", id=1, res="done")


# -- strict JSON, non-objects, bad bytes ---------------------------------------

BAD_LINES = [
    b'{"cmd":"do","id":1,"type":"T","arg":NaN}',
    b'{"cmd":"do","id":1,"type":"T","arg":Infinity}',
    b'{"cmd":"do","id":1,"type":"T","arg":-Infinity}',
    b'{"cmd":"do","id":1,"type":"T","arg":nan}',
    b'{"cmd":"do","id":1,"type":"T","arg":1e400}',
    b'{"cmd":"do","id":1,"type":"T"}{"cmd":"do","id":2,"type":"T"}',
    b'{"cmd":"do","id":1,"type":"T"} {"cmd":"do","id":2,"type":"T"}',
    b'{"cmd":"do","id":1,"type":"T"} 1',
    b'{"cmd":"do","id":1,"type":"T"}x',
    b'{"cmd":"do","id":1,"type":"T"},',
    b'{"cmd":"do","id":1,"type":"T"}]',
    b'{"cmd":"do","id":1,"type":"T",}',
    b"{'cmd':'do','id':1,'type':'T'}",
    b'{cmd:"do",id:1,type:"T"}',
    b'{"cmd":"do","id":1,"type":"T","arg":01}',
    b'{"cmd":"do","id":1,"type":"T","arg":0x10}',
    b'{"cmd":"do","id":1,"type":"T","arg":+1}',
    b'{"cmd":"do","id":1,"type":"T","arg":.5}',
    b'{"cmd":"do","id":1,"type":"T","arg":undefined}',
    b'{"cmd":"do","id":1,"type":"T"} // comment',
    b'{"cmd":"do","id":1,"type":"T","arg":"tab\there"}',
    b'{"cmd":"do","id":1,"type":"T","arg":"\\x41"}',
    b'{"cmd":"do","id":1,"type":"T"',
    b'{"cmd":"do","id":1,"type":"T","arg":"unterminated}',
]


@pytest.mark.parametrize("raw", BAD_LINES, ids=[b.decode("utf-8", "replace")[:40] for b in BAD_LINES])
def test_invalid_json_refused(conn, raw):
    c = conn()
    t = fresh_type()
    c.send_raw(raw.replace(b'"T"', b'"' + t.encode() + b'"') + b"\r\n")
    expect_error(c)
    m = sync_quiet(c)
    assert m["types"].get(t, {}).get("queued", 0) == 0, "an invalid line must queue nothing"


BAD_BYTES = [
    b'{"cmd":"do","id":1,"type":"T","arg":"\xff"}',
    b'{"cmd":"do","id":1,"type":"T","arg":"\xc0\xaf"}',          # overlong
    b'{"cmd":"do","id":1,"type":"T","arg":"\xed\xa0\x80"}',      # surrogate
    b'{"cmd":"do","id":1,"type":"T","arg":"\xe6\x97"}',          # truncated
    b'{"cmd":"do","id":1,"type":"T","arg":"\xf4\x90\x80\x80"}',  # > U+10FFFF
    b'{"cmd":"do","id":1,"type":"T"}\x00',
    b'\x00{"cmd":"do","id":1,"type":"T"}',
    b'{"cmd":"do","id":1,"type":"T","arg":"a\x00b"}',
    b'\x00',
    b'\x00\x00\x00\x00',
    b'{"cmd":"do","id":1,"type":"T","arg":"\x1f"}',
    b'\xff\xfe\xfd',
]


@pytest.mark.parametrize("raw", BAD_BYTES, ids=[repr(b)[:40] for b in BAD_BYTES])
def test_invalid_bytes_refused(conn, raw):
    c = conn()
    t = fresh_type()
    c.send_raw(raw.replace(b'"T"', b'"' + t.encode() + b'"') + b"\r\n")
    expect_error(c)
    m = sync_quiet(c)
    assert m["types"].get(t, {}).get("queued", 0) == 0


NON_OBJECTS = [b"[]", b"1", b"-1.5", b'"metrics"', b"null", b"true", b"false",
               b'[{"cmd":"metrics"}]', b'["metrics"]', b"{}"]


@pytest.mark.parametrize("raw", NON_OBJECTS, ids=[b.decode() for b in NON_OBJECTS])
def test_non_objects_and_empty_object_refused(conn, shared, raw):
    c = conn()
    c.send_raw(raw + b"\r\n")
    expect_error(c)
    still_usable(c, shared)


def test_deep_nesting_refused_and_usable(conn, shared):
    c = conn()
    t = fresh_type()
    c.send_raw(b'{"cmd":"do","id":1,"type":"' + t.encode() + b'","arg":'
               + b"[" * 100000 + b"]" * 100000 + b"}\r\n")
    expect_error(c, timeout=10)
    c.send_raw(b"[" * 50000 + b"\r\n")
    expect_error(c, timeout=10)
    m = sync_quiet(c)
    assert m["types"].get(t, {}).get("queued", 0) == 0
    still_usable(c, shared)


HUGE_NUMBERS = [b"9" * 20000, b"-" + b"9" * 400, b"1e400", b"-1e400", b"1" + b"0" * 400 + b".5"]


@pytest.mark.parametrize("depth", [300, 5000])
def test_deep_nesting_refusal_carries_the_id(conn, depth):
    """Valid JSON with an id, refused because the server cannot carry
    nesting that deep: the error carries the id."""
    c = conn()
    c.send_raw(b'{"cmd":"do","id":"deep","type":"' + fresh_type().encode() + b'","arg":'
               + b"[" * depth + b"]" * depth + b"}\r\n")
    expect_error(c, id="deep")


@pytest.mark.parametrize("raw", HUGE_NUMBERS, ids=["20000-digits", "minus-400-digits", "1e400", "-1e400", "400-digit-float"])
def test_huge_number_literal_refused_and_usable(conn, shared, raw):
    c = conn()
    t = fresh_type()
    c.send_raw(b'{"cmd":"do","id":1,"type":"' + t.encode() + b'","arg":' + raw + b"}\r\n")
    expect_error(c)
    assert sync_quiet(c)["types"].get(t, {}).get("queued", 0) == 0
    still_usable(c, shared)


@pytest.mark.parametrize("raw", [HUGE_NUMBERS[0], HUGE_NUMBERS[2]], ids=["20000-digits", "1e400"])
def test_huge_number_refusal_carries_the_id(conn, raw):
    """The line is valid RFC 8259 JSON with an id; the server cannot carry
    the number, so it refuses the message, and the error carries the id."""
    c = conn()
    c.send_raw(b'{"cmd":"do","id":"big","type":"' + fresh_type().encode() + b'","arg":' + raw + b"}\r\n")
    expect_error(c, id="big")


def test_connection_stays_usable_after_every_kind_of_bad_line(conn, shared):
    c = conn()
    for raw in BAD_LINES + BAD_BYTES + NON_OBJECTS:
        c.send_raw(raw + b"\r\n")
    for _ in range(len(BAD_LINES + BAD_BYTES + NON_OBJECTS)):
        expect_error(c)
    still_usable(c, shared)


# -- cmd and fields ------------------------------------------------------------

def test_unknown_cmd_refused_with_id(conn, shared):
    c = conn()
    c.send({"cmd": "bogus"})
    expect_error(c)
    c.send({"cmd": "bogus", "id": 7})
    expect_error(c, id=7)
    c.send({"cmd": "DO", "id": "x", "type": "t"})
    expect_error(c, id="x")
    c.send({"cmd": "", "id": 0})
    expect_error(c, id=0)
    still_usable(c, shared)


@pytest.mark.parametrize("msg", [
    {"id": 1, "type": "t"},
    {"cmd": None, "id": 1},
    {"cmd": 1, "id": 1},
    {"cmd": ["do"], "id": 1},
    {"cmd": {"do": 1}, "id": 1},
    {"cmd": True, "id": 1},
], ids=["no-cmd", "null", "int", "list", "object", "bool"])
def test_missing_or_ill_typed_cmd_refused(conn, shared, msg):
    c = conn()
    c.send(msg)
    expect_error(c, id=1)
    still_usable(c, shared)


BAD_DO = [
    ({"cmd": "do", "type": "T", "arg": 1}, MISSING),
    ({"cmd": "do", "id": None, "type": "T"}, MISSING),
    ({"cmd": "do", "id": True, "type": "T"}, MISSING),
    ({"cmd": "do", "id": False, "type": "T"}, MISSING),
    ({"cmd": "do", "id": 1.5, "type": "T"}, MISSING),
    ({"cmd": "do", "id": [1], "type": "T"}, MISSING),
    ({"cmd": "do", "id": {"a": 1}, "type": "T"}, MISSING),
    ({"cmd": "do", "id": 1, "arg": 1}, 1),
    ({"cmd": "do", "id": "s", "type": None}, "s"),
    ({"cmd": "do", "id": 2, "type": 5}, 2),
    ({"cmd": "do", "id": 3, "type": ["T"]}, 3),
    ({"cmd": "do", "id": 4, "type": True}, 4),
    ({"cmd": "do", "id": 5, "type": {"T": 1}}, 5),
]


@pytest.mark.parametrize("msg,eid", BAD_DO, ids=[str(i) for i in range(len(BAD_DO))])
def test_do_with_missing_or_ill_typed_field_refused(conn, shared, msg, eid):
    c = conn()
    t = fresh_type()
    msg = dict(msg)
    if msg.get("type") == "T":
        msg["type"] = t
    c.send(msg)
    expect_error(c, id=eid)
    m = sync_quiet(c)
    assert m["types"].get(t, {}).get("queued", 0) == 0, "refused job was queued"
    still_usable(c, shared)


@pytest.mark.parametrize("msg", [
    {"cmd": "can_do"},
    {"cmd": "can_do", "types": "T"},
    {"cmd": "can_do", "types": None},
    {"cmd": "can_do", "types": {"T": 1}},
    {"cmd": "can_do", "types": ["T", 1]},
    {"cmd": "can_do", "types": ["T", None]},
    {"cmd": "can_do", "types": [["T"]]},
    {"cmd": "can_do", "types": ["T"], "capacity": True},
    {"cmd": "can_do", "types": ["T"], "capacity": False},
    {"cmd": "can_do", "types": ["T"], "capacity": 0},
    {"cmd": "can_do", "types": ["T"], "capacity": -1},
    {"cmd": "can_do", "types": ["T"], "capacity": 1.5},
    {"cmd": "can_do", "types": ["T"], "capacity": "2"},
    {"cmd": "can_do", "types": ["T"], "capacity": [2]},
], ids=lambda m: orjson.dumps(m).decode())
def test_can_do_with_missing_or_ill_typed_field_refused(conn, shared, msg):
    """A refused can_do changes nothing: the connection is no worker."""
    c = conn()
    t = fresh_type()
    msg = orjson.loads(orjson.dumps(msg).replace(b'"T"', b'"' + t.encode() + b'"'))
    c.send(msg)
    expect_error(c)
    m = sync_quiet(c)
    assert m["types"].get(t, {}).get("workers", 0) == 0, "a refused can_do made a worker"
    # Prove it: a job of that type is not handed to this connection.
    s = conn()
    s.send(do(1, t, "x"))
    sync_quiet(s)
    assert c.nothing_within(0.1)
    still_usable(c, shared)


@pytest.mark.parametrize("msg", [
    {"cmd": "cant_do"},
    {"cmd": "cant_do", "types": "T"},
    {"cmd": "cant_do", "types": None},
    {"cmd": "cant_do", "types": [1]},
    {"cmd": "cant_do", "types": [True]},
], ids=lambda m: orjson.dumps(m).decode())
def test_cant_do_with_missing_or_ill_typed_field_refused(conn, shared, msg):
    """A refused cant_do changes nothing: the worker still gets its jobs."""
    t = fresh_type()
    c = worker(shared, t)
    try:
        msg = orjson.loads(orjson.dumps(msg).replace(b'"T"', b'"' + t.encode() + b'"'))
        c.send(msg)
        expect_error(c)
        s = conn()
        s.send(do(1, t, "x"))
        job = take_job(c, t)
        c.send(did(job["id"], res=None))
        s.expect("did", id=1, res=None)
    finally:
        c.close()


def test_did_with_missing_or_ill_typed_field_refused(conn, shared):
    """Each bad did is refused (with the id when it had a usable one) and
    the worker still holds its job: a proper did afterwards finishes it."""
    t = fresh_type()
    w = worker(shared, t)
    s = conn()
    try:
        s.send(do("job", t, "a"))
        wid = take_job(w, t)["id"]
        w.send({"cmd": "did", "res": 1})                       # no id
        expect_error(w)
        w.send({"cmd": "did", "id": True, "res": 1})           # bool id
        expect_error(w)
        w.send({"cmd": "did", "id": None, "res": 1})
        expect_error(w)
        w.send({"cmd": "did", "id": [wid], "res": 1})
        expect_error(w)
        w.send({"cmd": "did", "id": wid})                      # neither res nor err
        expect_error(w, id=wid)
        w.send({"cmd": "did", "id": wid, "res": 1, "err": "x"})  # both
        expect_error(w, id=wid)
        for bad_err in (5, None, ["x"], {"e": 1}, True):
            w.send({"cmd": "did", "id": wid, "err": bad_err})  # err is text
            expect_error(w, id=wid)
        assert s.nothing_within(0.2), "a refused did reached the submitter"
        w.send(did(wid, res="the one"))
        got = s.expect("did", id="job", res="the one")
        assert "err" not in got
        assert s.nothing_within(0.2)
    finally:
        w.close()


def test_metrics_answer_is_an_object(conn):
    c = conn()
    c.send({"cmd": "metrics"})
    assert isinstance(c.expect("metrics")["metrics"], dict)


# -- payloads ------------------------------------------------------------------

PAYLOADS = [
    None, True, False, 0, 1, -1, 42, 2 ** 31, -2 ** 31, 2 ** 53 + 1, -(2 ** 53) - 1,
    2 ** 63 - 1, -2 ** 63, 2 ** 63, 2 ** 64 - 1,
    0.0, -0.0, 1.5, -2.25, 0.1, 1 / 3, 1e300, -1e300, 1e-300, 5e-324,
    1.7976931348623157e308, 2.2250738585072014e-308, 1e16, 1e19, 1.0, 123456789.12345678,
    "", "a", "é", "日本語", "😀", "\U0010ffff", "\u0000", "\n\r\t\b\f", '"\\/', "\u2028\u2029",
    "\x7f", "\ufeff", "\x01\x1f", "</script>", "a" * 10000,
    [], {}, [None], [[[]]], {"": ""}, {"a": [1, {"b": None, "c": [True, 2.5]}]},
    {"é": {"😀": ["\u0000"]}}, [1, "1", 1.0, True, None, -0.0],
    {"nested": [[[[[[[[[[{"deep": 2 ** 63 - 1}]]]]]]]]]]},
    [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
    {str(i): i for i in range(200)},
]


def test_payloads_round_trip_exactly(conn, shared):
    """arg reaches the worker and res reaches the submitter as the same
    JSON value, for each payload."""
    t = fresh_type()
    w = worker(shared, t, capacity=len(PAYLOADS))
    s = conn()
    try:
        s.send(*[do(i, t, p) for i, p in enumerate(PAYLOADS)])
        jobs = [take_job(w, t) for _ in PAYLOADS]
        for i, (job, p) in enumerate(zip(jobs, PAYLOADS)):
            assert_same(job["arg"], p, "arg #%d" % i)
        w.send(*[did(job["id"], res=p) for job, p in zip(jobs, PAYLOADS)])
        for i, p in enumerate(PAYLOADS):
            got = s.expect("did", id=i)
            assert_same(got["res"], p, "res #%d" % i)
    finally:
        w.close()


def test_payloads_written_with_escapes_and_spacing_round_trip(conn, shared):
    """The same JSON value however it is spelled on the wire."""
    t = fresh_type()
    w = worker(shared, t)
    s = conn()
    try:
        s.send_raw(b' { "cmd" : "do" , "id" : 1 , "type" : "' + t.encode()
                   + b'" , "arg" : { "k\\u00e9" : [ "\\ud83d\\ude00" , 1E2 , -0.0 , 2.5e-3 ] } } \r\n')
        job = take_job(w, t)
        assert_same(job["arg"], {"ké": ["😀", 100.0, -0.0, 0.0025]})
        w.send_raw(b'{"cmd":"did","id":' + orjson.dumps(job["id"])
                   + b',"res":"\\u0000\\t\\"\\\\\\/"}\r\n')
        got = s.expect("did", id=1)
        assert_same(got["res"], '\u0000\t"\\/')
    finally:
        w.close()


ERR_TEXTS = ["", "boom", "é日本😀", "\u0000\n\r", '{"cmd":"did"}', "x" * 5000]


def test_err_round_trips_exactly(conn, shared):
    t = fresh_type()
    w = worker(shared, t, capacity=len(ERR_TEXTS))
    s = conn()
    try:
        s.send(*[do(i, t) for i in range(len(ERR_TEXTS))])
        jobs = [take_job(w, t) for _ in ERR_TEXTS]
        for job in jobs:
            assert job["arg"] is None, "absent arg is null"
        w.send(*[did(job["id"], err=e) for job, e in zip(jobs, ERR_TEXTS)])
        for i, e in enumerate(ERR_TEXTS):
            got = s.expect("did", id=i)
            assert_same(got["err"], e, "err #%d" % i)
            assert "res" not in got
    finally:
        w.close()


TOO_BIG = [b"18446744073709551616", b"-9223372036854775809", b"100000000000000000000000000000",
           b"[1,18446744073709551616]", b'{"a":{"b":-18446744073709551617}}']


@pytest.mark.parametrize("raw", TOO_BIG, ids=[b.decode()[:30] for b in TOO_BIG])
def test_integer_beyond_64_bits_in_arg_refused(conn, shared, raw):
    t = fresh_type()
    w = worker(shared, t)
    s = conn()
    try:
        s.send_raw(b'{"cmd":"do","id":9,"type":"' + t.encode() + b'","arg":' + raw + b"}\r\n")
        expect_error(s, id=9)
        assert w.nothing_within(0.2), "a refused job was handed out"
        m = sync_quiet(s)
        assert m["types"][t]["queued"] == 0
        # The id is not taken: the same id works at once.
        s.send(do(9, t, "ok"))
        job = take_job(w, t)
        assert job["arg"] == "ok"
        w.send(did(job["id"], res="fine"))
        s.expect("did", id=9, res="fine")
    finally:
        w.close()


@pytest.mark.parametrize("raw", TOO_BIG, ids=[b.decode()[:30] for b in TOO_BIG])
def test_integer_beyond_64_bits_in_res_refused(conn, shared, raw):
    t = fresh_type()
    w = worker(shared, t)
    s = conn()
    try:
        s.send(do("j", t, None))
        wid = take_job(w, t)["id"]
        w.send_raw(b'{"cmd":"did","id":' + orjson.dumps(wid) + b',"res":' + raw + b"}\r\n")
        expect_error(w, id=wid)
        assert s.nothing_within(0.2), "a refused result was delivered"
        # The worker still holds the job and can finish it properly.
        w.send(did(wid, res=2 ** 64 - 1))
        got = s.expect("did", id="j")
        assert_same(got["res"], 2 ** 64 - 1)
    finally:
        w.close()


# -- ids -----------------------------------------------------------------------

def test_duplicate_submitter_id_refused_first_job_unaffected(conn, shared):
    t = fresh_type()
    s = conn()
    s.send(do(1, t, "first"))
    s.send(do(1, t, "second"))
    expect_error(s, id=1)
    m = sync_quiet(s)
    assert m["types"][t]["queued"] == 1, "the duplicate must not be queued"
    w = worker(shared, t, capacity=5)
    try:
        job = take_job(w, t)
        assert job["arg"] == "first"
        # Still a duplicate while running.
        s.send(do(1, t, "third"))
        expect_error(s, id=1)
        assert w.nothing_within(0.2)
        w.send(did(job["id"], res="r1"))
        s.expect("did", id=1, res="r1")
        assert s.nothing_within(0.1)
        # Finished: the id is free again.
        s.send(do(1, t, "again"))
        job = take_job(w, t)
        assert job["arg"] == "again"
        w.send(did(job["id"], res="r2"))
        s.expect("did", id=1, res="r2")
    finally:
        w.close()


def test_duplicate_string_id_refused(conn, shared):
    t = fresh_type()
    s = conn()
    s.send(do("dup", t, 1), do("dup", t, 2))
    expect_error(s, id="dup")
    assert sync_quiet(s)["types"][t]["queued"] == 1


def test_id_reusable_after_failed_job(conn, shared):
    t = fresh_type()
    w = worker(shared, t)
    s = conn()
    try:
        s.send(do("k", t, 1))
        w.send(did(take_job(w, t)["id"], err="bad"))
        s.expect("did", id="k", err="bad")
        s.send(do("k", t, 2))
        job = take_job(w, t)
        assert job["arg"] == 2
    finally:
        w.close()


def test_same_id_on_two_connections_is_fine_and_wids_differ(conn, shared):
    t = fresh_type()
    a, b = conn(), conn()
    w = worker(shared, t, capacity=2)
    try:
        a.send(do(1, t, "from a"))
        b.send(do(1, t, "from b"))
        j1, j2 = take_job(w, t), take_job(w, t)
        assert j1["id"] != j2["id"], "WIDs are unique among unfinished jobs"
        by_arg = {j1["arg"]: j1, j2["arg"]: j2}
        w.send(did(by_arg["from b"]["id"], res="to b"))
        w.send(did(by_arg["from a"]["id"], res="to a"))
        a.expect("did", id=1, res="to a")
        b.expect("did", id=1, res="to b")
        assert a.nothing_within(0.1) and b.nothing_within(0.1)
    finally:
        w.close()


IDS = [0, 1, -1, 2 ** 63 - 1, -2 ** 63, "", "1", "0", "é😀", "a b\n", "x" * 1000]


def test_int_and_string_ids_come_back_as_sent(conn, shared):
    """1 and "1" are different ids; each result comes back under its own,
    with its own type."""
    t = fresh_type()
    w = worker(shared, t, capacity=len(IDS))
    s = conn()
    try:
        s.send(*[do(i, t, {"i": n}) for n, i in enumerate(IDS)])
        jobs = [take_job(w, t) for _ in IDS]
        assert len({orjson.dumps(j["id"]) for j in jobs}) == len(IDS), "WIDs unique"
        w.send(*[did(j["id"], res=j["arg"]["i"]) for j in jobs])
        got = {}
        for _ in IDS:
            msg = s.expect("did")
            got[orjson.dumps(msg["id"])] = msg
        for n, i in enumerate(IDS):
            msg = got.get(orjson.dumps(i))
            assert msg is not None, "no did for id %r (got %r)" % (i, list(got))
            assert_same(msg["id"], i, "id")
            assert msg["res"] == n
    finally:
        w.close()


@pytest.mark.parametrize("bad_id", [2 ** 64, -2 ** 63 - 1, 2 ** 64 + 1, -(10 ** 39) - 7])
def test_id_beyond_64_bits_refused_and_echoed_exactly(conn, shared, bad_id):
    """orjson reads such an integer as a float; the error still carries the
    very number sent, not a rounded one."""
    t = fresh_type()
    s = conn()
    s.send_raw(b'{"cmd":"do","id":' + str(bad_id).encode() + b',"type":"' + t.encode() + b'"}\r\n')
    reply = s.recv_line()
    assert reply.startswith(b'{"cmd":"error"'), reply
    assert reply.endswith(b',"id":%d}\r' % bad_id), reply
    # After a nested value the id is found by the slow parser, with the
    # same limit: 40 digits, a sign not counted.
    s.send_raw(b'{"cmd":"do","x":[1],"id":%d,"type":"%b"}\r\n' % (bad_id, t.encode()))
    assert s.recv_line().endswith(b',"id":%d}\r' % bad_id)
    assert sync_quiet(s)["types"].get(t, {}).get("queued", 0) == 0


REFUSED_WITH_AN_ID = [
    (b'{"cmd":"can_do","types":5,"id":"c"}', "c"),
    (b'{"cmd":"can_do","types":["x"],"capacity":0,"id":4}', 4),
    (b'{"cmd":"can_do","types":["x"],"capacity":true,"id":[4]}', [4]),
    (b'{"cmd":"cant_do","types":null,"id":"d"}', "d"),
    (b'{"cmd":"auth","secret":5,"id":"a"}', "a"),
    (b'{"cmd":"progress","id":"p"}', "p"),
    (b'{"cmd":"do","id":"g","type":"x"} trailing', "g"),
    (b'{"cmd":"metrics","id":7}{"cmd":"metrics"}', 7),
    (b'  {"cmd":"do","id":"nan","type":"x","arg":NaN}', "nan"),
    (b'{"cmd":"do","id":"utf","type":"x","arg":"\xff"}', "utf"),
    (b'{"cmd":"do","id":null,"type":"x"}', None),
    # After a nested value, with the error after the id: found by walking the members
    (b'{"cmd":"do","arg":[1,{"a":"]}"}],"id":8,"x":tru}', 8),
    (b'{"cmd":"do","arg":[1],"id":"tc","type":"x",}', "tc"),
    (b'{"cmd":"do","arg":{"b":[]},"id":9,"type":"x"', 9),
    (b'{"cmd":"do","arg":[1],"id":[2,"x"],"type":"x","arg":"\\q"}', [2, "x"]),
    (b'{"cmd":"do","arg":[1],"id":10,"type":"x","a":"\x01"}', 10),
    (b'{"cmd":"do","arg":[1],"\\u0069d":"esc","x":tru}', "esc"),
]


@pytest.mark.parametrize("raw,where", [
    (b'{"cmd":"do","id":4,"type":"t","arg":"\xff"}', 37),
    (b'{"cmd":"do","id":4,"type":"t","arg":"\xe2\x82"}', 37),
    (b'{"cmd":"do","id":4,"type":"t","arg":"\xed\xa0\x80"}', 37),     # a surrogate, encoded
])
def test_invalid_utf8_is_named_with_where_it_is(conn, shared, raw, where):
    c = conn()
    c.send_raw(raw + b"\r\n")
    assert expect_error(c, id=4)["error"] == "invalid UTF-8 at byte offset %d of the line" % where
    still_usable(c, shared)


def test_a_long_invalid_line_keeps_its_leading_id_and_costs_no_slow_parse(conn, shared):
    """Past 64 KiB the slow parser is not run: an id before any nested value
    is still found (where clients put it), one after it is not."""
    c = conn()
    pad = b"[" + b"1," * 40000 + b"1]"
    c.send_raw(b'{"cmd":"do","id":"lead","type":"x","arg":' + pad + b',NaN}\r\n')
    expect_error(c, id="lead")
    c.send_raw(b'{"cmd":"do","arg":' + pad + b',"id":"late","type":"x"} trailing\r\n')
    assert "id" not in expect_error(c)
    c.send_raw(b'{"cmd":"do","arg":[1],"id":"short","type":"x"} trailing\r\n')
    expect_error(c, id="short")             # a short one is parsed whole
    still_usable(c, shared)


@pytest.mark.parametrize("raw,eid", REFUSED_WITH_AN_ID, ids=[
    "can_do-types", "can_do-capacity", "list-id", "cant_do", "auth", "progress", "trailing-garbage",
    "two-values", "NaN", "invalid-utf8", "null-id", "nested-then-bad-literal",
    "nested-then-trailing-comma", "nested-then-cut-short", "nested-then-bad-escape",
    "nested-then-control-character", "escaped-key"])
def test_every_refusal_of_a_message_with_an_id_carries_it(conn, shared, raw, eid):
    """SPEC 1: an error carries "id" when the refused message had one, for
    any command and whatever was wrong, invalid JSON after the id included."""
    c = conn()
    c.send_raw(raw + b"\r\n")
    expect_error(c, id=eid)
    still_usable(c, shared)


def test_wid_is_the_servers_and_only_echoed(conn, shared):
    """The worker echoes the WID it was given; the submitter's id never
    needs to match it, and a did with the submitter's id is refused unless
    it happens to be the WID."""
    t = fresh_type()
    w = worker(shared, t)
    s = conn()
    try:
        s.send(do("submitter-id", t, 1))
        job = take_job(w, t)
        if job["id"] != "submitter-id":
            w.send(did("submitter-id", res="wrong"))
            expect_error(w, id="submitter-id")
        w.send(did(job["id"], res="right"))
        s.expect("did", id="submitter-id", res="right")
    finally:
        w.close()


def test_one_connection_both_submitter_and_worker(conn):
    c = conn()
    t = fresh_type()
    c.send(can_do(t), do("self", t, [1, 2]))
    job = take_job(c, t)
    assert job["arg"] == [1, 2]
    c.send(did(job["id"], res="mine"))
    c.expect("did", id="self", res="mine")


def test_cant_do_unknown_type_is_harmless(conn, shared):
    c = conn()
    c.send(cant_do(fresh_type()))
    sync_quiet(c)
    still_usable(c, shared)


def test_server_alive_after_protocol_abuse(shared):
    assert shared.proc.poll() is None
    m = wait_metrics(shared.connect(), lambda m: True)
    assert "jobs_added" in m
    assert "Traceback" not in shared.stderr()


# -- ids the server cannot echo, numbers too small for a double -----------------

@pytest.mark.parametrize("raw_id", [b'"\\ud800"', b"[" * 300 + b"]" * 300],
                         ids=["lone-surrogate", "nested-300"])
def test_an_id_that_cannot_be_echoed_still_gets_an_error_and_the_connection_lives(
        conn, shared, raw_id):
    c = conn()
    for cmd in (b"do", b"did", b"nope"):
        c.send_raw(b'{"cmd":"' + cmd + b'","id":' + raw_id + b',"type":"t"}\r\n')
        msg = expect_error(c)
        assert "id" not in msg or msg["id"] is not None
    still_usable(c, shared)


@pytest.mark.parametrize("raw", [b"1.5e-400", b"-2e-999", b"[0, 1e-500]", b"1E-0400",
                                 b"[0.0, 0." + b"0" * 230 + b"1e-99]"])
def test_a_number_too_small_for_a_double_is_refused_not_zeroed(conn, shared, raw):
    c = conn()
    c.send_raw(b'{"cmd":"do","id":"tiny","type":"' + fresh_type().encode() + b'","arg":' + raw
               + b"}\r\n")
    expect_error(c, id="tiny")
    still_usable(c, shared)


@pytest.mark.parametrize("raw", [b"0.0", b"-0.0", b"0e10", b"[0.000, 5e-324]", b"[0.0, 1e-300]",
                                 b"[0.0, 0e-400, 12345678901234567890]"])
def test_zero_and_the_smallest_double_still_pass(conn, shared, raw):
    worker, client = conn(), conn()
    t = fresh_type()
    worker.send({"cmd": "can_do", "types": [t]})
    sync_quiet(worker)
    client.send_raw(b'{"cmd":"do","id":"z","type":"' + t.encode() + b'","arg":' + raw + b"}\r\n")
    job = worker.expect("do")
    assert job["arg"] == orjson.loads(raw)
    worker.send({"cmd": "did", "id": job["id"], "res": None})
    client.expect("did", id="z")


@pytest.mark.parametrize("other", [b"18446744073709551616", b"1e-400", b"[1,-9223372036854775809]"])
def test_a_number_in_an_unknown_field_does_not_refuse_an_exact_payload(conn, shared, other):
    """Only the payload must be carried exactly: a number beyond 64 bits in
    a field Deputy ignores (say a tracing id) is no reason to refuse the
    message, even when the payload itself holds numbers that could be
    inexact (0.0, a big whole float)."""
    worker, client = conn(), conn()
    t = fresh_type()
    worker.send({"cmd": "can_do", "types": [t]})
    sync_quiet(worker)
    client.send_raw(b'{"cmd":"do","id":"z","type":"' + t.encode() + b'","arg":[0.0,1e19],'
                    b'"trace":' + other + b"}\r\n")
    job = worker.expect("do")
    assert job["arg"] == [0.0, 1e19]
    wid = orjson.dumps(job["id"])
    worker.send_raw(b'{"cmd":"progress","id":' + wid + b',"data":0.0,"trace":' + other + b"}\r\n")
    assert client.expect("progress", id="z")["data"] == 0.0
    worker.send_raw(b'{"cmd":"did","id":' + wid + b',"res":{"r":0.0},"trace":' + other + b"}\r\n")
    assert client.expect("did", id="z")["res"] == {"r": 0.0}


@pytest.mark.parametrize("other", [b"1e400", b'{"deep":[-1e400]}', b'"\\ud800"'])
def test_a_value_orjson_cannot_read_refuses_the_line_even_in_an_unknown_field(conn, shared, other):
    """What README says: a number beyond a double's range or a lone
    surrogate makes the whole line invalid, wherever it is; the message is
    refused with its id and nothing is queued."""
    c = conn()
    t = fresh_type()
    c.send_raw(b'{"cmd":"do","id":"inf","type":"' + t.encode() + b'","arg":1,"trace":'
               + other + b"}\r\n")
    expect_error(c, id="inf")
    assert t not in sync_quiet(c)["types"], "the refused job must not be queued"
    still_usable(c, shared)


def test_a_key_given_twice_counts_with_its_last_value(conn, shared):
    worker, client = conn(), conn()
    t = fresh_type()
    worker.send({"cmd": "can_do", "types": [t]})
    sync_quiet(worker)
    client.send_raw(b'{"cmd":"do","id":"first","id":"last","type":"' + t.encode()
                    + b'","arg":{"a":1,"a":2}}\r\n')
    job = worker.expect("do")
    assert job["arg"] == {"a": 2}
    worker.send({"cmd": "did", "id": job["id"], "res": None})
    client.expect("did", id="last")


def test_deep_nesting_elsewhere_in_the_line_does_not_let_an_inexact_payload_through(conn, shared):
    """The second, exact parse cannot go as deep as orjson: a line it cannot
    check is refused, not passed on with its payload altered."""
    c = conn()
    pad = b"[" * 1000 + b"]" * 1000
    c.send_raw(b'{"cmd":"do","id":"deep","type":"' + fresh_type().encode()
               + b'","arg":[1e-400,123456789012345678901234567890],"pad":' + pad + b"}\r\n")
    expect_error(c, id="deep")
    still_usable(c, shared)


BIG_BODIES = [
    b"caf\\u00e9 \\n\\/ \xc3\xa9\xf0\x9f\x98\x80 " + b"x" * 70000,     # escapes, UTF-8
    # Re-encoded instead (where the string ends is a parser's question);
    # \u0041 shows it, as orjson spells it A.
    b"\\u0041" + b"x" * 70000 + b"\\\\",    # ends in an escaped backslash
    b"\\\"quoted\\\" \\u0041" + b"y" * 70000,   # escaped quotes
    # 60 KB as sent, but 10,000 characters: as sent too (the line is over
    # 32 KiB); without pysimdjson, re-encoded (the limit counts characters
    # there, README), which costs little for so few.
    b"\\u0041" * 10000,
]
BIG_BODY_IDS = ["escapes", "backslash-end", "quotes", "few-characters"]
NO_SIMDJSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_simdjson")


@pytest.fixture(scope="module")
def without_simdjson():
    """A server that cannot import pysimdjson (optional: it only makes big
    lines cheaper)."""
    srv = ServerProcess(env={"PYTHONPATH": NO_SIMDJSON})
    yield srv
    srv.stop()


@pytest.mark.parametrize("body", BIG_BODIES, ids=BIG_BODY_IDS)
def test_a_big_string_is_the_same_value_on_the_other_side(shared, body):
    """Big string payloads, which Deputy slices out of the line rather than
    re-encoding when it can: escapes and all, the worker gets the arg and
    the submitter the res as the same JSON value; without quotes inside,
    as the very bytes that were sent."""
    big_string_round_trip(shared, body, verbatim=b'\\"' not in body and not body.endswith(b"\\"))


@pytest.mark.parametrize("body", BIG_BODIES, ids=BIG_BODY_IDS)
def test_without_pysimdjson_a_big_string_is_the_same_value_too(without_simdjson, body):
    big_string_round_trip(without_simdjson, body, verbatim=body.startswith(b"caf"))


def big_string_round_trip(server, body, verbatim):
    t = fresh_type()
    w = worker(server, t)
    s = server.connect()
    value = orjson.loads(b'"' + body + b'"')
    try:
        s.send_raw(b'{"cmd":"do","id":1,"type":%b,"arg":"%b"}\r\n' % (orjson.dumps(t), body))
        line = w.recv_line()
        assert orjson.loads(line)["arg"] == value
        assert line.endswith(b',"arg":"' + body + b'"}\r') == verbatim
        w.send_raw(b'{"cmd":"did","id":%d,"res":"%b"}\n' % (orjson.loads(line)["id"], body))
        line = s.recv_line()
        assert orjson.loads(line) == {"cmd": "did", "id": 1, "res": value}
        assert line.endswith(b',"res":"' + body + b'"}\r') == verbatim
    finally:
        w.close()
        s.close()


@pytest.mark.parametrize("flaw", [b"\x01", b"\xff", b"\\ud800", b"\\x", b"\xed\xa0\x80"],
                         ids=["control-character", "invalid-utf8", "lone-surrogate", "bad-escape",
                              "utf8-surrogate"])
def test_a_big_string_with_a_flaw_is_refused_with_its_id_and_harms_nothing(conn, shared, flaw):
    """The fast check of big lines refuses what orjson refuses, anywhere in
    a 64 KiB string: an error with the id, nothing reaches the worker, and
    the connection goes on."""
    t = fresh_type()
    w = worker(shared, t)
    c = conn()
    try:
        for at in (0, 40000, 65536):
            body = b"x" * at + flaw + b"y" * (65536 - at)
            line = b'{"cmd":"do","id":"flawed-%d","type":%b,"arg":"%b"}\n' % (at, orjson.dumps(t), body)
            c.send_raw(line)
            why = expect_error(c, id="flawed-%d" % at)["error"]
            if flaw in (b"\xff", b"\xed\xa0\x80"):
                assert why == "invalid UTF-8 at byte offset %d of the line" % line.index(flaw)
            else:
                assert "invalid JSON" in why
        c.send_raw(b'{"cmd":"do","id":"sound","type":%b,"arg":"%b"}\n' % (orjson.dumps(t), b"z" * 65536))
        job = w.expect("do")
        assert job["arg"] == "z" * 65536
        w.send(did(job["id"], res="ok"))
        c.expect("did", id="sound", res="ok")
    finally:
        w.close()


def test_big_progress_data_reaches_the_submitter_as_sent(conn, shared):
    """progress's "data" is a payload like arg and res: a big string goes
    the fast way (as sent), a flawed one is refused with the wid."""
    t = fresh_type()
    w = worker(shared, t)
    s = conn()
    body = b"caf\\u00e9 " + b"p" * 70000
    try:
        s.send(do("prog", t, "x"))
        wid = w.expect("do")["id"]
        w.send_raw(b'{"cmd":"progress","id":%d,"data":"%b\x01"}\n' % (wid, body))
        expect_error(w, id=wid)
        w.send_raw(b'{"cmd":"progress","id":%d,"data":"%b"}\n' % (wid, body))
        line = s.recv_line()
        assert line.endswith(b',"data":"' + body + b'"}\r')
        assert orjson.loads(line) == {"cmd": "progress", "id": "prog",
                                      "data": orjson.loads(b'"' + body + b'"')}
        w.send(did(wid, res="done"))
        s.expect("did", id="prog", res="done")
    finally:
        w.close()


def test_a_big_string_in_another_shape_is_the_same_value_on_the_other_side(conn, shared):
    """arg before the other fields, spacing, a duplicate key: the slow way,
    the same value (orjson keeps the last of duplicate keys)."""
    t = fresh_type()
    w = worker(shared, t, capacity=3)
    s = conn()
    big = "z" * 70000
    lines = [
        b'{"arg":"%b","cmd":"do","id":1,"type":%b}\n',
        b'{"cmd":"do","id":2,"type":%%b, "arg": "%b" }\n',
        b'{"cmd":"do","id":3,"type":%%b,"arg":"no","arg":"%b"}\n',
    ]
    try:
        s.send_raw(lines[0] % (big.encode(), orjson.dumps(t)))
        for raw in lines[1:]:
            s.send_raw(raw % big.encode() % orjson.dumps(t))
        for _ in lines:
            job = take_job(w, t)
            assert job["arg"] == big
            w.send(did(job["id"], res=job["arg"]))
        for i in (1, 2, 3):
            assert s.expect("did", id=i)["res"] == big
    finally:
        w.close()
