#!/usr/bin/env python3
"""Deputy load generator: the raw JSON-lines protocol (SPEC.md section 1),
gevent + orjson, one process (pin it with taskset; run.py does).

W worker connections say can_do (with --capacity) and answer every "do" at
once with {"cmd":"did","id":WID,"res":<arg>}, echoing the server's worker id.
C client connections each submit --jobs jobs, pipelined, with at most
--window unanswered, and check every result. With --ports P1,P2,.. (several
servers) worker i connects to server i % S and every client opens one
connection per server and sends its jobs to them in turn (window and jobs
split evenly), like SPEC section 9's submitter.

--types N: worker i does type i % N, job n has type n % N ("echo" when N is
1, else "echo0".."echoN-1").

--queue-first 1: the clients send every job with no worker connected, then
one job of type "barrier" each; a connection that then says can_do
"barrier" receives those only once the server has read everything before
them. That is the queue phase (time, server CPU, server RSS growth per
queued job). Then the workers connect (sockets first, can_do inside the
measured phase) and drain the queue: the measured phase.

Prints one JSON object on stdout: jobs/s, latency percentiles (submit to
result), server CPU (utime+stime from /proc/PID/stat, and on-CPU ns from
schedstat) over the measured phase, own CPU, other load on the machine.

    python3 bench/loadgen.py --port 11746 --server-pid PID [--workers 32 ...]
"""
import argparse
import json
import os
import resource
import sys
import time

import gevent
import gevent.event
from gevent import socket
import orjson

loads, dumps = orjson.loads, orjson.dumps
perf_counter = time.perf_counter
CLK_TCK = os.sysconf('SC_CLK_TCK')
RECV = 128 * 1024      # bigger buffers cost glibc an mmap+munmap per read
CHUNK = 10000          # jobs per send in --queue-first mode
SETTLE_LIMIT = 30.0    # s: most to wait for the server to go idle after connecting
BARRIER_ID = 'barrier'  # job ids of the load are integers
ID_SPAN = 100000000    # client ci's job ids: ci * ID_SPAN + 1 ...
BIG_LINE = 4096        # lines this long are echoed and checked without decoding their payload
DO_PREFIX = b'{"cmd":"do","id":'
DID_PREFIX = b'{"cmd":"did","id":'


# ---------------------------------------------------------------------------
# /proc accounting (also used by run.py and clientlib.py)

def proc_cpu(pids):
    """(utime+stime s from /proc/PID/stat, on-CPU s from schedstat of every
    thread) summed over pids; schedstat None when unreadable."""
    stat_s, sched_s = 0.0, 0.0
    for pid in pids:
        try:
            with open('/proc/%d/stat' % pid) as f:
                s = f.read()
            v = s[s.rindex(')') + 2:].split()
            stat_s += (int(v[11]) + int(v[12])) / CLK_TCK
        except (OSError, ValueError, IndexError):
            continue
        if sched_s is None:
            continue
        try:
            for tid in os.listdir('/proc/%d/task' % pid):
                with open('/proc/%d/task/%s/schedstat' % (pid, tid)) as f:
                    sched_s += int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            sched_s = None
    return stat_s, sched_s


def rss_kib(pids):
    """(VmRSS, VmHWM) in KiB summed over pids."""
    rss = hwm = 0
    for pid in pids:
        try:
            with open('/proc/%d/status' % pid) as f:
                for line in f:
                    if line.startswith('VmRSS:'):
                        rss += int(line.split()[1])
                    elif line.startswith('VmHWM:'):
                        hwm += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return rss, hwm


def machine_busy():
    """Busy CPU seconds of the whole machine (user+nice+system+irq+softirq)
    and steal seconds, from /proc/stat."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK, v[7] / CLK_TCK


def self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    for lim in ((need, max(hard, need)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, lim)
            return lim[0]
        except (ValueError, OSError):
            pass
    return soft


def wait_idle(pids, sleep, limit, quiet=0.2, step=0.05, below=0.002):
    """Sleep until the servers' on-CPU time grows by less than `below` s over
    `quiet` s (they have handled everything sent so far), at most limit s."""
    t0 = perf_counter()
    hist = []
    while pids:
        c = proc_cpu(pids)
        now = perf_counter()
        hist.append((now, c[1] if c[1] is not None else c[0]))
        while len(hist) > 1 and now - hist[1][0] >= quiet:
            hist.pop(0)
        if now - hist[0][0] >= quiet and hist[-1][1] - hist[0][1] < below:
            break
        if now - t0 >= limit:
            break
        sleep(step)
    return round(perf_counter() - t0, 2)


class Meter(object):
    """Wall clock, server CPU, own CPU and the machine's other load between
    start() and stop()."""

    def __init__(self, pids):
        self.pids = list(pids)

    def start(self):
        self.s0 = proc_cpu(self.pids)
        self.c0 = self_cpu()
        self.m0 = machine_busy()
        self.t0 = perf_counter()

    def stop(self):
        self.t1 = perf_counter()
        self.m1 = machine_busy()
        self.c1 = self_cpu()
        self.s1 = proc_cpu(self.pids)

    def figures(self, done, prefix=''):
        wall = max(self.t1 - self.t0, 1e-9)
        srv = self.s1[0] - self.s0[0]
        sched = (self.s1[1] - self.s0[1]) if None not in (self.s0[1], self.s1[1]) else None
        own = self.c1 - self.c0
        other = (self.m1[0] - self.m0[0]) - own - (sched if sched is not None else srv)
        out = {
            'wall_s': round(wall, 4),
            'jobs_done': done,
            'jobs_per_s': round(done / wall, 1),
            'server_cpu_s': round(srv, 3),
            'server_cpu_sched_s': round(sched, 6) if sched is not None else None,
            'server_cpu_us_per_job': round(srv / done * 1e6, 2) if done else None,
            'server_cpu_sched_us_per_job': (round(sched / done * 1e6, 2)
                                            if done and sched is not None else None),
            'server_cpu_util': round((sched if sched is not None else srv) / wall, 3),
            'loadgen_cpu_s': round(own, 3),
            'loadgen_cpu_util': round(own / wall, 3),
            'other_cpu_util': round(max(other, 0.0) / wall, 3),
            'steal_util': round((self.m1[1] - self.m0[1]) / wall, 3),
        }
        return {prefix + k: v for k, v in out.items()}


def percentiles(lat):
    lat.sort()

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))] * 1e6, 1) if lat else None
    return {'lat_p50_us': pct(50), 'lat_p99_us': pct(99),
            'lat_max_us': round(lat[-1] * 1e6, 1) if lat else None}


# ---------------------------------------------------------------------------
# The load

class Stats(object):
    def __init__(self):
        self.errors = 0
        self.bad = 0
        self.unknown = 0
        self.notes = []

    def note(self, text):
        if len(self.notes) < 8:
            self.notes.append(text)


stats = Stats()


def connect(addr, timeout=None):
    s = socket.create_connection(addr, timeout=timeout)
    s.settimeout(None)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def connect_many(addrs, limit, what):
    """One connection to each address in addrs (in order), within limit s,
    up to 64 at a time; exits with a message on stderr when that fails."""
    socks = [None] * len(addrs)
    t0 = perf_counter()
    batch = 64

    def one(i):
        socks[i] = connect(addrs[i], max(0.1, limit - (perf_counter() - t0)))

    try:
        for k in range(0, len(addrs), batch):
            gl = [gevent.spawn(one, i) for i in range(k, min(k + batch, len(addrs)))]
            gevent.joinall(gl, raise_error=True)
            if perf_counter() - t0 > limit:
                raise socket.timeout('time limit')
    except OSError as e:
        n = sum(1 for s in socks if s is not None)
        sys.stderr.write('connecting %s: %d of %d connected after %.1f s: %r\n' % (
            what, n, len(addrs), perf_counter() - t0, e))
        sys.exit(3)
    return socks


def lines_of(sock):
    """Yield the complete lines (bytes) of each socket read; a partial line
    is kept as a list of chunks (no quadratic joins on 64 KiB lines)."""
    recv = sock.recv
    parts = []
    while True:
        data = recv(RECV)
        if not data:
            return
        if b'\n' not in data:
            parts.append(data)
            continue
        if parts:
            parts.append(data)
            data = b''.join(parts)
        lines = data.split(b'\n')
        last = lines.pop()
        parts = [last] if last else []
        yield lines


def can_do_line(types, capacity):
    m = {'cmd': 'can_do', 'types': list(types)}
    if capacity > 1:
        m['capacity'] = capacity
    return dumps(m) + b'\r\n'


class ReadInLoop(object):
    """A connection read in an event-loop callback, as the server reads its
    own, not by a greenlet: a greenlet's recv costs two switches and a
    would-block exception a message. (Read that way, the load generator was
    the bottleneck of the small load, at 99 % CPU with Deputy at 92 %; a
    server that waits for its load sleeps and wakes more and gets smaller
    batches, which made Deputy's CPU per job look a fifth dearer.)
    Subclasses say what to answer to the bytes that came in: received()."""

    def __init__(self, sock):
        self.sock = sock
        self.raw = sock._sock       # the non-blocking socket gevent's wraps
        self.watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
        self.ended = gevent.event.Event()

    def received(self, data):
        """-> the bytes to send back for data (b'' for none)."""
        raise NotImplementedError

    def run(self):
        """Until the server closes the connection (or the greenlet is killed)."""
        self.watcher.start(self.on_readable)
        try:
            self.ended.wait()
        except gevent.GreenletExit:
            pass
        finally:
            self.end()              # (a send_rest still running must not start reading)

    def end(self):
        self.watcher.stop()
        self.ended.set()

    def on_readable(self):
        try:
            data = self.raw.recv(RECV)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        if not data:
            return self.end()
        out = self.received(data)
        if out:
            self.send(out)

    def send(self, out):
        """One non-blocking send; what the kernel did not take goes in a
        greenlet that waits for room, and nothing is read meanwhile."""
        try:
            sent = self.raw.send(out)
        except BlockingIOError:
            sent = 0
        except OSError:
            return self.end()
        if sent < len(out):
            self.watcher.stop()
            gevent.spawn(self.send_rest, out[sent:])

    def send_rest(self, data):
        try:
            self.sock.sendall(data)
        except OSError:
            return self.end()
        if not self.ended.is_set():
            self.watcher.start(self.on_readable)


class EchoWorker(ReadInLoop):
    """A worker connection: says can_do, then answers every job at once
    with its own arg."""

    def __init__(self, sock, typ, capacity):
        ReadInLoop.__init__(self, sock)
        self.partial = []           # pieces of a line not yet ended
        sock.sendall(can_do_line([typ], capacity))

    def received(self, data):
        return b''.join([self.answer(line) for line in self.complete_lines(data)
                         if len(line) >= 3])

    def complete_lines(self, data):
        """The lines data ends, with the pieces before it (joined once)."""
        if self.partial or not data.endswith(b'\n'):
            self.partial.append(data)
            if b'\n' not in data:
                return []
            data = b''.join(self.partial)
            del self.partial[:]
        lines = data.split(b'\n')
        last = lines.pop()
        if last:
            self.partial.append(last)
        return lines

    def answer(self, line):
        if len(line) >= BIG_LINE:
            did = echo_big_do(line)
            if did is not None:
                return did
        m = loads(line)
        cmd = m.get('cmd')
        if cmd == 'do':
            return b'{"cmd":"did","id":%d,"res":%b}\r\n' % (m['id'], dumps(m.get('arg')))
        if cmd == 'error':
            stats.errors += 1
            stats.note('worker got error: %r' % line[:200])
        return b''


def echo_big_do(line):
    """The `did` for a big `do` line in the servers' layout
    ({"cmd":"do","id":N,...,"arg":X}, arg last), made without decoding X:
    orjson making each 64 KiB payload a str and back again was most of the
    load generator's time in the big load, where it was the bottleneck
    (100 % CPU, the server 60 %). None for any other layout (then decoded)."""
    if not line.startswith(DO_PREFIX):
        return None
    comma = line.find(b',', len(DO_PREFIX))
    start = line.find(b',"arg":', comma)
    end = len(line) - 1 if line.endswith(b'\r') else len(line)
    wid = line[len(DO_PREFIX):comma]
    if comma < 0 or start < 0 or line[end - 1:end] != b'}' or not wid.isdigit():
        return None
    return b''.join([DID_PREFIX, wid, b',"res":', memoryview(line)[start + 7:end - 1], b'}\r\n'])


def echoed_id(line, res_tails):
    """The id of a big `did` line that is exactly {"cmd":"did","id":N} plus
    one of res_tails (the expected result, as the servers send it), else
    None (then the line is decoded and compared as JSON)."""
    for tail in res_tails:
        if line.endswith(tail) and line.startswith(DID_PREFIX):
            digits = line[len(DID_PREFIX):len(line) - len(tail)]
            if digits.isdigit():
                return int(digits)
    return None


def worker(sock, typ, capacity):
    EchoWorker(sock, typ, capacity).run()


def job_lines(names, arg):
    """A function: range of job ids -> bytes of their "do" lines."""
    a = dumps(arg).replace(b'%', b'%%')
    if len(names) == 1:
        tmpl = b'{"cmd":"do","id":%d,"type":' + dumps(names[0]) + b',"arg":' + a + b'}\r\n'
        return lambda ids: b''.join([tmpl % i for i in ids])
    tmpl = b'{"cmd":"do","id":%d,"type":"%s","arg":' + a + b'}\r\n'
    enc = [n.encode() for n in names]
    t = len(enc)
    return lambda ids: b''.join([tmpl % (i, enc[i % t]) for i in ids])


def client(sock, first_id, n, window, arg, names, lat):
    """Submit n jobs (ids first_id ...) with at most window unanswered;
    record each submit-to-result time in lat."""
    lines_for = job_lines(names, arg)
    res_tail = b',"res":' + dumps(arg) + b'}'
    res_tails = (res_tail + b'\r', res_tail)
    pending = {}
    sent = 0
    finished = 0
    sendall = sock.sendall
    lat_append = lat.append

    def submit(k):
        ids = range(first_id + sent, first_id + sent + k)
        msg = lines_for(ids)
        t = perf_counter()
        for i in ids:
            pending[i] = t
        sendall(msg)
        return k

    sent += submit(min(window, n))
    for lines in lines_of(sock):
        now = perf_counter()
        for line in lines:
            if len(line) < 3:
                continue
            if len(line) >= BIG_LINE:
                i = echoed_id(line, res_tails)
                if i is not None and i in pending:
                    lat_append(now - pending.pop(i))
                    finished += 1
                    continue
            m = loads(line)
            cmd = m.get('cmd')
            if cmd == 'did':
                t = pending.pop(m.get('id'), None)
                if t is None:
                    stats.unknown += 1
                    continue
                lat_append(now - t)
                finished += 1
                if m.get('res') != arg:
                    stats.bad += 1
            elif cmd == 'error':
                stats.errors += 1
                stats.note('client got error: %r' % line[:200])
                if pending.pop(m.get('id'), None) is not None:
                    finished += 1
        if finished >= n:
            return
        room = min(window - len(pending), n - sent)
        if room > 0:
            sent += submit(room)
    stats.note('a client connection was closed by the server')


def drain_client(sock, first_id, n, arg, done, k):
    """Count the results of the n queued jobs first_id.. into done[k]."""
    lo, hi = first_id, first_id + n - 1
    for lines in lines_of(sock):
        for line in lines:
            if len(line) < 3:
                continue
            m = loads(line)
            cmd = m.get('cmd')
            if cmd == 'did':
                i = m.get('id')
                if type(i) is int and lo <= i <= hi:
                    done[k] += 1
                    if m.get('res') != arg:
                        stats.bad += 1
                elif i != BARRIER_ID:
                    stats.unknown += 1
            elif cmd == 'error':
                stats.errors += 1
                stats.note('client got error: %r' % line[:200])
        if done[k] >= n:
            return
    stats.note('a client connection was closed by the server')


def barrier_worker(sock, expect):
    """can_do "barrier"; True once expect barrier jobs arrived."""
    sock.sendall(can_do_line(['barrier'], 1))
    got = 0
    for lines in lines_of(sock):
        out = []
        for line in lines:
            if len(line) < 3:
                continue
            m = loads(line)
            if m.get('cmd') == 'do':
                got += 1
                out.append(dumps({'cmd': 'did', 'id': m['id'], 'res': None}))
        if out:
            out.append(b'')
            sock.sendall(b'\r\n'.join(out))
        if got >= expect:
            return True
    return False


def plan(args):
    """Connections: [(addr, first_id, jobs, window)] for the clients, and
    [(addr, type)] for the workers."""
    addrs = [(args.host, p) for p in args.ports]
    s = len(addrs)
    names = ['echo'] if args.types <= 1 else ['echo%d' % i for i in range(args.types)]
    clients = []
    for ci in range(args.clients):
        per = [args.jobs // s + (1 if k < args.jobs % s else 0) for k in range(s)]
        for k, a in enumerate(addrs):
            if per[k]:
                clients.append((a, (ci * s + k) * ID_SPAN + 1, per[k],
                                max(1, args.window // s)))
    workers = [(addrs[i % s], names[i % len(names)]) for i in range(args.workers)]
    return clients, workers, names


def finish(meter, done, lat, timed_out, extra):
    res = meter.figures(done)
    res.update(percentiles(lat))
    res.update({'errors': stats.errors, 'bad_results': stats.bad + stats.unknown,
                'timed_out': timed_out, 'notes': stats.notes})
    res.update(extra)
    return res


def run_pipelined(args, arg):
    cplan, wplan, names = plan(args)
    meter = Meter(args.server_pids)
    rss0 = rss_kib(args.server_pids)[0]
    t0 = perf_counter()
    wsocks = connect_many([a for a, _ in wplan], args.timeout, 'workers')
    wgl = [gevent.spawn(worker, s, t, args.capacity) for s, (_, t) in zip(wsocks, wplan)]
    csocks = connect_many([c[0] for c in cplan], args.timeout, 'clients')
    extra = {'connect_wall_s': round(perf_counter() - t0, 3)}
    gevent.sleep(args.settle)
    extra['settle_wait_s'] = wait_idle(args.server_pids, gevent.sleep, SETTLE_LIMIT)
    rss1 = rss_kib(args.server_pids)[0]
    extra['conn_bytes_each'] = round((rss1 - rss0) * 1024.0 / max(1, len(wsocks) + len(csocks)), 1)
    lat = []
    meter.start()
    cgl = [gevent.spawn(client, s, first, n, win, arg, names, lat)
           for s, (_, first, n, win) in zip(csocks, cplan)]
    gevent.joinall(cgl, timeout=args.timeout)
    meter.stop()
    timed_out = not all(g.ready() for g in cgl)
    for g in cgl:
        if g.ready() and g.exception is not None:
            stats.note('client failed: %r' % (g.exception,))
    gevent.killall(cgl + wgl, timeout=2)
    for s in wsocks + csocks:
        s.close()
    return finish(meter, len(lat), lat, timed_out, extra)


def run_queue_first(args, arg):
    cplan, wplan, names = plan(args)
    pids = args.server_pids
    n_total = sum(c[2] for c in cplan)
    csocks = connect_many([c[0] for c in cplan], args.timeout, 'clients')
    bsocks = connect_many([(args.host, p) for p in args.ports], args.timeout, 'barrier')
    gevent.sleep(args.settle)
    extra = {'settle_wait_s': wait_idle(pids, gevent.sleep, SETTLE_LIMIT)}
    rss0 = rss_kib(pids)[0]
    payloads = []
    for (_, first, n, _w) in cplan:
        lines_for = job_lines(names, arg)
        payloads.append([lines_for(range(first + k, first + min(k + CHUNK, n)))
                         for k in range(0, n, CHUNK)])
    barrier_do = b'{"cmd":"do","id":"' + BARRIER_ID.encode() + b'","type":"barrier","arg":null}\r\n'

    def send_all(sock, chunks):
        for c in chunks:
            sock.sendall(c)
        sock.sendall(barrier_do)

    per_server = {}
    for (a, _f, _n, _w) in cplan:
        per_server[a] = per_server.get(a, 0) + 1

    def barriers():
        gevent.joinall(senders, raise_error=True)
        gl = [gevent.spawn(barrier_worker, b, per_server.get((args.host, p), 0))
              for b, p in zip(bsocks, args.ports)]
        gevent.joinall(gl, raise_error=True)
        return all(g.value for g in gl)

    qm = Meter(pids)
    qm.start()
    senders = [gevent.spawn(send_all, s, p) for s, p in zip(csocks, payloads)]
    bg = gevent.spawn(barriers)
    bg.join(timeout=args.timeout)
    qm.stop()
    rss1, hwm1 = rss_kib(pids)
    del payloads
    queued = bool(bg.ready() and bg.value)
    q = qm.figures(n_total if queued else 0, 'queue_')
    extra.update({k: q[k] for k in ('queue_wall_s', 'queue_jobs_per_s', 'queue_server_cpu_s',
                                    'queue_server_cpu_us_per_job',
                                    'queue_server_cpu_sched_us_per_job')})
    extra.update({'queue_done': queued, 'queue_rss_before_kib': rss0,
                  'queue_rss_after_kib': rss1, 'queue_hwm_after_kib': hwm1,
                  # as the reference harness: peak RSS after queueing minus RSS before
                  'queue_bytes_per_job': round((hwm1 - rss0) * 1024.0 / n_total, 1) if queued else None,
                  'queue_rss_bytes_per_job': round((rss1 - rss0) * 1024.0 / n_total, 1) if queued else None})
    if not queued:
        stats.note('queueing %d jobs: %s after %.0f s (server RSS +%.0f MiB)' % (
            n_total, 'not done' if not bg.ready() else 'failed: %r' % (bg.exception,),
            args.timeout, (rss1 - rss0) / 1024.0))
        gevent.killall(senders + [bg], timeout=2)
        return finish(qm, 0, [], True, extra)
    t0 = perf_counter()
    wsocks = connect_many([a for a, _ in wplan], args.timeout, 'workers')
    extra['connect_wall_s'] = round(perf_counter() - t0, 3)
    extra['settle2_wait_s'] = wait_idle(pids, gevent.sleep, SETTLE_LIMIT)
    done = [0] * len(cplan)
    cgl = [gevent.spawn(drain_client, s, first, n, arg, done, k)
           for k, (s, (_, first, n, _w)) in enumerate(zip(csocks, cplan))]
    gevent.sleep(0)
    meter = Meter(pids)
    meter.start()
    wgl = [gevent.spawn(worker, s, t, args.capacity) for s, (_, t) in zip(wsocks, wplan)]
    gevent.joinall(cgl, timeout=args.timeout)
    meter.stop()
    timed_out = not all(g.ready() for g in cgl)
    gevent.killall(cgl + wgl + [bg], timeout=2)
    for s in wsocks + csocks + bsocks:
        s.close()
    return finish(meter, sum(done), [], timed_out, extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, default=11746)
    p.add_argument('--ports', default=None,
                   help='several servers: comma-separated ports (overrides --port)')
    p.add_argument('--server-pid', default='',
                   help='pid(s) of the server(s), comma-separated, to read their CPU time')
    p.add_argument('--workers', type=int, default=32)
    p.add_argument('--capacity', type=int, default=1, help='capacity of each worker')
    p.add_argument('--clients', type=int, default=4)
    p.add_argument('--jobs', type=int, default=20000, help='jobs per client')
    p.add_argument('--window', type=int, default=1000, help='max unanswered jobs per client')
    p.add_argument('--arg-size', type=int, default=20, help='length of the job arg string')
    p.add_argument('--types', type=int, default=1)
    p.add_argument('--queue-first', type=int, default=0)
    p.add_argument('--timeout', type=float, default=60.0,
                   help='hard limit, s, of the measured phase (and of each preparatory one)')
    p.add_argument('--settle', type=float, default=0.2)
    args = p.parse_args(argv)
    args.ports = [int(x) for x in args.ports.split(',')] if args.ports else [args.port]
    args.server_pids = [int(x) for x in args.server_pid.split(',') if x.strip()]
    raise_nofile(args.workers + args.clients * len(args.ports) + 64)
    return args


def main():
    args = parse_args()
    arg = ('0123456789abcdef' * (args.arg_size // 16 + 1))[:args.arg_size]
    if args.queue_first:
        res = run_queue_first(args, arg)
    else:
        res = run_pipelined(args, arg)
    res.update({'workers': args.workers, 'clients': args.clients, 'capacity': args.capacity,
                'jobs_expected': args.jobs * args.clients, 'window': args.window,
                'arg_size': args.arg_size, 'types': args.types, 'servers': len(args.ports),
                'queue_first': args.queue_first})
    sys.stdout.write(json.dumps(res) + '\n')
    sys.stdout.flush()


if __name__ == '__main__':
    main()
