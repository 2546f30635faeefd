"""SPEC section 5, black box: backpressure on connections that do not read,
bounded memory, idle and slow connections that must not stall others."""
import socket
import threading
import time

import orjson
import pytest

from rawhelpers import (
    EchoWorker, did, do, line, roundtrip_ok, rss_kb, served_past_the_fd_limit,
    small_buffer_socket, sync_quiet, take_job, wait_for, worker)
from rawhelpers import warm_server  # noqa: F401 (the `server` fixture, from a warm spare)

MiB = 1024 * 1024


class Sender(threading.Thread):
    """Sends `data` on `sock` in a thread (it blocks when the server stops
    reading); `sent` counts the bytes the kernel took."""

    def __init__(self, sock, data, chunk=64 * 1024):
        threading.Thread.__init__(self, daemon=True)
        self.sock, self.data, self.chunk = sock, data, chunk
        self.sent = 0
        self.finished = False
        self.error = None

    def run(self):
        self.sock.settimeout(None)
        view = memoryview(self.data)
        try:
            while self.sent < len(self.data):
                self.sent += self.sock.send(view[self.sent:self.sent + self.chunk])
            self.finished = True
        except OSError as exc:
            self.error = exc


class RssWatch(threading.Thread):
    """Samples the server's resident memory until stopped; keeps the peak."""

    def __init__(self, pid):
        threading.Thread.__init__(self, daemon=True)
        self.pid = pid
        self.base = rss_kb(pid)
        self.peak = self.base
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(0.02):
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except (OSError, RuntimeError):
                return

    def growth_mib(self):
        self.stopping.set()
        self.join(2)
        return (self.peak - self.base) / 1024.0


def wait_stalled(mon, key_fn, settle=0.6, timeout=20.0):
    """Wait until key_fn(metrics) stops changing for `settle` seconds."""
    deadline = time.monotonic() + timeout
    last = key_fn(mon.metrics())
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = key_fn(mon.metrics())
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise AssertionError("never settled: %r" % (last,))


def read_dids(sock, n, timeout=20.0):
    """Read n `did` lines from a plain socket; returns {id: message}."""
    sock.settimeout(timeout)
    buf = b""
    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, "only %d of %d results" % (len(got), n)
        chunk = sock.recv(1 << 20)
        assert chunk, "server closed after %d of %d results" % (len(got), n)
        buf += chunk
        lines = buf.split(b"\n")
        buf = lines.pop()
        for text in lines:
            assert text.endswith(b"\r")
            msg = orjson.loads(text)
            assert msg["cmd"] == "did", msg
            assert msg["id"] not in got, "two dids for %r" % msg["id"]
            got[msg["id"]] = msg
    return got


# -- backpressure --------------------------------------------------------------

def test_non_reading_submitter_is_paused_others_keep_going(start_server):
    """Thousands of jobs queued before the first result exists, then a
    worker comes: past the high-water mark the server stops handing out
    the non-reading client's queued jobs, and serves everyone else."""
    srv = start_server("--high-water", "65536")
    mon = srv.connect(timeout=30)
    n = 4000                       # 16 MB of results if nothing stops them
    s = small_buffer_socket(srv.port, rcvbuf=4096)
    sender = Sender(s, b"".join(line(do(i, "t", i)) for i in range(n)))
    sender.start()
    # No worker yet, no output yet: the server reads and queues them all.
    wait_for(lambda: mon.metrics()["jobs_added"] == n, 10, what="all jobs queued")
    w = EchoWorker(srv, "t", capacity=50, result=lambda arg: "r" * 4096)
    w.start()
    try:
        dispatched = wait_stalled(mon, lambda m: m["jobs_dispatched"])
        m = mon.metrics()
        assert m["types"]["t"]["queued"] > 0 and dispatched < n, (
            "all %d jobs were handed out to a client that never reads: %r" % (n, m))
        # Other connections are served at once...
        t0 = time.monotonic()
        mon.metrics()
        assert time.monotonic() - t0 < 0.5
        # ...and their jobs of the same type still go to the worker, past s's
        # queued ones; the worker is not blocked by s.
        s2 = srv.connect()
        s2.send(do("other", "t", "x"))
        got = s2.expect("did", id="other")
        assert got["res"] == "r" * 4096
        assert roundtrip_ok(srv, type_="u")
        # Once s reads, everything arrives, each exactly once.
        dids = read_dids(s, n)
        assert sorted(dids) == list(range(n))
        s.close()
    finally:
        w.stop()
    assert not w.errors, w.errors[:3]


@pytest.mark.parametrize("whose", ["its own", "a reading client's"])
def test_joining_unique_jobs_does_not_get_around_backpressure(start_server, whose):
    """SPEC 5, through `unique`: a client that never reads joins 600 jobs,
    twice each of its own or once each of a client that reads. Results of
    100 KB must not pile up for it (60 MB if they did): the jobs only it
    waits for are set aside, and it gets its own run of the others once it
    reads. Then every submission gets exactly one result."""
    srv = start_server("--high-water", "65536")
    mon = srv.connect(timeout=30)
    n = 600
    slow = small_buffer_socket(srv.port, rcvbuf=4096)
    if whose == "its own":
        lines = [line(do(i, "t", i, unique="k%d" % i)) + line(do("again%d" % i, "t", i, unique="k%d" % i))
                 for i in range(n)]
    else:
        fast = srv.connect(timeout=30)
        fast.send_raw(b"".join(line(do(i, "t", i, unique="k%d" % i)) for i in range(n)))
        wait_for(lambda: mon.metrics()["jobs_added"] == n, 10, what="the reader's jobs")
        lines = [line(do(i, "t", i, unique="k%d" % i)) for i in range(n)]
    slow.sendall(b"".join(lines))
    wait_for(lambda: mon.metrics()["jobs_coalesced"] == n, 10, what="the joins")
    watch = RssWatch(srv.proc.pid)
    watch.start()
    w = EchoWorker(srv, "t", capacity=8, result=lambda arg: "r" * 100000)
    w.start()
    try:
        if whose == "its own":
            dispatched = wait_stalled(mon, lambda m: m["jobs_dispatched"])
            assert dispatched < n / 4, "%d of %d jobs handed out for a client that never reads" % (
                dispatched, n)
        else:
            got = {}
            while len(got) < n:
                msg = fast.recv(timeout=30)
                assert msg["cmd"] == "did", msg
                got[msg["id"]] = msg
            wait_stalled(mon, lambda m: m["jobs_dispatched"])
        growth = watch.growth_mib()
        assert growth < 30, "server RSS grew %.0f MiB for a client that never reads" % growth
        want = n * 2 if whose == "its own" else n
        dids = read_dids(slow, want, timeout=60)
        assert all(msg["res"] == "r" * 100000 for msg in dids.values())
        assert len(dids) == want
        m = wait_stalled(mon, lambda m: (m["jobs_queued"], m["jobs_running"]))
        assert m == (0, 0)
    finally:
        w.stop()
        slow.close()
    assert not w.errors, w.errors[:3]


def test_non_reading_connection_stops_being_read(start_server):
    """Once a client's unsent output is past the high-water mark, the server
    stops reading from it: what it sends next stays in the socket buffers
    instead of growing the queues."""
    srv = start_server("--high-water", "65536")
    mon = srv.connect(timeout=30)
    k = 2000
    s = small_buffer_socket(srv.port, rcvbuf=4096, sndbuf=4096)
    first = Sender(s, b"".join(line(do(i, "t", i)) for i in range(k)))
    first.start()
    wait_for(lambda: mon.metrics()["jobs_added"] == k, 10, what="the first jobs queued")
    first.join(5)
    w = EchoWorker(srv, "t", capacity=20, result=lambda arg: "r" * 4096)
    w.start()
    try:
        # Results pile up unread: past the mark, hand-outs stop.
        wait_stalled(mon, lambda m: m["jobs_dispatched"])
        assert mon.metrics()["jobs_dispatched"] < k
        # Now the client sends 200k more jobs (9 MB) and still never reads.
        n = 200000
        more = Sender(s, b"".join(line(do(k + i, "t", i)) for i in range(n)))
        more.start()
        time.sleep(0.5)
        added = wait_stalled(mon, lambda m: m["jobs_added"], settle=0.3)
        assert added - k < 10000, "the server read %d more jobs from a client past its mark" % (added - k)
        assert not more.finished
        assert roundtrip_ok(srv, type_="u")
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        more.join(5)
    finally:
        w.stop()


def test_memory_bounded_with_200k_pipelined_jobs_never_read(server):
    """A client pipelines 200k small jobs and never reads, with a worker
    running whose results are 2 KiB each: delivered to the server's output
    buffer they would be 400 MiB. Past the high-water mark the server must
    stop handing out that client's jobs, so its memory stays bounded (what
    the client sent may be queued, 2.3; its results may not pile up)."""
    pid = server.proc.pid
    w = EchoWorker(server, "t", capacity=100, result=lambda arg: "r" * 2048)
    w.start()
    mon = server.connect(timeout=30)
    sync_quiet(mon)
    watch = RssWatch(pid)
    watch.start()
    n = 200000
    try:
        s = small_buffer_socket(server.port, rcvbuf=4096, sndbuf=4096)
        sender = Sender(s, b"".join(line(do(i, "t", i)) for i in range(n)))
        sender.start()
        wait_stalled(mon, lambda m: (m["jobs_added"], m["jobs_dispatched"]), timeout=30)
        time.sleep(0.3)
        growth = watch.growth_mib()
        m = mon.metrics()
        assert m["jobs_dispatched"] < n, "every job of a client that never reads was handed out"
        assert growth < 160, "server RSS grew %.0f MiB (jobs_added %d, dispatched %d)" % (
            growth, m["jobs_added"], m["jobs_dispatched"])
        assert roundtrip_ok(server, type_="u")
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        sender.join(5)
    finally:
        watch.stopping.set()
        w.stop()


def test_error_flood_from_non_reading_client_is_bounded(server):
    """Each bad line earns an error reply many times its size; a client that
    sends them without reading must be paused like any other."""
    pid = server.proc.pid
    mon = server.connect()
    sync_quiet(mon)
    watch = RssWatch(pid)
    watch.start()
    try:
        s = small_buffer_socket(server.port, rcvbuf=4096, sndbuf=4096)
        flood = b"x\n" * (20 * MiB)         # 20 million errors if all were answered
        sender = Sender(s, flood)
        sender.start()
        time.sleep(1.0)
        assert not sender.finished, "the server read 40 MB from a client that never reads"
        t0 = time.monotonic()
        sync_quiet(mon)
        assert time.monotonic() - t0 < 0.5
        assert roundtrip_ok(server)
        growth = watch.growth_mib()
        assert growth < 48, "server RSS grew %.0f MiB under an error flood" % growth
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        sender.join(5)
    finally:
        watch.stopping.set()


def test_metrics_flood_from_non_reading_client_is_bounded(server):
    pid = server.proc.pid
    mon = server.connect()
    # Many types make each metrics answer large.
    mon.send(*[do(i, "type-%04d" % i) for i in range(300)])
    sync_quiet(mon)
    watch = RssWatch(pid)
    watch.start()
    try:
        s = small_buffer_socket(server.port, rcvbuf=4096, sndbuf=4096)
        sender = Sender(s, b'{"cmd":"metrics"}\n' * 500000)
        sender.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        sync_quiet(mon)
        assert time.monotonic() - t0 < 0.5
        growth = watch.growth_mib()
        assert growth < 48, "server RSS grew %.0f MiB under a metrics flood" % growth
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        sender.join(5)
    finally:
        watch.stopping.set()


def test_a_batch_paused_midway_is_finished_in_order_once_the_client_reads(start_server):
    """Requests pipelined in one write, whose answers pass the high-water
    mark part way through: the server stops there, keeps the rest of the
    batch, and answers every request exactly once, in order, when the
    client reads again."""
    srv = start_server("--high-water", "16384")
    mon = srv.connect()
    mon.send(*[do(i, "type-%04d" % i) for i in range(100)])   # big metrics answers
    sync_quiet(mon)
    n = 400
    s = small_buffer_socket(srv.port, rcvbuf=4096)
    batch = []
    for i in range(n):
        batch.append(b'{"cmd":"metrics"}\n')
        batch.append(line(do("bg-%d" % i, "marker", i, bg=True)))
    sender = Sender(s, b"".join(batch))
    sender.start()
    wait_for(lambda: mon.metrics()["jobs_added"] > 100, 10, what="the batch started")
    added = wait_stalled(mon, lambda m: m["jobs_added"])
    assert added < 100 + n, "the whole batch was handled for a client that does not read"
    s.settimeout(20)
    buf = b""
    order = []
    while len(order) < 2 * n:
        chunk = s.recv(1 << 20)
        assert chunk, "server closed after %d answers" % len(order)
        buf += chunk
        lines = buf.split(b"\n")
        buf = lines.pop()
        order.extend(orjson.loads(text)["cmd"] for text in lines)
    assert order == ["metrics", "queued"] * n
    assert mon.metrics()["jobs_added"] == 100 + n
    sender.join(5)
    s.close()


def test_non_reading_worker_does_not_block_others(server, connect):
    """A worker that takes jobs and never reads again holds at most its
    capacity; other workers and submitters go on."""
    lazy = worker(server, "t", capacity=2)
    busy = worker(server, "t", capacity=1)
    s = connect()
    s.send(*[do(i, "t", "a" * 1000) for i in range(50)])
    done = 0
    while done < 48:
        j = take_job(busy, "t")
        busy.send(did(j["id"], res=None))
        done += 1
    assert busy.nothing_within(0.2), "the lazy worker holds the other two"
    got = 0
    while got < 48:
        s.expect("did")
        got += 1
    lazy.close()
    for _ in range(2):
        j = take_job(busy, "t")
        busy.send(did(j["id"], res=None))
        s.expect("did")


def test_a_flood_of_jobs_does_not_stall_other_connections(server):
    """While one client pipelines 100k jobs as fast as it can, another
    connection's requests are still answered promptly."""
    mon = server.connect(timeout=30)
    sync_quiet(mon)
    s = small_buffer_socket(server.port, rcvbuf=4096)
    sender = Sender(s, b"".join(line(do(i, "t", i)) for i in range(100000)))
    sender.start()
    worst = 0.0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        mon.metrics()
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.02)
    sender.join(30)
    s.close()
    assert worst < 0.5, "a metrics request waited %.2fs behind another client's jobs" % worst


# -- idle and slow connections -------------------------------------------------

def test_hundreds_of_idle_connections_do_not_stall_others(server):
    idle = []
    try:
        for i in range(400):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 2:
                sock.sendall(b'{"cmd":"met')       # half a line, never finished (yet)
            idle.append(sock)
        t0 = time.monotonic()
        assert roundtrip_ok(server)
        assert time.monotonic() - t0 < 1.0
        c = server.connect()
        m = c.metrics()
        assert m["connections_open"] >= 401
        # The idle ones are all still served.
        for i, sock in enumerate(idle):
            sock.sendall(b'rics"}\r\n' if i % 2 else b'{"cmd":"metrics"}\r\n')
        for sock in idle:
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                assert chunk
                buf += chunk
            assert orjson.loads(buf.split(b"\n")[0])["cmd"] == "metrics"
        c.close()
    finally:
        for sock in idle:
            sock.close()


def test_byte_at_a_time_sender_does_not_stall_others(server, connect):
    slow = connect()
    data = line(do("slow", "slow-type", {"drip": "é" * 5}))

    def drip():
        for i in range(len(data)):
            slow.send_raw(data[i:i + 1])
            time.sleep(0.015)
    dripper = threading.Thread(target=drip, daemon=True)
    w = worker(server, "t")
    dripper.start()
    s = connect()
    worst = 0.0
    count = 0
    while dripper.is_alive():
        t0 = time.monotonic()
        s.send(do(count, "t", count))
        j = take_job(w, "t")
        w.send(did(j["id"], res=j["arg"]))
        s.expect("did", id=count)
        worst = max(worst, time.monotonic() - t0)
        count += 1
    assert count > 10
    assert worst < 0.5, "a round trip took %.2fs while a slow sender dripped" % worst
    sw = worker(server, "slow-type")
    j = take_job(sw, "slow-type")
    assert j["arg"] == {"drip": "é" * 5}
    sw.send(did(j["id"], res="done"))
    slow.expect("did", id="slow", res="done")


def test_many_connections_closing_abruptly(server):
    """Connections reset mid-line or mid-job leave the server healthy."""
    import struct
    w = worker(server, "t")
    for i in range(100):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(line(do(i, "t", i)) + b'{"cmd":"do","id":' )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    mon = server.connect()
    wait_for(lambda: mon.metrics()["connections_open"] == 2, 5)
    # Whatever the worker got, it can finish without harm.
    while not w.nothing_within(0.2):
        j = take_job(w, "t")
        w.send(did(j["id"], res=None))
    m = mon.metrics()
    assert m["jobs_queued"] == 0
    assert m["jobs_running"] == 0
    assert roundtrip_ok(server, type_="u")
    assert server.proc.poll() is None


@pytest.mark.parametrize("nbytes", [1, 100, 65537])
def test_half_lines_then_close(server, nbytes):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"{" + b'"' * (nbytes - 1))
    sock.close()
    assert roundtrip_ok(server)


def test_out_of_file_descriptors_the_server_says_so_once_and_recovers(start_server):
    """At its open-file limit the server keeps serving the connections it
    has, logs one warning instead of a traceback a second, and accepts the
    waiting ones once others close."""
    srv = start_server()
    first = srv.connect(timeout=10)

    def the_connection_it_has_is_served():
        assert "jobs_added" in first.metrics()
    err = served_past_the_fd_limit(srv, srv.port, b'{"cmd":"metrics"}\r\n', b'"cmd":"metrics"',
                                   the_connection_it_has_is_served)
    assert "Traceback" not in err
    assert err.count("cannot accept connections: Too many open files") == 1, err
