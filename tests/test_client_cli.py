"""`deputy-client`, run as `python deputy_client.py` against a real server
(issue 3's command line; `status` from issue 6)."""
import signal
import sys
import textwrap

import gevent
import gevent.subprocess as subprocess
import orjson
import pytest

from test_client_helpers import (
    WAIT, free_port, job_type, run_cli, start_cli, stop_process, wait_until)
import deputy_client

pytest_plugins = ["test_client_helpers"]    # the clients and shared_server fixtures


def echo_worker(clients, server, t, capacity=4):
    worker = clients(server.address)

    def echo(arg):
        if arg == "fail":
            raise ValueError("asked to fail")
        return {"got": arg}

    worker.can_do({t: echo}, capacity=capacity)
    return worker


def test_help_and_version():
    helped = run_cli("--help")
    assert helped.returncode == 0
    for command in ("do TYPE", "map TYPE FILE", "metrics", "status", "work TYPE", "--address"):
        assert command in helped.stdout
    versioned = run_cli("--version")
    assert versioned.returncode == 0
    assert versioned.stdout.strip() == deputy_client.__version__


def test_a_bad_command_line_is_a_usage_error_without_traceback():
    done = run_cli("frobnicate")
    assert done.returncode == 2                # as README says for a usage error
    assert "Usage:" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("address, complaint", [
    ("127.0.0.1:notaport", "bad port"), ("127.0.0.1:99999", "bad port"),
    ("127.0.0.1:\u0663", "bad port"), ("127.0.0.1:11_746", "bad port"),
    ("::1", "in brackets"), ("[::1", "[IPv6]:port")])
def test_a_bad_address_exits_2_with_one_line(address, complaint):
    done = run_cli("-a", address, "metrics")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and complaint in done.stderr


@pytest.mark.parametrize("option, value, complaint", [
    ("--timeout", "0", "--timeout must be positive"),
    ("--ttr", "-1", "--ttr must be positive"),
    ("--priority", "high", "--priority must be a number"),
    ("--priority", "\u0663", "--priority must be a number"),     # int() takes other digits
    ("--timeout", "1_0", "--timeout must be a number"),
    ("--capacity", "0", "--capacity must be at least 1"),
])
def test_bad_numbers_are_usage_errors(option, value, complaint):
    command = ["work", "t", option, value, "--", "true"] if option == "--capacity" else [
        "do", "t", option, value]
    done = run_cli("-a", "127.0.0.1:1", *command)
    assert done.returncode == 2
    assert done.stderr == "deputy-client: %s, got %r\n" % (complaint, value)


@pytest.mark.parametrize("command, complaint", [
    (["do", "t", "1", "--ttr", "inf"], "--ttr must be a finite number, got 'inf'"),
    (["do", "t", "1", "--timeout", "nan"], "--timeout must be a finite number, got 'nan'"),
    (["do", "t", "1", "--priority", "9" * 23],
     "--priority: priority must be an integer from -2**63 to 2**64-1, got " + "9" * 23),
    (["work", "t", "--capacity", "9" * 23, "--", "true"],
     "--capacity: capacity must be an integer from 1 to 2**64-1, got " + "9" * 23),
    (["do", "", "1"], "TYPE: a job type name is a non-empty string"),
    (["map", "", "-"], "TYPE: a job type name is a non-empty string"),
    (["work", "", "--", "true"], "TYPE: a job type name is a non-empty string"),
], ids=["ttr-inf", "timeout-nan", "priority-beyond-64-bits", "capacity-beyond-64-bits",
        "do-empty-type", "map-empty-type", "work-empty-type"])
def test_values_the_library_refuses_are_usage_errors_too(command, complaint):
    """README: exit status 2 for a bad option or ARG, whichever check
    finds it, the command line's or the library's; nothing is sent."""
    done = run_cli("-a", "127.0.0.1:1", *command, input="")
    assert done.returncode == 2
    assert done.stderr == "deputy-client: %s\n" % complaint


@pytest.mark.parametrize("arg, expected", [
    ('{"x": [1, 2]}', {"x": [1, 2]}),
    ("hello", "hello"),
    ("-5", -5),
    ('"quoted"', "quoted"),
    (None, None),
])
def test_do_prints_the_result_as_json(shared_server, clients, arg, expected):
    t = job_type()
    echo_worker(clients, shared_server, t)
    done = run_cli("-a", shared_server.address, "do", t, *([] if arg is None else [arg]))
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"got": expected}
    assert done.stdout.count("\n") == 1


def test_do_of_a_failing_job_exits_1_with_the_error_on_stderr(shared_server, clients):
    t = job_type()
    echo_worker(clients, shared_server, t)
    done = run_cli("-a", shared_server.address, "do", t, "fail")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "deputy-client: ValueError: asked to fail\n"


@pytest.mark.parametrize("command", [["do", "t", "1"], ["map", "t", "-"]], ids=["do", "map"])
def test_do_and_map_with_no_server_and_no_timeout_exit_1_saying_why(command):
    """The CLI does not wait for a server that is down, as the library does:
    none reached within the connect timeout (5 s) is exit 1."""
    address = "127.0.0.1:%d" % free_port()
    done = run_cli("-a", address, *command, input="1\n", timeout=WAIT + 5)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines           # the one error: no "retrying" before it
    assert lines[0].startswith("deputy-client: cannot reach %s within 5 s" % address), lines
    assert "refused" in lines[0] and done.stdout == ""


def test_a_command_that_found_no_server_leaves_no_job_behind(clients):
    """do --bg failing with "cannot reach" must not send its job later (at
    close, say, once a server is up): whoever retries would have it twice."""
    client = clients("127.0.0.1:%d" % free_port())
    job = client.do("t", 1, bg=True)
    with pytest.raises(deputy_client.DeputyError, match="cannot reach"):
        deputy_client.wait_for_a_server(client, [job], timeout=0.2)
    assert job.ready() and job.exception.error == "cancelled"
    assert client._backlog == {}


def test_do_with_no_server_says_why_and_times_out():
    done = run_cli("-a", "127.0.0.1:%d" % free_port(), "do", "t", "--timeout", "0.5")
    assert done.returncode == 1
    assert done.stderr.startswith("deputy-client: timeout: no server reached (127.0.0.1:")
    assert "refused" in done.stderr and done.stderr.count("\n") == 1


def test_map_reads_a_file_and_prints_results_in_order(shared_server, clients, tmp_path):
    t = job_type()
    echo_worker(clients, shared_server, t, capacity=8)
    args_file = tmp_path / "args.jsonl"
    args_file.write_text("\n".join(str(n) for n in range(200)) + "\n\nword\n")
    done = run_cli("-a", shared_server.address, "map", t, str(args_file))
    assert done.returncode == 0, done.stderr
    results = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert results == [{"got": n} for n in range(200)] + [{"got": "word"}]
    assert done.stderr == ""                   # no progress line: stderr is no terminal


def test_map_splits_lines_at_line_feeds_only(shared_server, clients, tmp_path):
    """JSON strings may hold U+2028, NEL or a form feed raw (orjson writes
    them so): each line is still one job, not several broken ones."""
    t = job_type()
    echo_worker(clients, shared_server, t)
    values = ["a\u2028b", "c\x85d", "e\x0cf", "g\rh"]
    args_file = tmp_path / "args.jsonl"
    args_file.write_bytes(b"".join(orjson.dumps(v) + b"\r\n" for v in values))
    done = run_cli("-a", shared_server.address, "map", t, str(args_file))
    assert done.returncode == 0, done.stderr
    results = [orjson.loads(line) for line in done.stdout.split("\n") if line]
    assert results == [{"got": v} for v in values]


def test_map_reads_stdin_and_marks_failed_jobs(shared_server, clients):
    t = job_type()
    echo_worker(clients, shared_server, t)
    done = run_cli("-a", shared_server.address, "map", t, "-", input='1\n"fail"\n3\n')
    assert done.returncode == 1
    assert done.stdout.splitlines() == ['{"got":1}', "null", '{"got":3}']
    assert done.stderr == "deputy-client: job 2 failed: ValueError: asked to fail\n"


def test_map_of_a_missing_file_is_a_usage_error(shared_server):
    done = run_cli("-a", shared_server.address, "map", "t", "/nonexistent/args")
    assert done.returncode == 2
    assert "cannot read /nonexistent/args" in done.stderr


def test_map_of_a_file_that_is_not_utf8_is_a_usage_error(shared_server, tmp_path):
    args_file = tmp_path / "args.jsonl"
    args_file.write_bytes(b'1\n"caf\xe9"\n')
    done = run_cli("-a", shared_server.address, "map", "t", str(args_file))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not UTF-8 (line 2" in done.stderr
    with open(args_file, "rb") as stdin:
        process = start_cli("-a", shared_server.address, "map", "t", "-", stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=WAIT)
        finally:
            stop_process(process)
    assert process.returncode == 2 and b"stdin is not UTF-8" in err and out == b""


@pytest.mark.parametrize("arg", ["123456789012345678901234567890", "[NaN]", "Infinity", "1e400",
                                 '"\\ud800"'])
def test_an_arg_json_cannot_carry_exactly_is_a_usage_error(shared_server, arg):
    done = run_cli("-a", shared_server.address, "do", "t", arg, "--bg")
    assert done.returncode == 2
    assert "cannot be sent exactly as JSON" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("-a", shared_server.address, "map", "t", "-", input="1\n%s\n" % arg)
    assert done.returncode == 2 and "line 2 cannot be sent exactly" in done.stderr


def test_do_sends_64_bit_integers_exactly(shared_server, clients):
    t = job_type()
    echo_worker(clients, shared_server, t)
    for number in (2 ** 64 - 1, -2 ** 63):
        done = run_cli("-a", shared_server.address, "do", t, str(number))
        assert done.returncode == 0, done.stderr
        assert orjson.loads(done.stdout) == {"got": number}


def test_map_into_a_pipe_closed_early_exits_without_a_traceback(shared_server, clients):
    t = job_type()
    echo_worker(clients, shared_server, t, capacity=8)
    process = start_cli("-a", shared_server.address, "map", t, "-", stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # More output than a pipe holds, so the writer is still writing.
        process.stdin.write(b"".join(b"%d\n" % n for n in range(20000)))
        process.stdin.close()
        assert process.stdout.readline() == b'{"got":0}\n'
        process.stdout.close()                  # like `| head -1`
        err = process.stderr.read()
        assert process.wait(WAIT) == 141
    finally:
        stop_process(process)
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def test_metrics_pretty_prints(shared_server):
    done = run_cli("-a", shared_server.address, "metrics")
    assert done.returncode == 0, done.stderr
    metrics = orjson.loads(done.stdout)
    assert "jobs_added" in metrics and "types" in metrics
    assert '\n  "connections"' in done.stdout


@pytest.mark.parametrize("command", [["metrics"], ["do", "t", "1", "--timeout", "2"]],
                         ids=["metrics", "do"])
def test_a_server_that_hangs_up_at_once_gives_one_line_not_one_per_reconnection(command):
    """(A TLS server spoken to without --tls, a proxy with nothing behind
    it.) "lost connection ...; reconnecting" is news only to work."""
    import gevent.server
    hang_up = gevent.server.StreamServer(("127.0.0.1", 0), lambda sock, address: sock.close())
    hang_up.start()
    try:
        done = run_cli("-a", "127.0.0.1:%d" % hang_up.server_port, *command,
                       timeout=WAIT + 10)
    finally:
        hang_up.stop()
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "reconnecting" not in done.stderr, done.stderr


def test_metrics_without_a_server_fails_with_the_reason():
    done = run_cli("-a", "127.0.0.1:%d" % free_port(), "metrics")
    assert done.returncode == 1
    assert "no metrics: cannot reach 127.0.0.1" in done.stderr and "refused" in done.stderr
    assert done.stderr.count("\n") == 1 and "retrying" not in done.stderr


def test_main_is_the_console_entry_point(shared_server, capsys):
    assert deputy_client.main(["-a", shared_server.address, "metrics"]) == 0
    assert "jobs_added" in orjson.loads(capsys.readouterr().out)


def test_status_prints_a_table_per_type(shared_server, clients):
    t = job_type("status")
    submitter = clients(shared_server.address)
    for n in range(3):
        submitter.do(t, n)
    wait_until(lambda: submitter.metrics()["types"].get(t, {}).get("queued") == 3)
    done = run_cli("-a", shared_server.address, "status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["TYPE", "QUEUED", "RUNNING", "WORKERS", "IDLE"]
    assert [t, "3", "0", "0", "0"] in [line.split() for line in lines[1:]]


def test_status_shows_control_characters_in_type_names_escaped(shared_server, clients):
    """A line feed in a type name would forge a row of the table, an escape
    sequence reach the operator's terminal; printable names (é too) stay."""
    t = job_type("status")
    forged = t + "-x\nforged 9 9 9 9\x1b[2J"
    submitter = clients(shared_server.address)
    submitter.do(forged, 1)
    submitter.do(t + "-é", 1)
    wait_until(lambda: forged in submitter.metrics()["types"])
    done = run_cli("-a", shared_server.address, "status")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert [t + "-x\\nforged", "9", "9", "9", "9\\x1b[2J", "1", "0", "0", "0"] in rows
    assert [t + "-é", "1", "0", "0", "0"] in rows
    assert not any(row[:1] == ["forged"] for row in rows) and "\x1b" not in done.stdout


def test_status_watch_redraws_until_stopped(shared_server):
    """Ctrl-C is how it ends: exit 0, and nothing on stderr (gevent's hub
    would print "KeyboardInterrupt" and a timestamp)."""
    watcher = start_cli("-a", shared_server.address, "status", "--watch", "--interval", "0.1",
                        stdout=gevent.subprocess.PIPE, stderr=gevent.subprocess.PIPE,
                        text=True)
    try:
        with gevent.Timeout(WAIT):
            headers = 0
            while headers < 3:
                if watcher.stdout.readline().split()[:1] == ["TYPE"]:
                    headers += 1
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(WAIT) == 0
        assert watcher.stderr.read() == ""
    finally:
        stop_process(watcher)
        watcher.stdout.close()
        watcher.stderr.close()


def test_status_watch_ends_with_0_on_sigterm(shared_server):
    """README: work and status --watch run until stopped, so Ctrl-C or
    SIGTERM is how they end: exit 0."""
    watcher = start_cli("-a", shared_server.address, "status", "--watch", "--interval", "0.1",
                        stdout=gevent.subprocess.PIPE, stderr=gevent.subprocess.PIPE,
                        text=True)
    try:
        with gevent.Timeout(WAIT):
            while watcher.stdout.readline().split()[:1] != ["TYPE"]:
                pass
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(WAIT) == 0
        assert watcher.stderr.read() == ""
    finally:
        stop_process(watcher)
        watcher.stdout.close()
        watcher.stderr.close()


def test_status_watch_keeps_watching_while_the_server_is_down(start_server):
    port = free_port()
    watcher = start_cli("-a", "127.0.0.1:%d" % port, "status", "--watch", "--interval", "0.1",
                        stdout=gevent.subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(WAIT):
            assert "cannot reach 127.0.0.1:%d" % port in read_until(watcher, "cannot reach")
            start_server(port=port)
            read_until(watcher, "TYPE")
        assert watcher.poll() is None
    finally:
        stop_process(watcher)
        watcher.stdout.close()


def read_until(process, text):
    while True:
        line = process.stdout.readline()
        assert line, "the process ended"
        if text in line:
            return line


COMMAND = textwrap.dedent("""
    import json, sys
    arg = json.load(sys.stdin)
    if arg == "fail":
        sys.stderr.write("first line\\nthe real reason\\n")
        sys.exit(3)
    if arg == "silent":
        sys.exit(4)
    if arg == "text":
        print("not json at all")
    else:
        print(json.dumps({"double": arg * 2}))
""")


def test_work_runs_the_command_for_each_job(shared_server, clients):
    t = job_type()
    worker = start_cli("-a", shared_server.address, "work", t, "--capacity", "2", "--",
                       sys.executable, "-c", COMMAND)
    try:
        submitter = clients(shared_server.address)
        jobs = [submitter.do(t, arg) for arg in (21, "fail", "text", "silent", [1])]
        assert jobs[0].get(WAIT) == {"double": 42}
        with pytest.raises(deputy_client.JobFailed) as failed:
            jobs[1].get(WAIT)
        assert failed.value.error == "the real reason"
        assert jobs[2].get(WAIT) == "not json at all"
        with pytest.raises(deputy_client.JobFailed) as silent:
            jobs[3].get(WAIT)
        assert silent.value.error == "command exited with status 4"
        assert jobs[4].get(WAIT) == {"double": [1, 1]}
        assert submitter.call(t, 2 ** 63 - 1, timeout=WAIT) == {"double": 2 ** 64 - 2}
        with pytest.raises(deputy_client.JobFailed,
                           match="^TypeError: result is not JSON: Integer exceeds 64-bit"):
            submitter.call(t, 2 ** 63 + 1, timeout=WAIT)      # doubled: beyond 64 bits
        assert submitter.metrics()["types"][t]["workers"] == 1
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(WAIT) == 0
    finally:
        stop_process(worker)


def test_work_reports_a_command_that_cannot_start(shared_server, clients):
    t = job_type()
    worker = start_cli("-a", shared_server.address, "work", t, "--", "/nonexistent/command")
    try:
        submitter = clients(shared_server.address)
        with pytest.raises(deputy_client.JobFailed, match="cannot run /nonexistent/command"):
            submitter.call(t, 1, timeout=WAIT)
    finally:
        stop_process(worker)


def test_work_says_it_is_retrying_a_server_that_is_down():
    """A worker waits for its server as long as it takes: the first failed
    attempt is worth a line on stderr (do, map and metrics say why they
    gave up instead)."""
    port = free_port()
    worker = start_cli("-a", "127.0.0.1:%d" % port, "work", "t", "--", "true",
                       stderr=gevent.subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(WAIT):
            line = worker.stderr.readline()
        assert line.startswith("deputy-client: cannot connect to 127.0.0.1:%d" % port), line
        assert line.rstrip().endswith("; retrying") and worker.poll() is None
    finally:
        stop_process(worker)
        worker.stderr.close()
