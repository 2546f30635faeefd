#!/usr/bin/env python3
"""Deputy's benchmark: every scenario of issue 4 (and issue 7's servers
side by side) against deputy_server.py, with gearmand and the minimal
gevent relay (../shared/bench/ceiling_server.py) measured in the same run
when they are available.

    python3 bench/run.py                       # everything, full size
    python3 bench/run.py --scale 0.25 --reps 1 # a quicker run
    python3 bench/run.py --scenarios small,latency --servers deputy,gearmand

Each run starts fresh servers pinned to CPU 0 (taskset), one load generator
pinned to CPU 1, reads the servers' utime+stime from /proc/PID/stat right
before and after the measured phase, and stops every process it started.
Prints markdown tables on stdout and writes every figure as JSON (--out).
README.md beside this file says what each figure means.
"""
import argparse
import atexit
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED_BENCH = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'bench'))
sys.path.insert(0, HERE)

from loadgen import machine_busy, raise_nofile, self_cpu  # noqa: E402

# name -> load shape (jobs are per client and scale with --scale)
SCENARIOS = {
    'small': dict(workers=32, clients=4, jobs=20000, window=1000, arg_size=20),
    'big': dict(workers=8, clients=2, jobs=2000, window=100, arg_size=65536),
    'latency': dict(workers=1, clients=1, jobs=3000, window=1, arg_size=20),
    'depth1m': dict(workers=32, clients=1, jobs=1000000, window=1000, arg_size=20,
                    queue_first=1),
    'depth1k': dict(workers=32, clients=1, jobs=1000, window=1000, arg_size=20,
                    queue_first=1, fixed=True),
    'fanin': dict(workers=10000, clients=4, jobs=12500, window=1000, arg_size=20,
                  types=100),
    # special: deputy_client submitter + worker (capacity 32) vs the raw load
    # generator with one client and one worker of capacity 32; 100k jobs, as
    # 20k made a measured phase of a few tenths of a second, too short to trust
    'client': dict(workers=1, clients=1, jobs=100000, window=1000, arg_size=20, capacity=32),
    # special: the small load spread over 1, 2 and 3 servers
    'multi': dict(workers=32, clients=4, jobs=20000, window=1000, arg_size=20),
}
ORDER = ['small', 'big', 'latency', 'depth1m', 'depth1k', 'fanin', 'client', 'multi']
DISTURBED = 0.10      # other processes + steal above this many CPUs: flag the run
NOFILE = 65536
PROCS = []            # every process started and not yet stopped


def log(msg):
    sys.stderr.write(msg + '\n')
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Servers

def server_templates(opts):
    """name -> (protocol, argv template) or (None, why it is skipped)."""
    out = {'deputy': ('deputy', opts.deputy_cmd)}
    ceiling = os.path.join(SHARED_BENCH, 'ceiling_server.py')
    try:
        import ujson  # noqa: F401
        ok = os.path.exists(ceiling)
        out['ceiling'] = (('deputy', '{python} %s -h {host} -p {port}' % ceiling) if ok
                          else (None, '%s not found' % ceiling))
    except ImportError:
        out['ceiling'] = (None, 'ujson is not installed (pip install ujson)')
    exe = os.environ.get('GEARMAND') or shutil.which(
        'gearmand', path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin')
    if not exe:
        out['gearmand'] = (None, 'gearmand not found (apt-get install gearman-job-server)')
    elif not os.path.exists(os.path.join(SHARED_BENCH, 'loadgen_gearman.py')):
        out['gearmand'] = (None, 'loadgen_gearman.py not found in %s' % SHARED_BENCH)
    else:
        out['gearmand'] = ('gearman', exe + ' --listen={host} --port={port} --threads=0 '
                           '--log-file=none --pid-file={rundir}/gearmand-{port}.pid')
    return out


def free_port(host):
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pinned(cpu, argv, opts):
    return ['taskset', '-c', str(cpu)] + argv if opts.taskset and cpu is not None else argv


def start(argv, logpath, cwd=ROOT, stdout=None):
    with open(logpath, 'ab') as logf:
        p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=stdout or logf, stderr=logf, start_new_session=True)
    PROCS.append(p)
    return p


def stop(p, grace=5.0):
    """SIGTERM to the process group it leads, SIGKILL after grace seconds."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if p.poll() is None:
        p.wait(5)
    if p in PROCS:
        PROCS.remove(p)


def stop_all():
    for p in list(PROCS):
        try:
            stop(p, grace=2.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def wait_ready(p, host, port, limit=15.0):
    end = time.time() + limit
    while time.time() < end:
        if p.poll() is not None:
            return 'exited with status %s before listening' % p.returncode
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return None
        except OSError:
            time.sleep(0.05)
    return 'not listening after %.0f s' % limit


def start_servers(name, count, cpus, opts, rundir, tag):
    """count servers of one kind; returns ([Popen], [port], error or None)."""
    proto, tmpl = opts.server_defs[name]
    procs, ports = [], []
    for k in range(count):
        port = free_port(opts.host)
        text = tmpl
        for key, val in (('{host}', opts.host), ('{port}', str(port)),
                         ('{python}', opts.python), ('{rundir}', rundir)):
            text = text.replace(key, val)
        logpath = os.path.join(rundir, '%s-%s-%d.log' % (name, tag, port))
        p = start(pinned(cpus[k % len(cpus)] if cpus else None, shlex.split(text), opts), logpath)
        procs.append(p)
        ports.append(port)
        err = wait_ready(p, opts.host, port)
        if err:
            tail = ''
            try:
                with open(logpath, 'rb') as f:
                    tail = f.read()[-300:].decode(errors='replace').strip()
            except OSError:
                pass
            return procs, ports, 'server %s%s' % (err, (': ' + tail) if tail else '')
    return procs, ports, None


def peak_rss_mib(pids):
    total = 0
    for pid in pids:
        try:
            with open('/proc/%d/status' % pid) as f:
                for line in f:
                    if line.startswith('VmHWM:'):
                        total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024.0, 1)


def wait_quiet(limit, threshold=0.15, sample=0.5):
    """Wait up to limit s until the machine's busy CPU (this driver excluded)
    stays under threshold CPUs for one sample."""
    t0 = time.time()
    while True:
        b0, c0 = machine_busy()[0], self_cpu()
        time.sleep(sample)
        busy = (machine_busy()[0] - b0 - (self_cpu() - c0)) / sample
        if busy < threshold or time.time() - t0 >= limit:
            return round(time.time() - t0, 1), round(busy, 2)


# ---------------------------------------------------------------------------
# One measured run

def shape(scenario, opts):
    sc = dict(SCENARIOS[scenario])
    if not sc.pop('fixed', False):
        sc['jobs'] = max(1, int(sc['jobs'] * opts.scale))
    return sc


def phases(sc):
    return 1 + (1 if sc.get('queue_first') else 0) + (1 if sc['workers'] > 1000 else 0)


def run_loadgen(proto, ports, pids, sc, opts):
    """Run one load generator (pinned); returns its JSON record or a failure."""
    if proto == 'deputy':
        argv = [opts.python, os.path.join(HERE, 'loadgen.py'),
                '--ports', ','.join(map(str, ports))]
    else:
        argv = [opts.python, os.path.join(HERE, 'gearman_load.py'),     # the reference's
                '--port', str(ports[0])]
    argv += ['--host', opts.host, '--server-pid', ','.join(str(p) for p in pids),
             '--timeout', str(opts.timeout)]
    for k, v in sc.items():
        if k == 'capacity' and proto != 'deputy':
            continue
        argv += ['--' + k.replace('_', '-'), str(v)]
    limit = opts.timeout * phases(sc) + 90
    try:
        cp = subprocess.run(pinned(opts.load_cpu, argv, opts), stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {'failure': 'load generator killed after %.0f s' % limit}
    try:
        rec = json.loads(cp.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {'failure': 'load generator status %s: %s' % (
            cp.returncode, cp.stderr.decode(errors='replace')[-400:].strip())}
    if cp.stderr.strip():
        rec['loadgen_stderr'] = cp.stderr.decode(errors='replace')[-400:]
    # the reference loadgen_gearman reports no 'servers'; its queue figures
    # have the same names as ours
    return rec


def one_run(name, scenario, opts, rep, rundir, count=1, placement='cpu0'):
    sc = shape(scenario, opts)
    proto = opts.server_defs[name][0]
    rec = {'server': name, 'scenario': scenario, 'rep': rep, 'servers': count}
    if scenario == 'multi':
        rec['placement'] = placement
        rec['scenario'] = 'multi-%d' % count
    if opts.wait_quiet > 0:
        waited, busy = wait_quiet(opts.wait_quiet)
        rec['quiet_wait_s'], rec['busy_before_run'] = waited, busy
        if waited >= 1:
            log('  waited %.0f s for other load to stop (last seen %.2f CPUs busy)' % (waited, busy))
    cpus = {'cpu0': [opts.server_cpu], 'spread': list(range(os.cpu_count() or 1)),
            'free': None}[placement]
    procs, ports, err = start_servers(name, count, cpus, opts, rundir,
                                      '%s-%d' % (rec['scenario'], rep))
    try:
        if err:
            rec['failure'] = err
            return rec
        load_cpu = opts.load_cpu
        if placement == 'free':
            opts.load_cpu = None
        try:
            rec.update(run_loadgen(proto, ports, [p.pid for p in procs], sc, opts))
        finally:
            opts.load_cpu = load_cpu
        rec['server_peak_rss_mib'] = peak_rss_mib([p.pid for p in procs])
        dead = [p.returncode for p in procs if p.poll() is not None]
        if dead:
            rec['failure'] = 'server exited with status %s during the run' % dead[0]
        return rec
    finally:
        for p in procs:
            stop(p)


def client_runs(opts, rep, rundir):
    """Raw load generator (1 client, 1 worker of capacity 32), then a
    deputy_client submitter and worker, on the same deputy server."""
    sc = shape('client', opts)
    base = {'server': 'deputy', 'rep': rep, 'servers': 1}
    raw = dict(base, scenario='client-raw')
    lib = dict(base, scenario='client-lib')
    if opts.wait_quiet > 0:
        wait_quiet(opts.wait_quiet)
    procs, ports, err = start_servers('deputy', 1, [opts.server_cpu], opts, rundir,
                                      'client-%d' % rep)
    srv = procs[0]
    worker = None
    try:
        if err:
            raw['failure'] = lib['failure'] = err
            return [raw, lib]
        raw.update(run_loadgen('deputy', ports, [srv.pid], sc, opts))
        address = '%s:%d' % (opts.host, ports[0])
        script = os.path.join(HERE, 'clientlib.py')
        wlog = os.path.join(rundir, 'clientlib-worker-%d.log' % rep)
        wout = open(wlog + '.out', 'w+b')
        worker = start(pinned(opts.load_cpu, [opts.python, script, 'worker', '--address', address,
                                              '--capacity', str(sc['capacity'])], opts),
                       wlog, stdout=wout)
        # the worker prints {"ready": true} after can_do, or {"skipped": ...}
        end = time.time() + 20
        first = b''
        while time.time() < end and worker.poll() is None:
            wout.seek(0)
            first = wout.read()
            if first.strip():
                break
            time.sleep(0.05)
        wout.seek(0)
        first = wout.read()
        if b'skipped' in first:
            lib['skipped'] = json.loads(first.decode().splitlines()[0])['skipped']
            return [raw, lib]
        if worker.poll() is not None:
            with open(wlog, 'rb') as f:
                tail = f.read()[-400:].decode(errors='replace').strip()
            lib['skipped'] = 'deputy_client worker exited (%s): %s' % (worker.returncode, tail)
            return [raw, lib]
        argv = [opts.python, script, 'submit', '--address', address, '--jobs',
                str(sc['jobs'] * sc['clients']), '--window', str(sc['window']),
                '--arg-size', str(sc['arg_size']), '--server-pid', str(srv.pid),
                '--worker-pid', str(worker.pid), '--timeout', str(opts.timeout)]
        limit = opts.timeout + 60
        try:
            cp = subprocess.run(pinned(opts.load_cpu, argv, opts), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=limit, cwd=ROOT)
            try:
                out = json.loads(cp.stdout.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                out = {'skipped': 'deputy_client submitter failed (status %s): %s' % (
                    cp.returncode, cp.stderr.decode(errors='replace')[-400:].strip())}
        except subprocess.TimeoutExpired:
            out = {'skipped': 'deputy_client submitter killed after %.0f s' % limit}
        lib.update(out)
        lib['server_peak_rss_mib'] = peak_rss_mib([srv.pid])
        return [raw, lib]
    finally:
        if worker is not None:
            stop(worker)
        for p in procs:
            stop(p)


# ---------------------------------------------------------------------------
# Summaries and tables

KEYS = ('jobs_per_s', 'lat_p50_us', 'lat_p99_us', 'server_cpu_us_per_job',
        'server_cpu_sched_us_per_job', 'server_cpu_s', 'server_cpu_util', 'loadgen_cpu_util',
        'other_cpu_util', 'server_peak_rss_mib', 'queue_wall_s', 'queue_bytes_per_job',
        'queue_rss_bytes_per_job', 'queue_server_cpu_sched_us_per_job', 'connect_wall_s',
        'conn_bytes_each', 'submitter_cpu_us_per_job', 'worker_cpu_us_per_job',
        'worker_cpu_sched_us_per_job', 'worker_cpu_util', 'jobs_done')


def disturbed(rec):
    x = (rec.get('other_cpu_util') or 0) + (rec.get('steal_util') or 0)
    return x if x > DISTURBED else 0


def summarize(runs):
    groups = {}
    for r in runs:
        if r.get('superseded'):
            continue
        key = (r['scenario'], r['server'], r.get('placement'))
        groups.setdefault(key, []).append(r)
    rows = []
    for (sc, server, placement), rs in groups.items():
        ok = [r for r in rs if 'jobs_per_s' in r]
        row = {'scenario': sc, 'server': server, 'placement': placement, 'runs': len(rs),
               'ok_runs': len(ok), 'servers': rs[0].get('servers', 1),
               'failures': [r['failure'] for r in rs if 'failure' in r],
               'skipped': [r['skipped'] for r in rs if 'skipped' in r],
               'timeouts': sum(1 for r in ok if r.get('timed_out')),
               'disturbed': sum(1 for r in ok if disturbed(r)),
               'errors': sum((r.get('errors') or 0) + (r.get('bad_results') or 0) for r in ok),
               'jobs_expected': ok[0].get('jobs_expected') if ok else None,
               'notes': sorted({n for r in ok for n in r.get('notes') or ()})[:3]}
        for k in KEYS:
            vals = [r[k] for r in ok if r.get(k) is not None]
            row[k] = ({'median': statistics.median(vals), 'min': min(vals), 'max': max(vals)}
                      if vals else None)
        rows.append(row)
    return rows


def med(row, key):
    return row[key]['median'] if row and row.get(key) else None


def cpu_per_job(row):
    """utime+stime per job; from schedstat (ns) when under 0.5 s of CPU."""
    if not row:
        return None, ''
    if (med(row, 'server_cpu_s') or 0) < 0.5 and med(row, 'server_cpu_sched_us_per_job'):
        return med(row, 'server_cpu_sched_us_per_job'), ' †'
    return med(row, 'server_cpu_us_per_job'), ''


def fmt(v, kind=''):
    if v is None:
        return '-'
    if kind == 'rate':
        return '%.1fk' % (v / 1000.0) if v >= 1000 else '%.0f' % v
    if kind == 'us':
        return '%.0f' % v if v >= 100 else '%.1f' % v
    if kind == 'pct':
        return '%.0f' % (v * 100)
    if kind == 'x':
        return '%.2f×' % v
    return str(v)


def row_notes(r):
    notes = []
    if r['timeouts']:
        notes.append('%d/%d runs hit the time limit' % (r['timeouts'], r['ok_runs']))
    if r['disturbed']:
        notes.append('%d/%d runs saw other load' % (r['disturbed'], r['ok_runs']))
    if r['errors']:
        notes.append('%d errors/bad results' % r['errors'])
    if r['failures']:
        notes.append('FAILED: %s' % r['failures'][0][:120])
    if r['skipped']:
        notes.append('skipped: %s' % r['skipped'][0][:160])
    notes.extend(n[:120] for n in r['notes'][:1])
    return '; '.join(notes)


def main_table(rows):
    out = ['| scenario | server | jobs | jobs/s | p50 µs | p99 µs | server CPU µs/job '
           '| server CPU % | loadgen CPU % | server peak RSS MiB | notes |',
           '|' + '---|' * 11]
    for r in rows:
        if r['scenario'].startswith(('client', 'multi')):
            continue
        cpu, mark = cpu_per_job(r)
        out.append('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
            r['scenario'], r['server'], r['jobs_expected'] or '-',
            fmt(med(r, 'jobs_per_s'), 'rate'), fmt(med(r, 'lat_p50_us'), 'us'),
            fmt(med(r, 'lat_p99_us'), 'us'), fmt(cpu, 'us') + mark,
            fmt(med(r, 'server_cpu_util'), 'pct'), fmt(med(r, 'loadgen_cpu_util'), 'pct'),
            fmt(med(r, 'server_peak_rss_mib')), row_notes(r)))
    return '\n'.join(out)


def find(rows, scenario, server, placement=None):
    for r in rows:
        if r['scenario'] == scenario and r['server'] == server and r['placement'] == placement:
            return r
    return None


def ratio(a, b):
    return a / b if a is not None and b else None


def run_cpu(rec):
    """One run's server CPU µs per job, as cpu_per_job reads a row."""
    if (rec.get('server_cpu_s') or 0) < 0.5 and rec.get('server_cpu_sched_us_per_job'):
        return rec['server_cpu_sched_us_per_job']
    return rec.get('server_cpu_us_per_job')


def sched_cpu(rec):
    return rec.get('server_cpu_sched_us_per_job')


def jobs_per_s(rec):
    return rec.get('jobs_per_s')


def p50(rec):
    return rec.get('lat_p50_us')


def paired(runs, a, b, value=run_cpu):
    """value(run of a) ÷ value(run of b), rep by rep, for a and b
    (scenario, server): one rep runs every server back to back, so a
    neighbour that slows this shared machine down for a few minutes moves
    both sides of a rep's ratio, where it would move only one side of a
    ratio of two medians. {'median', 'min', 'max', 'n'}, or None."""
    def by_rep(scenario, server):
        return {r['rep']: value(r) for r in runs
                if r['scenario'] == scenario and r['server'] == server
                and r.get('placement') is None and not r.get('superseded')
                and 'jobs_per_s' in r and not r.get('timed_out')}
    num, den = by_rep(*a), by_rep(*b)
    vals = [num[k] / den[k] for k in sorted(num)
            if k in den and num[k] is not None and den[k]]
    if not vals:
        return None
    return {'median': statistics.median(vals), 'min': min(vals), 'max': max(vals),
            'n': len(vals)}


def fmt_paired(p):
    if p is None:
        return '-'
    if p['n'] == 1:
        return '%.2f×' % p['median']
    return '%.2f× (%.2f–%.2f)' % (p['median'], p['min'], p['max'])


def pmed(p):
    return None if p is None else p['median']


def compare_table(rows, runs, servers):
    """deputy against the others, per scenario."""
    others = [s for s in servers if s != 'deputy']
    if 'deputy' not in servers or not others:
        return ''
    head = '| scenario | deputy CPU µs/job | ' + ' | '.join(
        '%s CPU µs/job | deputy ÷ %s (CPU) | deputy ÷ %s (jobs/s)' % (o, o, o) for o in others) + ' |'
    out = [head, '|' + '---|' * (2 + 3 * len(others))]
    for sc in ('small', 'big', 'latency', 'depth1m', 'depth1k', 'fanin'):
        d = find(rows, sc, 'deputy')
        if not d:
            continue
        cells = [sc, fmt(cpu_per_job(d)[0], 'us')]
        for o in others:
            r = find(rows, sc, o)
            cells += [fmt(cpu_per_job(r)[0], 'us'),
                      fmt_paired(paired(runs, (sc, 'deputy'), (sc, o))),
                      fmt_paired(paired(runs, (sc, 'deputy'), (sc, o), jobs_per_s))]
        out.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


def scale_table(rows, runs, servers):
    out = ['| server | depth1m ÷ depth1k drain CPU/job | fanin ÷ small CPU/job '
           '| bytes per queued job (peak / now) | time to queue s | queue CPU µs/job '
           '| fanin: connect s, bytes/connection |', '|' + '---|' * 7]
    any_row = False
    for s in servers:
        d1m, d1k = find(rows, 'depth1m', s), find(rows, 'depth1k', s)
        fan, small = find(rows, 'fanin', s), find(rows, 'small', s)
        if not (d1m or fan):
            continue
        any_row = True
        # drain CPU per job from schedstat (ns): depth1k's drain is ~10 ms
        dr = paired(runs, ('depth1m', s), ('depth1k', s), sched_cpu)
        fr = paired(runs, ('fanin', s), ('small', s), sched_cpu)
        out.append('| %s | %s | %s | %s / %s | %s | %s | %s, %s |' % (
            s,
            '%s (%s / %s µs)' % (fmt_paired(dr), fmt(med(d1m, 'server_cpu_sched_us_per_job'), 'us'),
                                 fmt(med(d1k, 'server_cpu_sched_us_per_job'), 'us')) if dr else '-',
            '%s (%s / %s µs)' % (fmt_paired(fr), fmt(med(fan, 'server_cpu_sched_us_per_job'), 'us'),
                                 fmt(med(small, 'server_cpu_sched_us_per_job'), 'us')) if fr else '-',
            fmt(med(d1m, 'queue_bytes_per_job')), fmt(med(d1m, 'queue_rss_bytes_per_job')),
            fmt(med(d1m, 'queue_wall_s')), fmt(med(d1m, 'queue_server_cpu_sched_us_per_job'), 'us'),
            fmt(med(fan, 'connect_wall_s')), fmt(med(fan, 'conn_bytes_each'))))
    return '\n'.join(out) if any_row else ''


def client_table(rows, runs):
    raw, lib = find(rows, 'client-raw', 'deputy'), find(rows, 'client-lib', 'deputy')
    if not raw and not lib:
        return ''
    out = ['| load | jobs | jobs/s | p50 µs | p99 µs | server CPU µs/job | submitter CPU µs/job '
           '| worker CPU µs/job | notes |', '|' + '---|' * 9]
    for label, r in (('raw loadgen, 1 client + 1 worker (capacity 32), one process', raw),
                     ('deputy_client submitter + deputy_client worker (capacity 32)', lib)):
        if not r:
            continue
        lg = '%s (submitter and worker in one process)' % fmt(
            ratio((med(r, 'loadgen_cpu_util') or 0) * 1e6, med(r, 'jobs_per_s')), 'us') \
            if r is raw else fmt(med(r, 'submitter_cpu_us_per_job'), 'us')
        wk = '' if r is raw else fmt(med(r, 'worker_cpu_us_per_job'), 'us')
        out.append('| %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
            label, r['jobs_expected'] or '-', fmt(med(r, 'jobs_per_s'), 'rate'),
            fmt(med(r, 'lat_p50_us'), 'us'), fmt(med(r, 'lat_p99_us'), 'us'),
            fmt(cpu_per_job(r)[0], 'us') + cpu_per_job(r)[1], lg, wk, row_notes(r)))
    rr = paired(runs, ('client-lib', 'deputy'), ('client-raw', 'deputy'), jobs_per_s)
    rs = paired(runs, ('client-lib', 'deputy'), ('small', 'deputy'), jobs_per_s)
    out.append('')
    out.append('client library jobs/s ÷ raw loadgen (same shape, same server): %s; '
               '÷ raw `small` (32 workers, 4 clients): %s' % (fmt_paired(rr), fmt_paired(rs)))
    return '\n'.join(out)


def multi_table(rows):
    ms = [r for r in rows if r['scenario'].startswith('multi-')]
    if not ms:
        return ''
    out = ['| servers | placement | server | jobs | jobs/s | p50 µs | p99 µs '
           '| server CPU µs/job (all servers) | server CPU % (sum) | loadgen CPU % | notes |',
           '|' + '---|' * 11]
    for r in sorted(ms, key=lambda r: (r['server'], r['placement'] or '', r['servers'])):
        cpu, mark = cpu_per_job(r)
        out.append('| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
            r['servers'], r['placement'], r['server'], r['jobs_expected'] or '-',
            fmt(med(r, 'jobs_per_s'), 'rate'), fmt(med(r, 'lat_p50_us'), 'us'),
            fmt(med(r, 'lat_p99_us'), 'us'), fmt(cpu, 'us') + mark,
            fmt(med(r, 'server_cpu_util'), 'pct'), fmt(med(r, 'loadgen_cpu_util'), 'pct'),
            row_notes(r)))
    return '\n'.join(out)


TARGETS = """Issue 4 targets (deputy, this run):"""


def targets(rows, runs):
    d = lambda sc: find(rows, sc, 'deputy')  # noqa: E731
    g = lambda sc: find(rows, sc, 'gearmand')  # noqa: E731
    lines = []

    def check(label, ok, detail):
        lines.append('| %s | %s | %s |' % (label, '-' if ok is None else ('yes' if ok else 'NO'),
                                           detail))

    def at_most(p, limit):
        return None if p is None else p['median'] <= limit

    def as_ratios(sc, label, limits):
        """Issue 4's absolute figure as ratios to the yardsticks it measured
        it beside: 12 µs against gearmand's 9.4 and the relay's 22, 120 µs
        against 50 and 315 (this machine is not that one)."""
        for other, limit in zip(('gearmand', 'ceiling'), limits):
            p = paired(runs, (sc, 'deputy'), (sc, other))
            check('%s\'. %s: deputy ÷ %s CPU/job <= %.2f' % (label, sc, other, limit),
                  at_most(p, limit), fmt_paired(p))

    small = cpu_per_job(d('small'))[0]
    check('1. small jobs <= 12 µs CPU/job (gearmand: %s)' % fmt(cpu_per_job(g('small'))[0], 'us'),
          None if small is None else small <= 12, fmt(small, 'us'))
    as_ratios('small', '1', (1.28, 0.55))
    big = cpu_per_job(d('big'))[0]
    check('2. 64 KiB args <= 120 µs CPU/job', None if big is None else big <= 120, fmt(big, 'us'))
    as_ratios('big', '2', (2.4, 0.38))
    p50_, p99_ = med(d('latency'), 'lat_p50_us'), med(d('latency'), 'lat_p99_us')
    gp = paired(runs, ('latency', 'deputy'), ('latency', 'gearmand'), p50)
    check('3. one at a time: p50 <= gearmand\'s (%s µs; deputy ÷ gearmand %s), p99 < 1000 µs'
          % (fmt(med(g('latency'), 'lat_p50_us'), 'us'), fmt_paired(gp)),
          None if p50_ is None or p99_ is None else (p99_ < 1000 and at_most(gp, 1.0) is not False),
          '%s / %s µs' % (fmt(p50_, 'us'), fmt(p99_, 'us')))
    dr = paired(runs, ('depth1m', 'deputy'), ('depth1k', 'deputy'), sched_cpu)
    check('4a. drain CPU/job, depth1m ÷ depth1k <= 1.25', at_most(dr, 1.25), fmt_paired(dr))
    fr = paired(runs, ('fanin', 'deputy'), ('small', 'deputy'), sched_cpu)
    check('4b. fanin ÷ small CPU/job <= 1', at_most(fr, 1.0), fmt_paired(fr))
    mem = med(d('depth1m'), 'queue_bytes_per_job')
    check('4c. bytes per queued job <= 600 (peak RSS after queueing − RSS before)',
          None if mem is None else mem <= 600, fmt(mem))
    lr = paired(runs, ('client-lib', 'deputy'), ('client-raw', 'deputy'), jobs_per_s)
    check('5. client library >= 0.5 × raw loadgen jobs/s',
          None if lr is None else lr['median'] >= 0.5, fmt_paired(lr))
    return '\n'.join(['| target | met | deputy |', '|---|---|---|'] + lines)


def metadata(opts):
    meta = {'date': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'host': platform.node(),
            'kernel': platform.release(), 'cpus': os.cpu_count(),
            'python': platform.python_version(), 'server_cpu': opts.server_cpu,
            'load_cpu': opts.load_cpu, 'taskset': opts.taskset, 'scale': opts.scale,
            'reps': opts.reps, 'timeout_s': opts.timeout}
    try:
        with open('/proc/cpuinfo') as f:
            meta['cpu_model'] = next((l.split(':', 1)[1].strip() for l in f
                                      if l.startswith('model name')), None)
    except OSError:
        pass
    for mod in ('gevent', 'orjson', 'ujson'):
        try:
            meta[mod] = getattr(__import__(mod), '__version__', '?')
        except ImportError:
            pass
    try:                    # the server checks big lines with it when it is there
        meta['pysimdjson'] = importlib.metadata.version('pysimdjson')
    except importlib.metadata.PackageNotFoundError:
        pass
    if opts.server_defs.get('gearmand', (None,))[0]:
        exe = shlex.split(opts.server_defs['gearmand'][1])[0]
        try:
            meta['gearmand'] = subprocess.run([exe, '--version'], capture_output=True,
                                              timeout=10).stdout.decode().strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        meta['git'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                                     capture_output=True, timeout=10).stdout.decode().strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return meta


def report(runs, servers, out, meta, write=True):
    rows = summarize(runs)
    if write:
        with open(out, 'w') as f:
            json.dump({'meta': meta, 'scenarios': SCENARIOS, 'summary': rows, 'runs': runs}, f,
                      indent=1)
    parts = ['## Deputy benchmark (%s, %s CPUs, %s; scale %s, %d rep(s))\n' % (
        meta['date'], meta['cpus'], meta.get('cpu_model', '?'), meta['scale'], meta['reps'])]
    parts.append(main_table(rows))
    parts.append('\nmedian of the reps; server CPU µs/job = utime+stime of the server over '
                 'the measured phase ÷ jobs († from schedstat when under 0.5 s of CPU); '
                 'CPU % = CPU seconds ÷ wall seconds of the measured phase. '
                 'Ratios: the median of the ratios within each rep, with their range '
                 'when there are several reps.')
    for title, text in (('deputy against the others (ratios < 1: deputy cheaper/faster)',
                         compare_table(rows, runs, servers)),
                        ('Cost with scale (drain and fanin CPU from schedstat)',
                         scale_table(rows, runs, servers)),
                        ('Client library (deputy_client)', client_table(rows, runs)),
                        ('More than one server (issue 7): the small load spread over N servers',
                         multi_table(rows))):
        if text:
            parts.append('\n### %s\n\n%s' % (title, text))
    if 'deputy' in servers:
        parts.append('\n### Issue 4 targets\n\n' + targets(rows, runs))
    parts.append('\nJSON: %s' % out)
    print('\n'.join(parts))
    sys.stdout.flush()


def report_again(path):
    with open(path) as f:
        saved = json.load(f)
    runs = saved['runs']
    servers = [s for s in ('deputy', 'ceiling', 'gearmand') if any(r['server'] == s for r in runs)]
    report(runs, servers, path, saved['meta'], write=False)


# ---------------------------------------------------------------------------
# Command line

def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--scenarios', default=','.join(ORDER),
                    help='comma separated, from: %s (default: all)' % ', '.join(ORDER))
    ap.add_argument('--servers', default='deputy,ceiling,gearmand',
                    help='which servers (those not available are skipped with a message)')
    ap.add_argument('--deputy-cmd', default='{python} deputy_server.py -h {host} -p {port}',
                    help='command template of the server under test, run from the project '
                    'root; may use {python} {host} {port} {rundir} (default: %(default)s)')
    ap.add_argument('--scale', type=float, default=1.0,
                    help='fraction of the job counts (not of depth1k or of the 10,000 '
                    'fanin connections), for a quick run')
    ap.add_argument('--reps', type=int, default=1, help='repetitions; medians are reported')
    ap.add_argument('--timeout', type=float, default=120.0,
                    help='hard limit in seconds of each measured phase (and of each '
                    'preparatory one: queueing 1M jobs, connecting 10k workers)')
    ap.add_argument('--multi', default='1,2,3', help='server counts of the multi scenario')
    ap.add_argument('--multi-placement', default='cpu0,free',
                    help='multi scenario placements, comma separated: cpu0 (every server '
                    'on CPU 0, load on CPU 1), spread (server k on CPU k mod CPUs), free '
                    '(nothing pinned) (default: %(default)s)')
    ap.add_argument('--wait-quiet', type=float, default=20.0, metavar='S',
                    help='before each run wait up to S s for other CPU load to stop (0: off)')
    ap.add_argument('--redo-disturbed', type=int, default=2, metavar='N',
                    help='redo a run that saw other load (> %.2f CPU), up to N times; every '
                    'attempt stays in the JSON (default: %%(default)s)' % DISTURBED)
    ap.add_argument('--host', default='127.0.0.1')
    ap.add_argument('--server-cpu', type=int, default=0)
    ap.add_argument('--load-cpu', type=int, default=1)
    ap.add_argument('--python', default=sys.executable)
    ap.add_argument('--out', default=None,
                    help='JSON file (default: bench/results/run-<time>.json)')
    ap.add_argument('--report', metavar='JSON', default=None,
                    help='measure nothing: print the tables of an earlier run\'s JSON file')
    opts = ap.parse_args()
    if opts.report:
        return report_again(opts.report)

    scenarios = [s.strip() for s in opts.scenarios.split(',') if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error('unknown scenario %r (have: %s)' % (s, ', '.join(ORDER)))
    scenarios = [s for s in ORDER if s in scenarios]
    placements = [p.strip() for p in opts.multi_placement.split(',') if p.strip()]
    for p in placements:
        if p not in ('cpu0', 'spread', 'free'):
            ap.error('unknown placement %r' % p)
    counts = [int(x) for x in opts.multi.split(',') if x.strip()]

    opts.taskset = bool(shutil.which('taskset'))
    if not opts.taskset:
        log('taskset not found: nothing is pinned')
    elif (os.cpu_count() or 1) < 2:
        log('one CPU only: server and load generator share it')
        opts.load_cpu = opts.server_cpu
    if opts.taskset:
        try:
            os.sched_setaffinity(0, {opts.load_cpu})   # keep the driver off the server's CPU
        except OSError:
            pass
    opts.server_defs = server_templates(opts)
    servers = []
    for name in [s.strip() for s in opts.servers.split(',') if s.strip()]:
        if name not in opts.server_defs:
            ap.error('unknown server %r (have: deputy, ceiling, gearmand)' % name)
        if opts.server_defs[name][0] is None:
            log('skipping %s: %s' % (name, opts.server_defs[name][1]))
        else:
            servers.append(name)
    if not servers:
        ap.error('no server to run')
    nofile = raise_nofile(NOFILE)
    if 'fanin' in scenarios and nofile < 10200:
        log('warning: open-file limit %d is too low for fanin' % nofile)

    stamp = time.strftime('%Y%m%d-%H%M%S')
    out = opts.out or os.path.join(HERE, 'results', 'run-%s.json' % stamp)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    rundir = tempfile.mkdtemp(prefix='deputy-bench-')
    atexit.register(stop_all)

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)

    meta = metadata(opts)
    meta['server_logs'] = rundir
    runs = []
    t0 = time.time()

    def record(rec):
        runs.append(rec)
        if 'failure' in rec or 'skipped' in rec:
            log('rep %d %-12s %-8s %s: %s' % (rec['rep'], rec['scenario'], rec['server'],
                                              'FAILED' if 'failure' in rec else 'SKIPPED',
                                              rec.get('failure') or rec.get('skipped')))
        else:
            log('rep %d %-12s %-8s %9.0f jobs/s  p50 %9.0f us  p99 %9.0f us  srv %7.1f us/job '
                '(sched %7.1f)  srv %3.0f%%  lg %3.0f%%  other %3.0f%%%s' % (
                    rec['rep'], rec['scenario'] + ('/' + rec['placement'] if rec.get('placement')
                                                   else ''), rec['server'],
                    rec.get('jobs_per_s') or 0, rec.get('lat_p50_us') or 0,
                    rec.get('lat_p99_us') or 0, rec.get('server_cpu_us_per_job') or 0,
                    rec.get('server_cpu_sched_us_per_job') or 0,
                    100 * (rec.get('server_cpu_util') or 0),
                    100 * (rec.get('loadgen_cpu_util') or 0),
                    100 * (rec.get('other_cpu_util') or 0),
                    '  TIMED OUT (%s jobs)' % rec.get('jobs_done') if rec.get('timed_out') else ''))

    def measure(fn, *a):
        """Run fn(*a) -> [records]; redo it (up to --redo-disturbed times)
        when another process or the host took CPU during a measured phase."""
        for attempt in range(opts.redo_disturbed + 1):
            recs = fn(*a)
            bad = [r for r in recs if 'jobs_per_s' in r and not r.get('timed_out')
                   and disturbed(r)]
            for r in recs:
                r['attempt'] = attempt
            if bad and attempt < opts.redo_disturbed:
                for r in recs:
                    r['superseded'] = True
                    runs.append(r)
                log('rep %d %-12s %-8s saw other load (%.0f%% of a CPU): redo' % (
                    bad[0]['rep'], bad[0]['scenario'], bad[0]['server'],
                    100 * disturbed(bad[0])))
                continue
            for r in recs:
                record(r)
            return

    try:
        for rep in range(opts.reps):
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for sc in scenarios:
                if sc == 'client':
                    if 'deputy' in servers:
                        measure(client_runs, opts, rep, rundir)
                    continue
                if sc == 'multi':
                    if 'deputy' in servers:
                        for placement in placements:
                            for n in counts:
                                measure(lambda *a: [one_run(*a)], 'deputy', 'multi', opts, rep,
                                        rundir, n, placement)
                    continue
                for name in order:
                    measure(lambda *a: [one_run(*a)], name, sc, opts, rep, rundir)
    except KeyboardInterrupt:
        log('interrupted: reporting what was measured')
    finally:
        stop_all()
    meta['elapsed_s'] = round(time.time() - t0, 1)
    report(runs, servers, out, meta)


if __name__ == '__main__':
    main()
