#!/usr/bin/env python3
"""User-space instructions per job, counted by valgrind: a figure that
does not move with the noise of a shared machine.

    python3 bench/instructions.py [--side server|submitter|worker|hotpath]
                                  [--jobs 5000] [--server FILE] [--workers 32]
                                  [--types 1] [--arg-size 20] [--window 1000]
                                  [--cache-misses]

CPU time per job on a shared 2-vCPU VM varies by +-20 % between identical
runs, more than most single changes to the hot path are worth. Instruction
counts are repeatable to about 0.2 %, so they can tell two versions apart.
They leave out the kernel (about 40 % of the server's time, the same for
any version that makes the same system calls) and cache misses, so confirm
a change with bench/run.py before believing it.

Each figure is a difference of two runs under `valgrind --tool=cachegrind`,
one with --jobs more jobs than the other, divided by --jobs: start-up and
imports cancel out. The side measured runs under valgrind (about 50 times
slower), the rest at full speed:

- server: deputy_server.py (or --server FILE, to compare a variant) under
  bench/loadgen.py's small load, scaled down: --workers workers of
  capacity 1, 4 clients pipelining, window 1000; --workers 1000 --types 100
  for the fanin shape (--jobs at least 20000 then: the first jobs of each
  type warm its idle list); --workers 8 --arg-size 65536 --window 100
  for the 64 KiB shape.
- submitter / worker: one side of the client scenario (bench/clientlib.py).
- hotpath: bench/hotpath.py's in-process drive (the server's Python only,
  fake sockets; includes the fake load's own work), of --server's file,
  with --workers, --types, --window and --arg-size as above. No load
  generator's timing decides its batches, so two versions see the same
  ones: the server side's miss counts move by 10 % between runs of one
  version, these by under 1 %.

Under valgrind the server runs about 50 times slower, so a big batch's
5 ms turns (TURN_SECONDS) end after a fiftieth of the lines they hold at
full speed: the work of splitting a batch into turns weighs more here.

--cache-misses also simulates a cache (CACHE_MODEL: one core's L1 and L2)
and prints the data misses per job: what makes 10,000 workers dearer per
job than 32 with the same instructions (each job goes to the worker that
waited longest, whose state is cold). Four to five times slower again.

Needs valgrind (`apt-get install valgrind`).
"""
import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = os.path.realpath(sys.executable)   # not a pyenv shim: valgrind must see python


# --cache-misses simulates one fixed cache, not the host's (valgrind read
# this VM's L3 as 320 MB, direct-mapped): a 32 KiB 8-way L1 and, as "LL",
# a 1 MiB 16-way cache the size of one core's L2 on these machines.
CACHE_MODEL = ['--cache-sim=yes', '--D1=32768,8,64', '--LL=1048576,16,64']
COUNTS = {'instructions': rb'I\s+refs:\s+([\d,]+)',
          'L1 data misses': rb'D1\s+misses:\s+([\d,]+)',
          'LL data misses': rb'LLd\s+misses:\s+([\d,]+)'}
cache_sim = False               # --cache-misses


def valgrind(argv, **popen):
    """Start argv under cachegrind; its report goes to a pipe we read at the end."""
    model = CACHE_MODEL if cache_sim else ['--cache-sim=no']
    return subprocess.Popen(['valgrind', '--tool=cachegrind', '--cachegrind-out-file=/dev/null']
                            + model + argv,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def valgrind_counts(proc, timeout=600):
    """The totals valgrind prints when proc ends: {name in COUNTS: count}."""
    _, err = proc.communicate(timeout=timeout)
    found = {}
    for name, pattern in COUNTS.items():
        match = re.search(pattern, err)
        if match:
            found[name] = int(match.group(1).replace(b',', b''))
    if 'instructions' not in found or (cache_sim and len(found) < len(COUNTS)):
        sys.exit('valgrind printed no counts:\n' + err.decode(errors='replace')[-2000:])
    return found


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_listening(port, proc, limit=60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit('the server exited before listening')
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit('the server did not listen within %d s' % limit)


def workers_connected(port, count, limit=120.0):
    """Wait until the server counts `count` workers (a worker under valgrind
    takes seconds to start)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
            s.sendall(b'{"cmd":"metrics"}\r\n')
            data = b''
            while not data.endswith(b'\n'):
                data += s.recv(65536)
        if b'"workers":%d' % count in data:
            return
        time.sleep(0.3)
    sys.exit('the worker did not connect within %d s' % limit)


def start_server(script, under_valgrind):
    port = free_port()
    argv = [PYTHON, script, '-p', str(port)]
    proc = valgrind(argv) if under_valgrind else subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, proc)
    return proc, port


def run_server_side(opts, jobs):
    proc, port = start_server(opts.server, under_valgrind=True)
    subprocess.run([PYTHON, os.path.join(HERE, 'loadgen.py'), '--port', str(port),
                    '--workers', str(opts.workers), '--types', str(opts.types), '--clients', '4',
                    '--jobs', str(jobs // 4), '--window', str(opts.window),
                    '--arg-size', str(opts.arg_size), '--timeout', '600'],
                   stdout=subprocess.DEVNULL, check=True, timeout=700)
    proc.terminate()
    return valgrind_counts(proc)


def run_client_side(opts, jobs):
    server, port = start_server(opts.server, under_valgrind=False)
    address = '127.0.0.1:%d' % port
    clientlib = [PYTHON, os.path.join(HERE, 'clientlib.py')]
    worker_argv = clientlib + ['worker', '--address', address]
    submit_argv = clientlib + ['submit', '--address', address, '--jobs', str(jobs),
                               '--timeout', '600']
    try:
        if opts.side == 'worker':
            worker = valgrind(worker_argv, stdout=subprocess.DEVNULL)
            workers_connected(port, 1)
            subprocess.run(submit_argv, stdout=subprocess.DEVNULL, check=True, timeout=700)
            worker.terminate()
            return valgrind_counts(worker)
        worker = subprocess.Popen(worker_argv, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            workers_connected(port, 1)
            return valgrind_counts(valgrind(submit_argv, stdout=subprocess.DEVNULL))
        finally:
            worker.terminate()
            worker.wait()
    finally:
        server.terminate()
        server.wait()


def hotpath_code(opts, jobs):
    """python -c code for the in-process drive, with --server's file as
    the deputy_server it imports."""
    return ('import importlib.util, sys; sys.path.insert(0, %r); '
            'spec = importlib.util.spec_from_file_location("deputy_server", %r); '
            'module = sys.modules["deputy_server"] = importlib.util.module_from_spec(spec); '
            'spec.loader.exec_module(module); import hotpath; '
            'hotpath.drive(%d, %d, %d, %d, %d)'
            % (HERE, opts.server, jobs, opts.workers, opts.window, opts.arg_size, opts.types))


def run_hotpath(opts, jobs):
    return valgrind_counts(valgrind([PYTHON, '-c', hotpath_code(opts, jobs)],
                                    stdout=subprocess.DEVNULL))


SIDES = {'server': run_server_side, 'submitter': run_client_side,
         'worker': run_client_side, 'hotpath': run_hotpath}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--side', choices=sorted(SIDES), default='server')
    parser.add_argument('--jobs', type=int, default=5000,
                        help='the difference in jobs between the two runs')
    parser.add_argument('--server', default=os.path.join(ROOT, 'deputy_server.py'))
    parser.add_argument('--workers', type=int, default=32)
    parser.add_argument('--types', type=int, default=1,
                        help='(server, hotpath) worker i does type i %% T, job n has type n %% T')
    parser.add_argument('--arg-size', type=int, default=20,
                        help='(server, hotpath) bytes of each arg')
    parser.add_argument('--window', type=int, default=1000,
                        help='(server, hotpath) unanswered jobs per client at most')
    parser.add_argument('--cache-misses', action='store_true',
                        help='also simulate a cache (see CACHE_MODEL): data misses per job')
    opts = parser.parse_args()
    if not shutil.which('valgrind'):
        sys.exit('needs valgrind: apt-get install valgrind')
    global cache_sim
    cache_sim = opts.cache_misses
    run = SIDES[opts.side]
    base = 2000
    fewer = run(opts, base)
    more = run(opts, base + opts.jobs)
    for name in fewer:
        print('%s: %.1f %s per job (user space; %d - %d jobs)' % (
            opts.side, (more[name] - fewer[name]) / opts.jobs, name, base + opts.jobs, base))


if __name__ == '__main__':
    main()
