"""The benchmark still runs against the server as it is now: a change to
the server's internals once broke bench/hotpath.py's fakes unnoticed.
These check that each tool finishes and reports every job done, never how
fast (figures belong in the benchmark, not in tests)."""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import orjson
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def run_tool(args, timeout):
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_hotpath_drives_every_job_through_the_real_connection_code():
    done = run_tool([os.path.join(BENCH, "hotpath.py"), "--jobs", "3000", "--reps", "1",
                     "--window", "1000"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr
    assert re.search(r"^3000 jobs, 32 workers .*: [0-9.]+ µs of server Python per job",
                     done.stdout, re.M), done.stdout


def test_hotpath_drives_more_workers_than_it_may_open_files():
    # The fakes share one real socket: one each ran out of descriptors with
    # 10,000 workers once the server's GC threshold kept old drives' around.
    import resource

    def few_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    done = subprocess.run([sys.executable, os.path.join(BENCH, "hotpath.py"), "--jobs", "1000",
                           "--reps", "2", "--workers", "300", "--types", "10"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, preexec_fn=few_descriptors)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^1000 jobs, 300 workers over 10 types", done.stdout, re.M), done.stdout


VALGRIND_SUMMARY = """==1== I   refs:      5,421,338,925
==1== D   refs:      2,388,693,438  (1,658,736,943 rd   + 729,956,495 wr)
==1== D1  misses:       83,805,477  (   76,728,661 rd   +   7,076,816 wr)
==1== LLd misses:          927,544  (      564,247 rd   +     363,297 wr)
"""


def test_instructions_reads_each_count_valgrind_prints(monkeypatch):
    # valgrind itself is not needed: a process prints its summary.
    spec = importlib.util.spec_from_file_location("instructions",
                                                  os.path.join(BENCH, "instructions.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def summary():
        return subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write(%r)"
                                 % VALGRIND_SUMMARY], stderr=subprocess.PIPE)

    assert tool.valgrind_counts(summary()) == {
        "instructions": 5421338925, "L1 data misses": 83805477, "LL data misses": 927544}
    monkeypatch.setattr(tool, "cache_sim", True)
    silent = subprocess.Popen([sys.executable, "-c", "pass"], stderr=subprocess.PIPE)
    with pytest.raises(SystemExit):
        tool.valgrind_counts(silent)


# Appended to a copy of a server file: what the hotpath drive gave its broker.
REPORT_SUBMISSIONS = """
import atexit, json as report_json
seen = {"jobs": 0, "types": [], "most_unanswered": 0, "args": []}
real_submit = Broker.submit
def reporting_submit(self, peer, job):
    seen["jobs"] += 1
    seen["types"] = sorted(set(seen["types"]) | {job.kind})
    seen["args"] = sorted(set(seen["args"]) | {bytes(job.arg_tail).decode()})
    seen["most_unanswered"] = max(seen["most_unanswered"], len(peer.jobs) + 1)
    return real_submit(self, peer, job)
Broker.submit = reporting_submit
atexit.register(lambda: print("variant saw " + report_json.dumps(seen)))
"""


def drive_hotpath_of(server_text, tmp_path):
    """Run instructions.py's hotpath code (without valgrind) on a copy of
    server_text that reports its submissions: -> what it saw."""
    spec = importlib.util.spec_from_file_location("instructions",
                                                  os.path.join(BENCH, "instructions.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    variant = tmp_path / "variant.py"
    variant.write_text(server_text + REPORT_SUBMISSIONS)
    opts = argparse.Namespace(server=str(variant), workers=4, window=20, arg_size=10, types=2)
    done = subprocess.run([sys.executable, "-c", tool.hotpath_code(opts, 60)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.split("variant saw ", 1)[1])


def test_instructions_drives_the_hotpath_of_the_server_file_it_is_given(tmp_path):
    """--side hotpath measures --server's file, under --types, --window and
    --arg-size: a variant that reports the jobs it was given is the one
    driven, and they are the ones asked for."""
    with open(os.path.join(ROOT, "deputy_server.py")) as original:
        seen = drive_hotpath_of(original.read(), tmp_path)
    assert seen == {"jobs": 60, "types": ["echo0", "echo1"], "most_unanswered": 20,
                    "args": ['"xxxxxxxx"}\r\n']}


def test_the_hotpath_drives_a_server_from_before_its_socket_change(tmp_path):
    """The fakes also fit the Connection of 00db1c6 (a socket's bound methods
    in slots), the version to compare the later ones with."""
    try:
        old = subprocess.run(["git", "show", "00db1c6:deputy_server.py"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    except OSError:
        pytest.skip("no git")
    if old.returncode:
        pytest.skip("not a git checkout with the project's history")
    assert drive_hotpath_of(old.stdout, tmp_path)["jobs"] == 60


def test_hotpath_counts_the_bytecodes_each_server_function_runs_per_job():
    done = run_tool([os.path.join(BENCH, "hotpath.py"), "--jobs", "500", "--bytecodes"],
                    timeout=60)
    assert done.returncode == 0, done.stderr
    total = re.search(r"^(\d+) bytecodes of deputy_server per job$", done.stdout, re.M)
    assert total and int(total.group(1)) > 100, done.stdout
    assert re.search(r"^ +[0-9.]+  handle_lines \(line \d+\)$", done.stdout, re.M), done.stdout


def test_run_measures_each_deputy_scenario_with_every_job_answered(tmp_path):
    out = tmp_path / "run.json"
    done = run_tool([os.path.join(BENCH, "run.py"), "--scale", "0.02",
                     "--scenarios", "small,big,latency,depth1k,client", "--servers", "deputy",
                     "--reps", "1", "--wait-quiet", "0", "--redo-disturbed", "0",
                     "--timeout", "60", "--out", str(out)], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    measured = {run["scenario"] for run in runs}
    assert {"small", "big", "latency", "depth1k"} <= measured, measured
    for run in runs:
        if "jobs_expected" not in run:
            continue
        assert not run["timed_out"], run
        assert run["errors"] == 0 and run["bad_results"] == 0, run
        assert run["jobs_done"] == run["jobs_expected"], run
        # (/proc's stat counts in 10 ms ticks; a short run's is schedstat's)
        assert run["server_cpu_sched_us_per_job"] > 0, run
    assert "| small | deputy |" in done.stdout
    again = run_tool([os.path.join(BENCH, "run.py"), "--report", str(out)], timeout=60)
    assert again.returncode == 0, again.stderr
    assert "| small | deputy |" in again.stdout and "### Issue 4 targets" in again.stdout
    assert json.loads(out.read_text())["runs"] == runs       # --report only reads


def load_bench_module(name):
    """A bench/ file as a module (run.py imports loadgen.py beside it)."""
    spec = importlib.util.spec_from_file_location("bench_" + name, os.path.join(BENCH, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, BENCH)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCH)
    return module


def read_lines_until(sock, count, timeout=5.0):
    """count lines from a gevent socket, each read bounded by timeout."""
    sock.settimeout(timeout)
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed after %r" % data[-200:]
        data += chunk
    return data.split(b"\r\n")[:count]


def echo_worker_pair(loadgen):
    """(the server's end of a socketpair, an EchoWorker's greenlet on the other)."""
    import gevent
    import gevent.socket
    ours, theirs = gevent.socket.socketpair()
    worker = gevent.spawn(loadgen.worker, theirs, "echo", 3)
    return ours, theirs, worker


def test_the_load_generators_worker_answers_lines_cut_anywhere_and_counts_errors():
    import gevent
    loadgen = load_bench_module("loadgen")
    ours, theirs, worker = echo_worker_pair(loadgen)
    try:
        assert read_lines_until(ours, 1) == [b'{"cmd":"can_do","types":["echo"],"capacity":3}']
        stream = (b'{"cmd":"do","id":1,"type":"echo","arg":"a\\u00e9"}\r\n'
                  b'{"cmd":"error","error":"nope"}\r\n'
                  b'{"cmd":"do","id":2,"type":"echo","arg":{"x":[1,2]}}\r\n')
        for cut in range(0, len(stream), 7):      # 7-byte pieces: lines cut anywhere
            ours.sendall(stream[cut:cut + 7])
            gevent.sleep(0.001)
        assert read_lines_until(ours, 2) == [b'{"cmd":"did","id":1,"res":"a\xc3\xa9"}',
                                             b'{"cmd":"did","id":2,"res":{"x":[1,2]}}']
        assert loadgen.stats.errors == 1 and "nope" in loadgen.stats.notes[0]
        ours.close()                        # the server closed: the worker ends
        worker.join(timeout=5)
        assert worker.dead and worker.exception is None
    finally:
        worker.kill(timeout=5)
        ours.close()
        theirs.close()


def test_the_load_generators_worker_sends_what_the_kernel_did_not_take_before_reading_on():
    loadgen = load_bench_module("loadgen")
    ours, theirs, worker = echo_worker_pair(loadgen)
    try:
        read_lines_until(ours, 1)
        big = "x" * (8 << 20)               # more than a socketpair's buffers hold
        ours.sendall(b'{"cmd":"do","id":7,"type":"echo","arg":"%s"}\r\n' % big.encode()
                     + b'{"cmd":"do","id":8,"type":"echo","arg":"after"}\r\n')
        assert read_lines_until(ours, 2, timeout=10) == [
            b'{"cmd":"did","id":7,"res":"%s"}' % big.encode(),
            b'{"cmd":"did","id":8,"res":"after"}']
    finally:
        worker.kill(timeout=5)
        ours.close()
        theirs.close()


def test_the_load_generator_echoes_big_lines_as_decoding_them_would():
    loadgen = load_bench_module("loadgen")
    arg = "0123456789abcdef\u00e9\\\"" * 400
    line = b'{"cmd":"do","id":41,"type":"echo","arg":%s}\r' % orjson.dumps(arg)
    fast = loadgen.echo_big_do(line)
    assert fast == b'{"cmd":"did","id":41,"res":%s}\r\n' % orjson.dumps(arg)
    assert fast[:-2] == orjson.dumps({"cmd": "did", "id": 41, "res": arg})
    # another layout is decoded instead
    assert loadgen.echo_big_do(b'{"id":41,"cmd":"do","arg":"x"}') is None
    assert loadgen.echo_big_do(b'{"cmd":"do","id":"a1","type":"t","arg":"x"}') is None
    tails = (b',"res":%s}\r' % orjson.dumps(arg), b',"res":%s}' % orjson.dumps(arg))
    assert loadgen.echoed_id(fast[:-1], tails) == 41
    assert loadgen.echoed_id(fast[:-1].replace(b"abc", b"abd", 1), tails) is None
    assert loadgen.echoed_id(b'{"cmd":"did","id":4x1' + tails[0], tails) is None


def test_the_load_generators_client_counts_a_big_result_that_differs_as_bad():
    import gevent
    import gevent.socket
    loadgen = load_bench_module("loadgen")
    arg = "x" * 5000
    ours, theirs = gevent.socket.socketpair()
    lat = []
    client = gevent.spawn(loadgen.client, theirs, 1, 3, 3, arg, ["echo"], lat)
    try:
        jobs = read_lines_until(ours, 3)
        assert [orjson.loads(job)["id"] for job in jobs] == [1, 2, 3]
        right = orjson.dumps(arg)
        ours.sendall(b'{"cmd":"did","id":1,"res":%s}\r\n' % right
                     + b'{"cmd":"did","id":2,"res":%s}\r\n' % right.replace(b"x", b"y", 1)
                     + b'{"res":%s,"cmd":"did","id":3}\r\n' % right)    # same value, other layout
        client.join(timeout=5)
        assert client.dead and client.exception is None
        assert len(lat) == 3
        assert loadgen.stats.bad == 1 and loadgen.stats.unknown == 0
    finally:
        client.kill(timeout=5)
        ours.close()
        theirs.close()


GEARMAN_REFERENCE = os.path.join(ROOT, "..", "shared", "bench", "loadgen_gearman.py")


@pytest.mark.skipif(not os.path.exists(GEARMAN_REFERENCE),
                    reason="the reference harness (../shared/bench) is not beside the project")
def test_the_gearman_load_generators_worker_answers_the_reference_workers_way():
    import struct
    import gevent
    import gevent.socket
    gearman_load = load_bench_module("gearman_load")
    ref = gearman_load.ref
    ours, theirs = gevent.socket.socketpair()
    worker = gevent.spawn(gearman_load.worker, theirs, b"echo")

    def packet(typ, body=b""):
        return struct.pack(">4sII", b"\0RES", typ, len(body)) + body

    def expect(*reqs):
        want = b"".join(reqs)
        ours.settimeout(5)
        got = b""
        while len(got) < len(want):
            chunk = ours.recv(1 << 16)
            assert chunk, got
            got += chunk
        assert got == want

    try:
        expect(ref.req(ref.CAN_DO, b"echo"), ref.GRAB)
        ours.sendall(packet(ref.NO_JOB))
        expect(ref.SLEEP)
        assert ref.stats["asleep"] == 1
        ours.sendall(packet(ref.NOOP))
        expect(ref.GRAB)
        assert ref.stats["asleep"] == 0
        stream = (packet(ref.JOB_ASSIGN_UNIQ, b"H:1\0echo\0c0-1\0pay\0load")
                  + packet(ref.ERROR, b"boom") + packet(ref.JOB_ASSIGN, b"H:2\0echo\0x"))
        for cut in range(0, len(stream), 5):      # packets cut anywhere
            ours.sendall(stream[cut:cut + 5])
            gevent.sleep(0.001)
        expect(ref.req(ref.WORK_COMPLETE, b"H:1\0pay\0load"), ref.GRAB,
               ref.req(ref.WORK_COMPLETE, b"H:2\0x"), ref.GRAB)
        assert ref.stats["errors"] == 1 and "boom" in ref.stats["notes"][0]
    finally:
        worker.kill(timeout=5)
        ours.close()
        theirs.close()


def load_run_module():
    return load_bench_module("run")


def cpu_run(scenario, server, rep, us, **extra):
    return dict({"scenario": scenario, "server": server, "rep": rep, "jobs_per_s": 1000.0,
                 "server_cpu_s": 2.0, "server_cpu_us_per_job": us}, **extra)


def test_ratios_are_taken_within_each_rep_then_their_median():
    """A neighbour that doubles every server's cost in rep 1 moves both
    sides of that rep's ratio; medians taken per server would give 40/20
    or 20/40 depending on which reps they fell in."""
    run = load_run_module()
    runs = [cpu_run("small", "deputy", 0, 12.0), cpu_run("small", "gearmand", 0, 10.0),
            cpu_run("small", "deputy", 1, 26.0), cpu_run("small", "gearmand", 1, 20.0),
            cpu_run("small", "deputy", 2, 11.0), cpu_run("small", "gearmand", 2, 10.0),
            # neither a redone run nor one that hit the time limit counts
            cpu_run("small", "deputy", 2, 99.0, superseded=True),
            cpu_run("small", "gearmand", 3, 10.0),
            cpu_run("small", "deputy", 3, 99.0, timed_out=True)]
    p = run.paired(runs, ("small", "deputy"), ("small", "gearmand"))
    assert p["n"] == 3
    assert (round(p["median"], 3), round(p["min"], 3), round(p["max"], 3)) == (1.2, 1.1, 1.3)
    assert run.fmt_paired(p) == "1.20× (1.10–1.30)"
    assert run.paired(runs, ("small", "deputy"), ("big", "gearmand")) is None
    assert run.fmt_paired(None) == "-"
