#!/usr/bin/env python3
"""The server's own cost per job, without the kernel or the event loop.

    python3 bench/hotpath.py [--jobs 200000] [--workers 32] [--window 1000]
                             [--arg-size 20] [--types 1] [--reps 3]
                             [--profile | --bytecodes]

Drives real deputy_server Connection objects, in one process, through the
"small" load of bench/run.py: one submitter pipelining jobs (at most
--window unanswered), --workers workers of capacity 1 answering each job at
once. The sockets are fakes: a read hands over what the peer "sent", a
write is counted and dropped, and the flush callbacks the server schedules
are run in a plain loop. So the figure is the Python work the server does
per job (parse, route, serialize, queue the write), the part that is the
server's to optimise; bench/run.py measures it with the kernel and gevent
included. --profile prints a cProfile of the run instead; --bytecodes the
bytecodes deputy_server's functions ran per job, counted by a tracer (as
repeatable as an instruction count, and it says where they go).
"""
import argparse
import collections
import cProfile
import gc
import os
import pstats
import sys
import time
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import orjson               # noqa: E402
import deputy_server        # noqa: E402


class FakeSocket:
    """What Connection needs of a socket: its raw half, which the bench
    replaces with fakes after construction. One real socket stands in for
    all of them (only its type is looked at): one each ran out of file
    descriptors with 10,000 workers, once garbage is left to the server's
    own GC threshold."""

    raw = None

    def __init__(self):
        if FakeSocket.raw is None:
            import socket
            FakeSocket.raw = socket.socket()
        self._sock = FakeSocket.raw
        self.closed = False

    def fileno(self):
        return self._sock.fileno()

    def close(self):
        pass


class FakeWatcher:
    """The read watcher a connection stops while it keeps lines for its
    next turn, and starts again after."""

    def start(self, callback):
        pass

    def stop(self):
        pass


class FakeLoop:
    """The loop a connection asks to flush it at the end of the turn: a
    plain list of callbacks here."""

    def __init__(self, callbacks):
        self.run_callback = callbacks.append


class FakeTurn:
    """The timer that gives a connection its next turn: here the turn is
    one more callback of the plain loop."""

    def __init__(self, callbacks):
        self.callbacks = callbacks

    def start(self, callback):
        self.callbacks.append(callback)

    def close(self):
        pass


class Peer:
    """One fake connection: bytes queued for the server to read, and the
    bytes the server wrote, kept for the load to inspect."""

    def __init__(self, server, callbacks, busy):
        self.inbox = deque()
        self.written = []
        self.busy = busy            # the peers written to since the load last looked
        self.conn = deputy_server.Connection(server, FakeSocket(), ("fake", 0))
        try:
            self.conn.raw = self         # its send, sendmsg and recv
            self.conn.loop = FakeLoop(callbacks)
        except AttributeError:      # a server from before 2026-12-04 (to compare with)
            self.conn.raw_send, self.conn.raw_sendmsg = self.send, self.sendmsg
            self.conn.raw_recv, self.conn.run_callback = self.recv, callbacks.append
        self.conn.watcher = FakeWatcher()
        self.conn.turn = FakeTurn(callbacks)

    def send(self, data):
        if not self.written:
            self.busy.append(self)
        self.written.append(data)
        return len(data)

    def sendmsg(self, pieces):
        return self.send(b"".join(pieces))

    def recv(self, size):
        return self.inbox.popleft()

    def deliver(self, data):
        """The peer sent data; the server reads it (one recv)."""
        self.inbox.append(data)
        self.conn.on_readable()

    def take_written(self):
        data = b"".join(self.written)
        self.written = []
        return data


def run_callbacks(callbacks):
    while callbacks:
        batch = callbacks[:]
        del callbacks[:]
        for callback in batch:
            callback()


def drive(jobs, workers, window, arg_size, types):
    server = deputy_server.Server(port=0)
    callbacks = []
    busy = []
    submitter = Peer(server, callbacks, [])
    team = [Peer(server, callbacks, busy) for _ in range(workers)]
    for number, worker in enumerate(team):
        worker.deliver(b'{"cmd":"can_do","types":["echo%d"]}\r\n' % (number % types))
    arg = orjson.dumps("x" * max(arg_size - 2, 0))
    do_lines = [b'{"cmd":"do","id":%d,"type":"echo%d","arg":%s}\r\n' % (n, n % types, arg)
                for n in range(jobs)]
    sent = answered = 0
    clock = time.perf_counter
    in_server = 0.0             # only the time spent in the server's code
    while answered < jobs:
        batch = min(window - (sent - answered), jobs - sent)
        if batch > 0:
            lines = b"".join(do_lines[sent:sent + batch])
            started = clock()
            submitter.deliver(lines)
            run_callbacks(callbacks)
            in_server += clock() - started
            sent += batch
        written_to, busy[:] = busy[:], []
        for worker in written_to:
            for line in worker.take_written().splitlines():
                did = b'{"cmd":"did","id":%d,"res":%s}\r\n' % (orjson.loads(line)["id"], arg)
                started = clock()
                worker.deliver(did)
                run_callbacks(callbacks)
                in_server += clock() - started
        answered += submitter.take_written().count(b"\n")
    return in_server


def prime_opcode_tracing():
    """CPython 3.12.1 sends no opcode events in the first tracing session
    that asks for them: one that traces a function of no interest first."""
    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        return trace

    sys.settrace(trace)
    try:
        (lambda: None)()
    finally:
        sys.settrace(None)


def count_bytecodes(run):
    """run() under a tracer: -> Counter of (function, line) -> bytecodes of
    deputy_server.py's code run."""
    counts = collections.Counter()
    server_file = deputy_server.__file__

    def count(frame, event, arg):
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_name, code.co_firstlineno)] += 1
        return count

    def enter(frame, event, arg):
        if frame.f_code.co_filename != server_file:
            return None
        frame.f_trace_opcodes = True    # (line events stay on: on 3.12 turning
        return count                    # them off turns off opcode events too)

    prime_opcode_tracing()
    sys.settrace(enter)
    try:
        run()
    finally:
        sys.settrace(None)
    return counts


def print_bytecodes(counts, jobs):
    print("%.0f bytecodes of deputy_server per job" % (sum(counts.values()) / jobs))
    for (name, line), count in counts.most_common(30):
        print("%8.1f  %s (line %d)" % (count / jobs, name, line))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200000)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--arg-size", type=int, default=20)
    parser.add_argument("--types", type=int, default=1,
                        help="worker i does type i %% T, job n has type n %% T")
    parser.add_argument("--reps", type=int, default=3, help="the best of N runs is shown")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--profile", action="store_true")
    shown.add_argument("--bytecodes", action="store_true")
    opts = parser.parse_args()
    # As deputy_server's main() does: else the drive is timed with
    # collections (over 10,000 workers' objects) that the server never makes.
    gc.set_threshold(deputy_server.GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    drive(2000, opts.workers, opts.window, opts.arg_size, opts.types)      # warm up
    if opts.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        drive(opts.jobs, opts.workers, opts.window, opts.arg_size, opts.types)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    if opts.bytecodes:
        counts = count_bytecodes(lambda: drive(opts.jobs, opts.workers, opts.window,
                                               opts.arg_size, opts.types))
        return print_bytecodes(counts, opts.jobs)
    elapsed = min(drive(opts.jobs, opts.workers, opts.window, opts.arg_size, opts.types)
                  for _ in range(opts.reps))
    print("%d jobs, %d workers over %d types, %d-byte args: %.2f µs of server Python per job "
          "(timed around the server's calls only)" % (
              opts.jobs, opts.workers, opts.types, opts.arg_size, elapsed / opts.jobs * 1e6))


if __name__ == "__main__":
    main()
