#!/usr/bin/env python3
"""The client-library scenario: deputy_client on both sides.

    python3 bench/clientlib.py worker --address HOST:PORT [--capacity 32]
    python3 bench/clientlib.py submit --address HOST:PORT --jobs N \
        [--window 1000] [--arg-size 20] [--server-pid P] [--worker-pid W]

`worker` says can_do {"echo": returns its arg} with the given capacity and
works until it is stopped. `submit` sends one warm-up job (which also proves
a worker is there), then N jobs with client.do(), keeping at most --window
unanswered, and collects every result with job.get(); it prints one JSON
object: jobs/s, latency (submit to the return of get(), results taken in
submit order, so an upper bound), and the CPU per job of the server, of the
worker process and of itself over the measured phase.

deputy_client is imported from the project root. When it is missing or its
API does not fit, both roles print {"skipped": "..."} and exit 0.
"""
import argparse
import json
import os
import sys
import time
from collections import deque

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import gevent  # noqa: E402

from loadgen import Meter, percentiles, proc_cpu  # noqa: E402

perf_counter = time.perf_counter


def skip(reason):
    sys.stdout.write(json.dumps({'skipped': reason}) + '\n')
    sys.stdout.flush()
    sys.exit(0)


def make_client(address):
    try:
        import deputy_client
    except Exception as e:  # noqa: BLE001 - any import failure means: skip
        skip('import deputy_client failed: %s: %s' % (type(e).__name__, e))
    try:
        Client = deputy_client.Client
    except AttributeError:
        skip('deputy_client has no Client class')
    try:
        return Client(address)
    except TypeError:
        host, port = address.rsplit(':', 1)
        try:
            return Client((host, int(port)))
        except Exception as e:  # noqa: BLE001
            skip('Client(%r) failed: %s: %s' % (address, type(e).__name__, e))
    except Exception as e:  # noqa: BLE001
        skip('Client(%r) failed: %s: %s' % (address, type(e).__name__, e))


def echo(arg, *rest, **kw):
    return arg


def run_worker(opts):
    client = make_client(opts.address)
    for how in ('can_do', 'work'):
        if not callable(getattr(client, how, None)):
            skip('Client has no %s()' % how)
    try:
        client.can_do({'echo': echo}, capacity=opts.capacity)
    except Exception as e:  # noqa: BLE001
        skip('can_do({"echo": fn}, capacity=%d) failed: %s: %s' % (
            opts.capacity, type(e).__name__, e))
    sys.stdout.write(json.dumps({'ready': True}) + '\n')
    sys.stdout.flush()
    client.work()


def run_submit(opts):
    client = make_client(opts.address)
    if not callable(getattr(client, 'do', None)):
        skip('Client has no do()')
    arg = ('0123456789abcdef' * (opts.arg_size // 16 + 1))[:opts.arg_size]
    try:
        first = client.do('echo', arg)
        warm = first.get(timeout=min(opts.timeout, 15))
    except Exception as e:  # noqa: BLE001
        skip('warm-up job failed: %s: %s' % (type(e).__name__, e))
    if warm != arg:
        skip('warm-up job came back as %r, not its arg' % (warm,))
    server_pids = [int(x) for x in opts.server_pid.split(',') if x.strip()]
    worker_pids = [int(opts.worker_pid)] if opts.worker_pid else []
    meter = Meter(server_pids)
    lat, bad, errors, notes = [], 0, 0, []
    pending = deque()
    sent = 0
    deadline = perf_counter() + opts.timeout
    timed_out = False
    w0 = proc_cpu(worker_pids)
    meter.start()
    try:
        while sent < opts.jobs or pending:
            while sent < opts.jobs and len(pending) < opts.window:
                pending.append((client.do('echo', arg), perf_counter()))
                sent += 1
            job, t = pending.popleft()
            left = deadline - perf_counter()
            if left <= 0:
                timed_out = True
                break
            try:
                res = job.get(timeout=left)
            except gevent.Timeout:
                timed_out = True
                break
            except Exception as e:  # noqa: BLE001 - a failed job or a timeout of the lib
                if perf_counter() >= deadline:
                    timed_out = True
                    break
                errors += 1
                if len(notes) < 5:
                    notes.append('job failed: %s: %s' % (type(e).__name__, e))
                continue
            lat.append(perf_counter() - t)
            if res != arg:
                bad += 1
    finally:
        meter.stop()
        w1 = proc_cpu(worker_pids)
    done = len(lat)
    out = meter.figures(done)
    out.update(percentiles(lat))
    wcpu = w1[0] - w0[0]
    wsched = (w1[1] - w0[1]) if None not in (w0[1], w1[1]) else None
    # the worker process is part of the load, not other load
    out['other_cpu_util'] = round(max(0.0, out['other_cpu_util'] - (
        wsched if wsched is not None else wcpu) / out['wall_s']), 3)
    out.update({
        'submitter_cpu_us_per_job': round(out['loadgen_cpu_s'] / done * 1e6, 2) if done else None,
        'worker_cpu_s': round(wcpu, 3),
        'worker_cpu_us_per_job': round(wcpu / done * 1e6, 2) if done else None,
        'worker_cpu_sched_us_per_job': round(wsched / done * 1e6, 2) if done and wsched else None,
        'worker_cpu_util': round((wsched if wsched is not None else wcpu) / out['wall_s'], 3),
        'jobs_expected': opts.jobs, 'window': opts.window, 'arg_size': opts.arg_size,
        'errors': errors, 'bad_results': bad, 'timed_out': timed_out, 'notes': notes})
    sys.stdout.write(json.dumps(out) + '\n')
    sys.stdout.flush()
    try:
        client.close()
    except Exception:  # noqa: BLE001
        pass
    os._exit(0)   # do not wait on the library's background greenlets


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('role', choices=('worker', 'submit'))
    ap.add_argument('--address', required=True, help='HOST:PORT')
    ap.add_argument('--capacity', type=int, default=32)
    ap.add_argument('--jobs', type=int, default=20000)
    ap.add_argument('--window', type=int, default=1000)
    ap.add_argument('--arg-size', type=int, default=20)
    ap.add_argument('--server-pid', default='')
    ap.add_argument('--worker-pid', default='')
    ap.add_argument('--timeout', type=float, default=60.0)
    opts = ap.parse_args()
    if opts.role == 'worker':
        run_worker(opts)
    else:
        run_submit(opts)


if __name__ == '__main__':
    main()
