"""Helpers for the black-box server tests (tests/test_srv_*.py).

Everything here talks to a real `deputy_server.py` process with raw JSON
lines over real sockets; nothing imports the server or the client library.
"""
import atexit
import math
import os
import socket
import threading
import time

import orjson
import pytest

from conftest import READ_TIMEOUT, RawConn, ServerProcess, free_port  # noqa: F401 (re-exported)

MISSING = object()


# -- messages -----------------------------------------------------------------

def do(id, type, arg=MISSING, **fields):
    msg = {"cmd": "do", "id": id, "type": type}
    if arg is not MISSING:
        msg["arg"] = arg
    msg.update(fields)
    return msg


def can_do(*types, capacity=None):
    msg = {"cmd": "can_do", "types": list(types)}
    if capacity is not None:
        msg["capacity"] = capacity
    return msg


def cant_do(*types):
    return {"cmd": "cant_do", "types": list(types)}


def did(wid, res=MISSING, err=MISSING):
    msg = {"cmd": "did", "id": wid}
    if res is not MISSING:
        msg["res"] = res
    if err is not MISSING:
        msg["err"] = err
    return msg


def line(msg):
    return orjson.dumps(msg) + b"\r\n"


# -- exact JSON equality -------------------------------------------------------

def strict_equal(a, b):
    """Same JSON value, and the same Python type for every number (so 1 is
    not 1.0, True is not 1, -0.0 is not 0.0). Object key order is free."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return False
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)
    return a == b


def assert_same(got, want, what="value"):
    assert strict_equal(got, want), "%s altered: sent %r, got %r" % (what, want, got)


# -- reading -------------------------------------------------------------------

def expect_error(conn, id=MISSING, timeout=None):
    """Next message is an `error` with a non-empty text; with `id` given it
    must carry exactly that id."""
    msg = conn.recv(timeout)
    assert msg.get("cmd") == "error", "expected an error, got %r" % (msg,)
    assert isinstance(msg.get("error"), str) and msg["error"], msg
    if id is not MISSING:
        assert "id" in msg, "error should carry id %r: %r" % (id, msg)
        assert_same(msg["id"], id, "error id")
    return msg


def sync(conn, timeout=None):
    """Round trip a `metrics` request; return (messages that came before the
    answer, the metrics). Proves everything sent before was processed."""
    conn.send({"cmd": "metrics"})
    before = []
    while True:
        msg = conn.recv(timeout)
        if msg.get("cmd") == "metrics":
            return before, msg["metrics"]
        before.append(msg)


def sync_quiet(conn, timeout=None):
    """Like sync, but nothing else may have arrived."""
    before, metrics = sync(conn, timeout)
    assert before == [], "unexpected messages: %r" % (before,)
    return metrics


def wait_for(fn, timeout=5.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s (last: %r)" % (what, last))
        time.sleep(interval)


def wait_metrics(conn, pred, timeout=5.0, what="metrics"):
    """Poll `metrics` on conn until pred(metrics) is true; return them."""
    box = {}

    def check():
        box["m"] = conn.metrics()
        return pred(box["m"])
    try:
        wait_for(check, timeout, what=what)
    except AssertionError:
        raise AssertionError("timed out waiting for %s; last metrics %r" % (what, box.get("m")))
    return box["m"]


def type_metrics(metrics, type_):
    return metrics["types"].get(type_)


# -- roles ---------------------------------------------------------------------

def worker(server, *types, capacity=None, address=None):
    """A raw connection that said can_do (and was processed)."""
    conn = RawConn(address) if address else server.connect()
    conn.send(can_do(*types, capacity=capacity))
    before, _ = sync(conn)
    for msg in before:
        assert msg.get("cmd") == "do", "can_do was answered with %r" % (msg,)
    # Jobs already queued may have arrived before the metrics answer: keep
    # them for the test to read.
    conn.buf = b"".join(line(m) for m in before) + conn.buf
    return conn


def take_job(conn, type_=None, timeout=None):
    """Next message must be a job hand-out; returns it."""
    msg = conn.expect("do", timeout)
    assert "id" in msg and isinstance(msg["id"], (int, str)) and not isinstance(msg["id"], bool), msg
    if type_ is not None:
        assert msg.get("type") == type_, msg
    assert "arg" in msg, "a hand-out always has arg: %r" % (msg,)
    return msg


def roundtrip_ok(server, type_="roundtrip-check", arg=None, address=None):
    """A fresh submitter and a fresh worker run one job end to end."""
    arg = {"probe": time.monotonic()} if arg is None else arg
    w = worker(server, type_, address=address)
    s = RawConn(address) if address else server.connect()
    try:
        s.send(do("rt", type_, arg))
        job = take_job(w, type_)
        assert_same(job["arg"], arg, "arg")
        w.send(did(job["id"], res=["ok", arg]))
        got = s.expect("did", id="rt")
        assert_same(got.get("res"), ["ok", arg], "res")
        assert "err" not in got
        return True
    finally:
        w.close()
        s.close()


# -- processes and sockets -----------------------------------------------------

def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for text in f:
            if text.startswith("VmRSS:"):
                return int(text.split()[1])
    raise RuntimeError("no VmRSS for %d" % pid)


def small_buffer_socket(port, rcvbuf=4096, sndbuf=None, host="127.0.0.1"):
    """A TCP socket with a small receive buffer set before connecting, so the
    kernel cannot absorb much of what the server sends a client that does
    not read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(READ_TIMEOUT)
    sock.connect((host, port))
    return sock


class EchoWorker(threading.Thread):
    """A worker in a thread: answers every job with res = result(arg)."""

    def __init__(self, server, *types, capacity=1, result=lambda arg: arg):
        threading.Thread.__init__(self, daemon=True)
        self.conn = worker(server, *types, capacity=capacity)
        self.result = result
        self.done = 0
        self.errors = []
        self.stopping = threading.Event()

    def run(self):
        sock = self.conn.sock
        buf, self.conn.buf = self.conn.buf, b""   # jobs that came with can_do
        try:
            while not self.stopping.is_set():
                if b"\n" not in buf:
                    sock.settimeout(0.1)
                    try:
                        chunk = sock.recv(1 << 20)
                    except socket.timeout:
                        continue
                    if not chunk:
                        return
                    buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()
                out = []
                for text in lines:
                    msg = orjson.loads(text)
                    if msg.get("cmd") != "do":
                        self.errors.append(msg)
                        continue
                    out.append(line(did(msg["id"], res=self.result(msg["arg"]))))
                if out:
                    sock.settimeout(30)
                    sock.sendall(b"".join(out))
                    self.done += len(out)
        except OSError as exc:
            if not self.stopping.is_set():
                self.errors.append(exc)

    def stop(self):
        self.stopping.set()
        self.join(5)
        self.conn.close()


def served_past_the_fd_limit(server, port, request, reply_start, meanwhile=lambda: None):
    """Bring the server to 48 open files, with 60 connections to port
    waiting, and call meanwhile(); then the last one sends request, half of
    them close, and its reply must hold reply_start. -> the server's
    stderr, for the caller to check it said so once, with no traceback."""
    import resource
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (48, 48))
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(60)]
    try:
        time.sleep(1.5)             # accept fails a few times meanwhile
        meanwhile()
        late = held[-1]
        late.sendall(request)
        for sock in held[:30]:
            sock.close()
        late.settimeout(10)
        assert reply_start in late.recv(65536), "the waiting connection was not served"
        return server.stderr()
    finally:
        for sock in held:
            sock.close()


def unix_path(tmp_path, name="deputy.sock"):
    """A short UNIX socket path (sun_path is ~108 bytes)."""
    path = os.path.join(str(tmp_path), name)
    if len(path) > 100:
        import tempfile
        path = os.path.join(tempfile.mkdtemp(prefix="dpt"), name)
    return path


# -- a warm spare server -------------------------------------------------------
# Starting Python, gevent and the server takes a few tenths of a second. The
# `server` fixture below keeps one default server starting in the background
# while a test runs, so the next test finds it ready.

_spare = []


def _stop_spare():
    while _spare:
        _spare.pop().stop()


atexit.register(_stop_spare)


def ready_server():
    """A running default server (`python deputy_server.py -p PORT`)."""
    srv = _spare.pop() if _spare else None
    _spare.append(ServerProcess(wait=False))
    if srv is None:
        srv = ServerProcess(wait=False)
    try:
        srv.wait_ready()
    except RuntimeError:
        srv.stop()
        srv = ServerProcess()
    return srv


@pytest.fixture(name="server")
def warm_server():
    """The `server` fixture in the modules that import this: conftest's kind
    of fresh default server, taken from a warm spare."""
    srv = ready_server()
    yield srv
    srv.stop()


def wait_unix_ready(path, timeout=5.0):
    """The TCP listener may be up before the UNIX one: wait for the latter."""
    def ready():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(0.5)
        try:
            sock.connect(path)
            return True
        except OSError:
            return False
        finally:
            sock.close()
    wait_for(ready, timeout, what="the UNIX socket %s" % path)
    return path
