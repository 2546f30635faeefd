#!/usr/bin/env python3
"""The reference harness's Gearman load generator
(../shared/bench/loadgen_gearman.py, used in place: same options, same
output), with its workers read in an event-loop callback as loadgen.py's
are (loadgen.ReadInLoop), so that gearmand is driven as hard as Deputy:
read by greenlets, the load generator was gearmand's bottleneck too (99 %
CPU, gearmand 80 %). Its clients are the reference's, unchanged.

    python3 bench/gearman_load.py --port 4730 --server-pid PID [--workers 32 ...]
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_BENCH = os.path.normpath(os.path.join(HERE, '..', '..', 'shared', 'bench'))
sys.path.insert(0, HERE)
sys.path.insert(1, SHARED_BENCH)

import loadgen_gearman as ref  # noqa: E402
from loadgen import ReadInLoop  # noqa: E402


class GearmanEchoWorker(ReadInLoop):
    """The reference's worker: CAN_DO, GRAB_JOB_UNIQ; NO_JOB -> PRE_SLEEP;
    NOOP while asleep -> GRAB_JOB_UNIQ; a job -> WORK_COMPLETE with its
    payload, and GRAB_JOB_UNIQ."""

    def __init__(self, sock, fn=b'echo'):
        ReadInLoop.__init__(self, sock)
        self.partial = b''          # the start of a packet not yet complete
        self.asleep = False
        sock.sendall(ref.req(ref.CAN_DO, fn) + ref.GRAB)

    def received(self, data):
        if self.partial:
            data = self.partial + data
        packets, self.partial = split_packets(data)
        return b''.join([self.answer(typ, body) for typ, body in packets])

    def answer(self, typ, body):
        if typ == ref.JOB_ASSIGN_UNIQ or typ == ref.JOB_ASSIGN:
            if typ == ref.JOB_ASSIGN_UNIQ:
                handle, _fn, _uniq, payload = body.split(b'\0', 3)
            else:
                handle, _fn, payload = body.split(b'\0', 2)
            self.wake()
            return ref.req(ref.WORK_COMPLETE, handle + b'\0' + payload) + ref.GRAB
        if typ == ref.NO_JOB:
            if not self.asleep:
                ref.stats['asleep'] += 1
            self.asleep = True
            return ref.SLEEP
        if typ == ref.NOOP and self.asleep:
            self.wake()
            return ref.GRAB
        if typ == ref.ERROR:
            ref.stats['errors'] += 1
            if len(ref.stats['notes']) < 5:
                ref.stats['notes'].append('worker got ERROR %r' % body[:200])
        return b''

    def wake(self):
        if self.asleep:
            ref.stats['asleep'] -= 1
        self.asleep = False


def split_packets(data):
    """-> ([(type, body)] of the whole packets in data, the bytes after them)."""
    unpack_from = ref.HDR.unpack_from
    off, n, packets = 0, len(data), []
    while n - off >= 12:
        _magic, typ, size = unpack_from(data, off)
        end = off + 12 + size
        if end > n:
            break
        packets.append((typ, data[off + 12:end]))
        off = end
    return packets, data[off:]


def worker(sock, fn=b'echo'):
    GearmanEchoWorker(sock, fn).run()


if __name__ == '__main__':
    ref.worker = worker         # main() spawns ref.worker for each connection
    ref.main()
