"""Property-based fuzzing of a real server process (SPEC sections 1, 2.7
and 5): random bytes and random JSON messages, valid and invalid shapes of
every command, then a normal round trip must still work. And, in process,
of string_as_sent and loads_big: a payload passed on as sent is the value
orjson read, and a big line is refused exactly when orjson refuses it
(SPEC 1: the server never alters a payload)."""
import random
import socket
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deputy_server
from deputy_server import BIG_PIECE, BIG_READ, SentString, loads_big, split_lines, string_as_sent
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


# -- string_as_sent: a big string sliced out of its line, never a different value

def spelled(text, draw):
    """text as a JSON string token, each character spelled raw or escaped
    at random (quotes and backslashes always escaped, one way or another)."""
    out = []
    for char in text:
        code = ord(char)
        way = draw(st.integers(0, 2))
        if char in '"\\' or code < 0x20 or 0xd800 <= code < 0xe000 or way == 0:
            if code > 0xffff:
                high, low = divmod(code - 0x10000, 0x400)
                out.append("\\u%04x\\u%04x" % (0xd800 + high, 0xdc00 + low))
            elif char in '"\\' and way == 1:
                out.append("\\" + char)
            else:
                out.append("\\u%04x" % code)
        else:
            out.append(char)
    return ('"' + "".join(out) + '"').encode()


tricky_text = st.text(alphabet=st.sampled_from('ab"\\,:{}[] é😀\n') | st.characters(codec="utf-8"),
                      max_size=12)
members = st.lists(st.tuples(st.sampled_from(["cmd", "id", "arg", "x", "arg\\u0000"]),
                             json_values | tricky_text), max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_string_sliced_out_of_its_line_is_the_value_orjson_reads(data):
    draw = data.draw
    before = [b'"cmd":"do"'] + [b'"%s":%s' % (k.encode(), orjson.dumps(v)) for k, v in draw(members)]
    after = [b'"%s":%s' % (k.encode(), orjson.dumps(v)) for k, v in draw(members)]
    if draw(st.integers(0, 2)):         # mostly the shape clients send: arg last
        after = []
    text = draw(tricky_text)
    value = spelled(text, draw) if draw(st.integers(0, 3)) else orjson.dumps(draw(json_values))
    nested = draw(st.integers(0, 3)) == 0
    member = b'"arg":' + value
    if nested:                          # the same key one level down
        member = b'"y":{"arg":' + value + b"}"
    line = b"{" + b",".join(before + [member] + after) + b"}" + draw(st.sampled_from([b"", b"\r"]))
    try:
        msg = orjson.loads(line)
    except orjson.JSONDecodeError:
        return
    got = string_as_sent(line, "arg")
    if got is not None:
        assert type(msg.get("arg")) is str
        assert orjson.loads(bytes(got)) == msg["arg"]
        assert line.rstrip(b"\r").endswith(b'"arg":' + bytes(got) + b"}")
    elif not after and not nested and line.count(b'"arg":') == 1 and 2 * len(value) > len(line) and b'\\"' not in value \
            and value.startswith(b'"') and not value.endswith(b'\\"'):
        pytest.fail("the shape clients send was not sliced: %r" % line)


def test_a_string_is_sliced_only_when_its_end_is_certain():
    body = b'ab\\u00e9\\n' + b"x" * 50
    ok = b'{"cmd":"do","id":1,"type":"t","arg":"%b"}' % body
    assert bytes(string_as_sent(ok, "arg")) == b'"%b"' % body
    assert bytes(string_as_sent(ok + b"\r", "arg")) == b'"%b"' % body
    res = b'{"cmd":"did","id":1,"res":"%b"}' % body
    assert bytes(string_as_sent(res, "res")) == b'"%b"' % body
    # Duplicate keys: the last value, the one orjson keeps (the slice relies on it).
    dup = b'{"arg":"A","cmd":"do","id":1,"type":"t","arg":"%b"}' % (b"B" * 100)
    assert orjson.loads(dup)["arg"] == "B" * 100
    assert bytes(string_as_sent(dup, "arg")) == b'"%b"' % (b"B" * 100)
    # Under half the line: a view would keep the rest alive, uncounted.
    padded = b'{"cmd":"did","id":1,"pad":"%b","res":"r"}' % (b"p" * 100)
    assert string_as_sent(padded, "res") is None
    a = b"a" * 100                  # most of the line, as it must be
    for line in [
        b'{"cmd":"do","arg":"%b\\"b"}' % a,       # an escaped quote inside
        b'{"cmd":"do","arg":"%b\\\\"}' % a,     # ends in an escaped backslash
        b'{"cmd":"do","arg":"%b","x":"b"}' % a,   # not the last member
        b'{"cmd":"do","y":{"x":1,"arg":"%b"}}' % a,   # not top-level
        b'{"cmd":"do","arg": "%b"}' % a,          # spacing
        b'{"cmd":"do","arg":"%b"} ' % a,          # trailing space
        b'{"cmd":"do","arg":["%b"]}' % a,         # not a string
        b'{"arg":"%b"}' % a,                      # the first member
    ]:
        orjson.loads(line)
        assert string_as_sent(line, "arg") is None, line


# Pieces of a JSON string body, valid and not: escapes, surrogates paired
# and lone, control characters, UTF-8 valid, overlong, truncated and of
# surrogates. simdjson and orjson must agree on every string made of them.
STRING_PIECES = [
    b"a", b" ", b"\x7f", b'\\"', b"\\\\", b"\\/", b"\\b", b"\\f", b"\\n", b"\\r", b"\\t",
    b"\\u0041", b"\\u00e9", b"\\u0000", b"\\uFFFF", b"\\ud800", b"\\udc00", b"\\uD800\\uDC00",
    b"\\udbff\\udfff", b"\\ud800\\u0041", b"\\u", b"\\u12", b"\\x", b"\\", b'"', b"\x00", b"\x1f",
    b"\n", "é".encode(), "€".encode(), "😀".encode(), b"\xed\xa0\x80", b"\xc0\xaf",
    b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc3", b"\xe2\x82",
    b"\xff", b"\xef\xbf\xbf",
]
PAYLOAD_SHAPES = [
    (b'{"cmd":"do","id":1,"type":"t","arg":"%b"}', "arg"),
    (b'{"cmd":"did","id":7,"res":"%b"}\r', "res"),
    (b'{"cmd":"progress","id":7,"data":"%b"}', "data"),
]


def parsed_alike(line):
    """orjson's reading of line and loads_big's, each a message (a
    SentString turned into the value its JSON text holds) or "refused"."""
    outcomes = []
    for parse in (orjson.loads, loads_big):
        try:
            msg = parse(line)
        except orjson.JSONDecodeError:
            outcomes.append("refused")
            continue
        for field, value in msg.items():
            if type(value) is SentString:
                assert line.rstrip(b"\r").endswith(b',"%b":%b}' % (field.encode(), value.json))
                msg[field] = orjson.loads(bytes(value.json))
        outcomes.append(msg)
    return outcomes


def test_a_big_line_is_refused_exactly_when_orjson_refuses_it():
    """Bodies of random pieces, each at a random offset in a line of
    BIG_PIECE bytes or more (simdjson reads 64-byte blocks): whatever
    orjson refuses, loads_big refuses; whatever it accepts, loads_big reads
    as the same message."""
    rnd = random.Random(4)
    fast = refused = 0
    for _ in range(3000):
        body = b"".join(rnd.choice(STRING_PIECES) for _ in range(rnd.randint(0, 6)))
        body = b"p" * rnd.randint(0, 130) + body + b"q" * (BIG_PIECE + rnd.randint(0, 70))
        shape, field = rnd.choice(PAYLOAD_SHAPES)
        line = shape % body
        via_orjson, via_loads_big = parsed_alike(line)
        assert via_orjson == via_loads_big, line[:200]
        refused += via_orjson == "refused"
        try:
            fast += type(loads_big(line)[field]) is SentString
        except orjson.JSONDecodeError:
            pass
    assert fast > 500 and refused > 500         # both ways were taken, often


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_loads_big_reads_any_big_message_as_orjson_does(data):
    """Any members around a big value (the shape that goes the fast way,
    and shapes near it): the same message as orjson's, or refused by both."""
    draw = data.draw
    field = draw(st.sampled_from(["arg", "res", "data", "secret", "y"]))
    before = [b'"cmd":"do"'] + [b'"%s":%s' % (k.encode(), orjson.dumps(v)) for k, v in draw(members)]
    after = [] if draw(st.integers(0, 2)) else [b'"%s":%s' % (k.encode(), orjson.dumps(v))
                                               for k, v in draw(members)]
    value = spelled(draw(tricky_text), draw)[:-1] + b"v" * BIG_PIECE + b'"'
    if draw(st.integers(0, 4)) == 0:
        value = value[:-1] + draw(st.sampled_from(STRING_PIECES)) + b'"'
    line = (b"{" + b",".join(before + [b'"%s":%s' % (field.encode(), value)] + after) + b"}"
            + draw(st.sampled_from([b"", b"\r", b" ", b"}"])))
    via_orjson, via_loads_big = parsed_alike(line)
    assert via_orjson == via_loads_big


def test_loads_big_takes_the_fast_way_only_for_the_shape_clients_send(monkeypatch):
    big = b"b" * BIG_PIECE
    for shape, field in PAYLOAD_SHAPES:
        msg = loads_big(shape % big)
        assert type(msg[field]) is SentString and bytes(msg[field].json) == b'"%b"' % big
    slow = [
        b'{"cmd":"auth","secret":"%b"}' % big,                  # not a payload field
        b'{"cmd":"do","pad":"%b","arg":"x"}' % big,             # under half the line
        b'{"cmd":"do","arg":"%b\\"x"}' % big,                   # an escaped quote inside
        b'{"cmd":"do","arg":"%b\\\\"}' % big,                   # ends in an escaped backslash
        b'{"cmd":"do","y":{"x":1,"arg":"%b"}}' % big,           # not top-level
        b'{"cmd":"do","arg":"%b"} ' % big,                      # trailing space
        b'["cmd","do","arg","%b"]' % big,                       # not an object
    ]
    for line in slow:
        msg = loads_big(line)
        assert msg == orjson.loads(line), line[:60]
        assert SentString not in {type(v) for v in (msg.values() if type(msg) is dict else msg)}
    # Over SIMDJSON_LARGEST (its parser would keep 3.3x that), or without
    # simdjson: orjson reads it whole.
    monkeypatch.setattr(deputy_server, "SIMDJSON_LARGEST", BIG_PIECE)
    assert type(loads_big(PAYLOAD_SHAPES[0][0] % big)["arg"]) is str
    monkeypatch.setattr(deputy_server, "SIMDJSON_LARGEST", 4 * 1024 * 1024)
    monkeypatch.setattr(deputy_server, "SIMDJSON_PARSER", None)
    assert type(loads_big(PAYLOAD_SHAPES[0][0] % big)["arg"]) is str


def test_a_refused_big_line_gets_orjson_s_reason():
    bad = b'{"cmd":"do","id":1,"type":"t","arg":"%b\x01"}' % (b"b" * BIG_PIECE)
    with pytest.raises(orjson.JSONDecodeError) as via_orjson:
        orjson.loads(bad)
    with pytest.raises(orjson.JSONDecodeError) as via_loads_big:
        loads_big(bad)
    assert str(via_loads_big.value) == str(via_orjson.value)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=9000).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=8),
       st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")),
       st.integers(0, BIG_READ))
def test_split_lines_with_the_first_end_given_splits_as_bytes_split(lines, rest, pad):
    """complete_lines passes the first LF it found, so that a big read's
    first line is not scanned twice: the lines and the rest are those of
    bytes.split, in a read big enough for the find() loop, whether the
    first line is long or short."""
    lines[0] = b"p" * pad + lines[0]
    data = b"\n".join(lines) + b"\n" + rest + b"r" * BIG_READ    # an unfinished rest, always
    want = data.split(b"\n")
    want_rest = want.pop()
    got, got_rest = split_lines(data, 0, data.find(b"\n"))
    assert got == want and bytes(got_rest) == want_rest


# -- salvage_id: the id of a line orjson refused ------------------------------

echoable_ids = st.integers(-10 ** 40 + 1, 10 ** 40 - 1) | st.text(max_size=10) | json_values
corruptions = st.sampled_from([b',"x":tru}', b',}', b'', b',"a":"\\q"}', b',"a":"\x01"}',
                               b'} trailing', b',"arg":NaN}', b'{'])


@settings(max_examples=300, deadline=None)
@given(members, echoable_ids, corruptions, st.booleans())
def test_an_id_comes_back_from_a_line_spoilt_after_it(before, id, corruption, spaced):
    """Whatever comes before the id, nested or not, and whatever spoils
    the line after it, salvage_id gives the id as sent (SPEC 1: an error
    carries the refused message's id)."""
    sep = b" , " if spaced else b","
    parts = [b'"cmd":"do"'] + [b'"%s":%s' % (k.encode(), orjson.dumps(v)) for k, v in before
                               if k != "id"]
    parts.append(b'"id" : ' + (str(id).encode() if type(id) is int else orjson.dumps(id)))
    line = b"{" + sep.join(parts) + corruption
    assert deputy_server.salvage_id(line) == id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(alphabet='{}[]":,\\ id0x', max_size=60).map(str.encode))
def test_salvage_id_takes_any_line(line):
    """An error path that raised would end the connection: whatever the
    bytes, an id or NO_ID, and an id only from an object's "id" member."""
    got = deputy_server.salvage_id(line)
    assert got is deputy_server.NO_ID or b"id" in line or b"\\u" in line


@pytest.mark.parametrize("line", [
    b'{"a":' + b"[" * 2000 + b"]" * 2000 + b',"id":5}',      # deeper than any parser reads
    b'{"a":[1,[2],"id":5',                                  # the nested value never ends
    b'{"a":["never ends,"id":5}',
    b'{"a":[1] "id":5}',                                    # no comma before the id
    b'{"a":[1],"id" 5}',
    b'{"a":[1],5:6,"id":5}',                                # a key that is not a string
    b'[{"id":5}]',                                          # not an object
    b'{"a":[1],"b":{"id":5}}',                              # an id one level down is not its id
    b'{"a":[1],"id":}',
    b'{"a":[1],"id":tru,"type":"x"}',
])
def test_salvage_id_gives_up_rather_than_guess(line):
    assert deputy_server.salvage_id(line) is deputy_server.NO_ID


@pytest.mark.parametrize("line", [
    b'{"cmd":"do","id":1,"id":2,"type":"t",}',
    b'{"cmd":"do","a":[1],"id":1,"id":2,"type":"t",}',      # the member walk, not the regex
])
def test_an_invalid_line_with_its_id_twice_is_answered_with_the_first(line):
    """README: the line is read only as far as that (a valid line's last
    id is the one that counts; an invalid one is not read to its end)."""
    assert deputy_server.salvage_id(line) == 1
