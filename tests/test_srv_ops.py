"""SPEC section 8, black box: the shared secret and the SIGTERM drain."""
import itertools
import os
import signal
import socket
import time

import pytest

import deputy_server

from rawhelpers import (
    wait_unix_ready, assert_same,
    ServerProcess, did, do, expect_error, line, sync, sync_quiet, take_job,
    unix_path, wait_for, worker)

SECRET = "s3cr3t-Zq9-do-not-log"
_types = itertools.count()


@pytest.fixture(scope="module")
def secret_server():
    """One server with --secret for the refusal tests (each uses its own
    job type, so they do not see each other)."""
    srv = ServerProcess("--secret", SECRET)
    yield srv
    srv.stop()


def auth(secret):
    return {"cmd": "auth", "secret": secret}


def authed(srv, secret=SECRET, address=None):
    from rawhelpers import RawConn
    c = RawConn(address) if address else srv.connect()
    c.send(auth(secret))
    c.expect("auth", ok=True)
    return c


def refused_and_closed(c):
    msg = expect_error(c)
    assert SECRET not in msg["error"]
    assert c.is_closed(3), "the connection is closed after a failed auth"
    return msg


# -- secret ------------------------------------------------------------------------

def test_auth_ok_then_normal_service(start_server):
    srv = start_server("--secret", SECRET)
    c = authed(srv)
    sync_quiet(c)
    w = authed(srv)
    w.send({"cmd": "can_do", "types": ["t"]})
    c.send(do(1, "t", "x"))
    j = take_job(w, "t")
    w.send(did(j["id"], res="y"))
    c.expect("did", id=1, res="y")


def test_auth_pipelined_with_commands(start_server):
    srv = start_server("--secret", SECRET)
    c = srv.connect()
    c.send_raw(line(auth(SECRET)) + b'{"cmd":"metrics"}\r\n')
    c.expect("auth", ok=True)
    c.expect("metrics")


def test_before_auth_a_line_longer_than_the_auth_limit_is_refused_and_closed(start_server):
    """A stranger cannot make the server hold --max-line (1 MiB) per
    connection: until auth, a line may be AUTH_LINE bytes long."""
    srv = start_server("--secret", SECRET)
    c = srv.connect()
    c.send_raw(b'{"cmd":"auth","secret":"' + b"a" * deputy_server.AUTH_LINE)
    msg = expect_error(c)
    assert "line too long" in msg["error"] and str(deputy_server.AUTH_LINE) in msg["error"]
    assert c.is_closed(3)
    assert authed(srv)                      # others can still come in


def test_after_auth_lines_may_be_max_line_long_in_the_same_read(start_server):
    """The limit goes back to --max-line at auth, for the lines that came
    in the same read too."""
    srv = start_server("--secret", SECRET)
    w = authed(srv)
    w.send({"cmd": "can_do", "types": ["t"]})
    sync_quiet(w)
    c = srv.connect()
    big = "x" * (deputy_server.AUTH_LINE * 2)
    c.send_raw(line(auth(SECRET)) + line(do(1, "t", big)))
    c.expect("auth", ok=True)
    j = take_job(w, "t")
    assert j["arg"] == big
    w.send(did(j["id"], res="ok"))
    c.expect("did", id=1, res="ok")


def test_a_long_secret_still_fits_before_auth(start_server, tmp_path):
    secret = "s" * (deputy_server.AUTH_LINE * 2)
    (tmp_path / "secret").write_text(secret)
    srv = start_server("--secret-file", str(tmp_path / "secret"))
    assert authed(srv, secret=secret)


def test_a_long_secrets_auth_line_fits_with_every_character_escaped_and_no_more(
        start_server, tmp_path):
    """README: before auth a line may be six times the secret's length plus
    100 bytes (when that is over 64 KiB): a \\uXXXX escape per character."""
    secret = "s" * (deputy_server.AUTH_LINE * 2)
    (tmp_path / "secret").write_text(secret)
    srv = start_server("--secret-file", str(tmp_path / "secret"))
    escaped = srv.connect()
    escaped.send_raw(b'{"cmd":"auth","secret":"' + b"\\u0073" * len(secret) + b'"}\r\n')
    escaped.expect("auth", ok=True)
    limit = 6 * len(secret) + 100
    over = srv.connect()
    over.send_raw(b'{"cmd":"metrics","pad":"' + b"x" * (limit - 25) + b'"}\r\n')
    msg = expect_error(over)
    assert "line too long" in msg["error"] and str(limit) in msg["error"], msg
    assert over.is_closed(3)


def test_a_connection_that_never_authenticates_is_closed_after_auth_timeout(start_server):
    """A stranger who connects and says nothing (or half a line) would hold
    a descriptor forever: after --auth-timeout it gets an error and is
    closed. Connections that authenticated in time stay, however idle."""
    srv = start_server("--secret", SECRET, "--auth-timeout", "0.5")
    early = authed(srv)
    started = time.monotonic()          # (before the server accepts them)
    silent, halfway = srv.connect(), srv.connect()
    halfway.send_raw(b'{"cmd":"auth","secr')
    for c in (silent, halfway):
        msg = expect_error(c)
        assert msg["error"] == "no auth within 0.5 s (--auth-timeout)"
        assert c.is_closed(3)
    assert time.monotonic() - started >= 0.45
    assert early.metrics()["connections_open"] == 1     # idle past the deadline, still served
    assert "no auth within 0.5 s" in srv.stderr()


def test_authenticating_just_before_the_auth_timeout_keeps_the_connection(start_server):
    srv = start_server("--secret", SECRET, "--auth-timeout", "1")
    c = srv.connect()
    time.sleep(0.6)
    c.send(auth(SECRET))
    c.expect("auth", ok=True)
    assert c.nothing_within(0.8)            # the deadline passed: nothing, still open
    sync_quiet(c)


def test_auth_timeout_zero_waits_for_auth_forever(start_server):
    srv = start_server("--secret", SECRET, "--auth-timeout", "0")
    c = srv.connect()
    assert c.nothing_within(0.5)
    c.send(auth(SECRET))
    c.expect("auth", ok=True)


def test_without_a_secret_idle_connections_are_never_timed_out(start_server):
    srv = start_server("--auth-timeout", "0.2")
    c = srv.connect()
    assert c.nothing_within(0.6)
    sync_quiet(c)


def test_a_wrong_secret_in_a_loop_does_not_fill_the_log(start_server):
    """Each failed auth is logged, but at most LogThrottle's burst a window:
    a client retrying a wrong secret thousands of times a second wrote a
    megabyte of log in 3 s."""
    srv = start_server("--secret", SECRET)
    for n in range(60):
        c = srv.connect()
        c.send(auth("wrong-%d" % n))
        refused_and_closed(c)
    assert authed(srv)
    logged = srv.stderr()
    assert 1 <= logged.count("authentication failed") <= deputy_server.LogThrottle().burst
    assert logged.count("refused a message") <= deputy_server.LogThrottle().burst


def test_a_wrong_secret_is_one_log_line_for_its_connection(start_server):
    """README: a connection that sends bad input is logged once (here the
    WARNING, not an INFO "refused a message" after it)."""
    srv = start_server("--secret", SECRET)
    c = srv.connect()
    c.send(auth("wrong"))
    refused_and_closed(c)
    assert authed(srv)              # (after the wrong one's line was written)
    logged = srv.stderr()
    assert logged.count("authentication failed") == 1, logged
    assert "refused a message" not in logged, logged


def test_the_log_throttle_counts_what_it_held_back(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(deputy_server, "monotonic", lambda: clock[0])
    throttle = deputy_server.LogThrottle(burst=3, window=10)
    with caplog.at_level("INFO", logger="deputy"):
        for n in range(10):
            throttle.log(20, "event %d", n)
        assert [r.getMessage() for r in caplog.records] == ["event 0", "event 1", "event 2"]
        clock[0] += 10
        throttle.log(20, "event %d", 10)
    assert [r.getMessage() for r in caplog.records][3:] == [
        "(7 more such messages in 10 s were not logged)", "event 10"]


@pytest.mark.parametrize("first", [
    {"cmd": "metrics"},
    {"cmd": "do", "id": 1, "type": "T", "arg": 1},
    {"cmd": "can_do", "types": ["T"]},
    {"cmd": "did", "id": 1, "res": 1},
    {"cmd": "bogus"},
    {"cmd": "cancel", "id": "c-1"},
], ids=lambda m: m["cmd"])
def test_command_before_auth_is_refused_and_closed(secret_server, first):
    t = "ops-%d" % next(_types)
    first = dict(first)
    if first.get("type") == "T":
        first["type"] = t
    if first.get("types") == ["T"]:
        first["types"] = [t]
    c = secret_server.connect()
    c.send(first, {"cmd": "metrics"})
    msg = refused_and_closed(c)
    if "id" in first:       # SPEC 1: an error carries the refused message's id
        assert "id" in msg, msg
        assert_same(msg["id"], first["id"], "error id")
    good = authed(secret_server)
    m = good.metrics()
    good.close()
    assert t not in m["types"], "something was done before auth: %r" % (m["types"].get(t),)


@pytest.mark.parametrize("secret", ["wrong", "", SECRET[:-1], SECRET + "x", " " + SECRET,
                                    SECRET.upper(), None, 12345, [SECRET], {"s": SECRET}],
                         ids=repr)
def test_wrong_secret_is_refused_and_closed(secret_server, secret):
    c = secret_server.connect()
    c.send(auth(secret))
    refused_and_closed(c)


def test_auth_without_secret_field_refused(secret_server):
    c = secret_server.connect()
    c.send({"cmd": "auth"})
    refused_and_closed(c)


def test_invalid_json_before_auth_closes(secret_server):
    c = secret_server.connect()
    c.send_raw(b"not json\r\n")
    refused_and_closed(c)


def test_wrong_secret_then_commands_on_same_connection_get_nothing(secret_server):
    c = secret_server.connect()
    c.send_raw(line(auth("wrong")) + line(do(1, "ops-never", 1)) + b'{"cmd":"metrics"}\r\n')
    refused_and_closed(c)
    good = authed(secret_server)
    m = good.metrics()
    good.close()
    assert "ops-never" not in m["types"]


@pytest.mark.parametrize("secret", ["wrong", 12345])
def test_a_wrong_secret_after_a_right_one_is_refused_and_closed(secret_server, secret):
    """SPEC 8: a wrong secret gets an error and the connection is closed,
    whatever came before it."""
    c = authed(secret_server)
    c.send(auth(secret), {"cmd": "metrics"})
    refused_and_closed(c)


def test_auth_again_with_the_right_secret_is_answered_ok(secret_server):
    c = authed(secret_server)
    c.send(auth(SECRET))
    c.expect("auth", ok=True)
    sync_quiet(c)


def test_a_server_without_a_secret_answers_any_string_secret_ok(shared):
    """So that a client configured with a secret works with it too; a
    secret that is no string is still an ill-typed field (an error, and the
    connection stays usable: there is no secret to protect)."""
    c = shared.connect()
    c.send(auth("anything"))
    c.expect("auth", ok=True)
    c.send({"cmd": "auth"}, {"cmd": "auth", "secret": 5})
    expect_error(c)
    expect_error(c)
    sync_quiet(c)


def start_failing(argv=(), env=None):
    """Run the server program expecting it to refuse to start: -> stderr."""
    import subprocess
    import sys
    from conftest import ROOT, SERVER
    from rawhelpers import free_port
    full_env = dict(os.environ)
    full_env.pop("DEPUTY_SECRET", None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, SERVER, "-p", str(free_port())] + list(argv),
                          capture_output=True, timeout=10, cwd=ROOT, env=full_env)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode not in (0, None) and "Traceback" not in err, err
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err
    return err


@pytest.mark.parametrize("where", ["--secret", "DEPUTY_SECRET"])
def test_a_secret_that_is_not_utf8_is_refused_at_start(where):
    """No client could send it (a JSON string is UTF-8): refused, not a
    server that starts and then fails every auth with a traceback."""
    secret = os.fsdecode(b"ab\xffcd")        # the bytes, as argv and environ give them
    if where == "--secret":
        err = start_failing(["--secret", secret])
    else:
        err = start_failing(env={"DEPUTY_SECRET": secret})
    assert "UTF-8" in err and "ab\ufffdcd" not in err


def test_an_empty_deputy_secret_is_refused_at_start():
    """Set but empty is a mistake (an unfilled template, say), not a wish
    to run without a secret."""
    assert "empty" in start_failing(env={"DEPUTY_SECRET": ""})


def test_secret_from_environment(start_server):
    srv = start_server(env={"DEPUTY_SECRET": SECRET})
    c = srv.connect()
    c.send({"cmd": "metrics"})
    refused_and_closed(c)
    sync_quiet(authed(srv))


def test_secret_file_is_stripped(start_server, tmp_path):
    path = tmp_path / "secret"
    path.write_text("  \n\t" + SECRET + " \n\n")
    srv = start_server("--secret-file", str(path))
    sync_quiet(authed(srv))
    c = srv.connect()
    c.send(auth("  \n\t" + SECRET + " \n\n"))
    refused_and_closed(c)


@pytest.mark.parametrize("argv", [
    ["--secret", SECRET, "--bogus"],
    ["--bogus", "--secret", SECRET],
    ["--secret=" + SECRET, "extra-positional-argument"],
    ["--sec", SECRET, "--no-such-option"],
    ["--se", SECRET, "--no-such-option"],
    ["--s=" + SECRET],
], ids=["before", "after", "equals", "abbreviated", "ambiguous", "ambiguous-equals"])
def test_a_bad_command_line_never_prints_the_secret(argv):
    import subprocess
    import sys
    from conftest import ROOT, SERVER
    proc = subprocess.run([sys.executable, SERVER] + argv, capture_output=True, timeout=10,
                          cwd=ROOT)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "bad command line" in err
    assert SECRET not in err and SECRET not in proc.stdout.decode()


def test_the_secret_is_never_logged(start_server):
    """Periodic metrics, a wrong secret, a right one, refused commands: the
    server's log never holds the secret, nor a wrong guess at it."""
    srv = start_server("-v", "--metrics-interval", "0.05", "--secret", SECRET)
    wrong = srv.connect()
    wrong.send(auth(SECRET[::-1]))
    refused_and_closed(wrong)
    c = authed(srv)
    c.send({"cmd": "bogus", "secret": SECRET})
    expect_error(c)
    sync(c)
    wait_for(lambda: "jobs_added" in srv.stderr(), what="periodic metrics on stderr")
    log = srv.stderr()
    assert "authentication failed" in log
    assert SECRET not in log and SECRET[::-1] not in log


def test_missing_secret_file_is_one_clear_line(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT, SERVER
    from rawhelpers import free_port
    proc = subprocess.run([sys.executable, SERVER, "-p", str(free_port()), "--secret-file",
                           str(tmp_path / "absent")], capture_output=True, timeout=10, cwd=ROOT)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err


def test_secret_never_in_metrics_or_stderr(start_server, tmp_path):
    srv = start_server("--secret", SECRET, "-v", "--metrics-interval", "0.1",
                       "--log-level", "debug")
    c = authed(srv)
    m = c.metrics()
    import orjson
    assert SECRET not in orjson.dumps(m).decode()
    for bad in ("wrong", SECRET[:5], SECRET + "x"):
        b = srv.connect()
        b.send(auth(bad))
        refused_and_closed(b)
    time.sleep(0.3)
    srv.signal(signal.SIGINT)
    srv.wait(5)
    err = srv.stderr()
    assert SECRET not in err
    assert SECRET[:8] not in err
    assert SECRET + "x" not in err


def test_secret_file_content_never_in_stderr(start_server, tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    srv = start_server("--secret-file", str(path), "-v", "--metrics-interval", "0.1",
                       "--log-level", "debug")
    b = srv.connect()
    b.send(auth("nope"))
    refused_and_closed(b)
    sync_quiet(authed(srv))
    time.sleep(0.3)
    assert SECRET not in srv.stderr()


def test_secret_applies_to_unix_socket_too(start_server, tmp_path):
    from rawhelpers import RawConn
    path = unix_path(tmp_path)
    srv = start_server("--secret", SECRET, "-s", path)
    wait_unix_ready(path)
    c = RawConn(path)
    c.send({"cmd": "metrics"})
    refused_and_closed(c)
    sync_quiet(authed(srv, address=path))


# -- drain --------------------------------------------------------------------------

def listener_closed(srv):
    try:
        socket.create_connection(("127.0.0.1", srv.port), timeout=0.5).close()
        return False
    except OSError:
        return True


def test_sigterm_drains_jobs_in_flight(start_server, tmp_path):
    path = unix_path(tmp_path)
    srv = start_server("-s", path)
    wait_unix_ready(path)
    w = worker(srv, "t")
    s = srv.connect()
    s.send(do(1, "t", "running"), do(2, "t", "queued"))
    j = take_job(w, "t")
    srv.signal(signal.SIGTERM)
    # The listeners close; the server stays up for the job in flight.
    wait_for(lambda: listener_closed(srv), 3, what="the TCP listener to close")
    assert srv.proc.poll() is None, "exited with a job in flight"
    # New jobs are refused with "draining" and their id.
    s.send(do(3, "t", "new"))
    msg = expect_error(s, id=3)
    assert msg["error"] == "draining"
    s.send(do("s", "t", "new too"))
    assert expect_error(s, id="s")["error"] == "draining"
    # The result of the job in flight is delivered...
    w.send(did(j["id"], res="finished while draining"))
    s.expect("did", id=1, res="finished while draining")
    # ...the queued job is not handed out, and the server exits 0 at once.
    t0 = time.monotonic()
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 2
    assert not os.path.exists(path)
    assert "Traceback" not in srv.stderr()
    assert "draining: 1 job running" in srv.stderr()
    assert all(m.get("cmd") != "do" for m in drain_messages(w)), "a queued job was handed out"


def drain_messages(c):
    out = []
    try:
        while True:
            out.append(c.recv(0.3))
    except (OSError, ConnectionError):
        pass
    return out


def draining_with_one_job(srv):
    """A worker holding one job of a submitter's, then SIGTERM, once the
    listener has closed: -> (worker, submitter, the job as the worker got it)."""
    w = worker(srv, "t")
    s = srv.connect()
    s.send(do(1, "t"))
    j = take_job(w, "t")
    srv.signal(signal.SIGTERM)
    wait_for(lambda: listener_closed(srv), 3)
    return w, s, j


def test_the_default_drain_timeout_is_30_seconds(start_server):
    """Black box, the drain outlasts a short wait and SIGINT still ends it at
    once; the 30 itself is read from the options the server parsed."""
    from docopt import docopt
    from deputy_server import USAGE, server_from_args
    assert server_from_args(docopt(USAGE, []), {}).drain_timeout == 30
    srv = start_server()
    held = draining_with_one_job(srv)      # (kept: closing the worker would end the drain)
    time.sleep(1.5)
    assert srv.proc.poll() is None, "the drain gave up long before 30 s"
    srv.signal(signal.SIGINT)
    assert srv.wait(5) == 0
    assert held[0].is_closed(3)


def test_drain_ends_when_the_worker_in_flight_is_lost(start_server):
    """A lost worker's job goes back to the queue, which is no longer handed
    out while draining: nothing is left in flight, so the server exits."""
    srv = start_server()
    w, s, _ = draining_with_one_job(srv)
    t0 = time.monotonic()
    w.close()
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 2, "waited for the drain timeout with nothing in flight"


def test_a_job_past_its_ttr_while_draining_is_queued_again_not_failed(start_server):
    """Taken back from its worker (cancel), the job is queued again, as at
    any time, and so no longer in flight: the server exits without a `did`
    for it, and its submitter's connection closes, which is what makes
    deputy_client send it again (a failure would be final)."""
    srv = start_server()
    w = worker(srv, "t")
    s = srv.connect()
    s.send(do(1, "t", ttr=0.5))
    j = take_job(w, "t")
    srv.signal(signal.SIGTERM)
    wait_for(lambda: listener_closed(srv), 3)
    t0 = time.monotonic()
    w.expect("cancel", id=j["id"])
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 2, "waited for the drain timeout with nothing in flight"
    assert [m for m in drain_messages(s) if m.get("cmd") == "did"] == []
    assert s.is_closed(3)


def test_drain_ends_when_the_job_in_flight_is_cancelled(start_server):
    srv = start_server()
    w, s, j = draining_with_one_job(srv)
    t0 = time.monotonic()
    s.send({"cmd": "cancel", "id": 1})
    s.expect("did", id=1, err="cancelled")
    w.expect("cancel", id=j["id"])
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 2


def test_sigterm_with_only_queued_jobs_exits_at_once(start_server):
    srv = start_server()
    s = srv.connect()
    s.send(do(1, "t", "nobody does this"))
    sync_quiet(s)
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 2


def test_drain_timeout(start_server):
    srv = start_server("--drain-timeout", "0.5")
    w = worker(srv, "t")
    s = srv.connect()
    s.send(do(1, "t", "never finished"))
    take_job(w, "t")
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(5) == 0
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 2.5, elapsed


def test_second_sigterm_exits_at_once(start_server, tmp_path):
    path = unix_path(tmp_path)
    srv = start_server("-s", path)
    wait_unix_ready(path)
    w, s, _ = draining_with_one_job(srv)
    time.sleep(0.2)
    assert srv.proc.poll() is None
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 1.5
    assert not os.path.exists(path)


def test_sigint_during_drain_exits_at_once(start_server):
    srv = start_server()
    w, s, _ = draining_with_one_job(srv)
    t0 = time.monotonic()
    srv.signal(signal.SIGINT)
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 1.5


def test_drain_delivers_several_results_on_several_connections(start_server):
    srv = start_server()
    w = worker(srv, "t", capacity=4)
    subs = [srv.connect() for _ in range(4)]
    for i, s in enumerate(subs):
        s.send(do(i, "t", i))
    jobs = [take_job(w, "t") for _ in range(4)]
    srv.signal(signal.SIGTERM)
    wait_for(lambda: listener_closed(srv), 3)
    for j in jobs[:3]:
        w.send(did(j["id"], res=j["arg"] * 10))
    for j in jobs[:3]:
        subs[j["arg"]].expect("did", id=j["arg"], res=j["arg"] * 10)
    assert srv.proc.poll() is None, "one job is still in flight"
    w.send(did(jobs[3]["id"], err="last"))
    subs[jobs[3]["arg"]].expect("did", id=jobs[3]["arg"], err="last")
    assert srv.wait(5) == 0


def test_metrics_still_answered_while_draining(start_server):
    srv = start_server()
    w, s, j = draining_with_one_job(srv)
    before, m = sync(s)
    assert before == [] and m["jobs_running"] == 1
    w.send(did(j["id"], res=None))
    s.expect("did", id=1)
    assert srv.wait(5) == 0


# A result bigger than the kernel's socket buffers can hold (Linux grows a
# receive buffer to 6 MiB at most by default): it stays partly in the
# server's output until the submitter reads it.
BIG_RESULT = "r" * (16 * 1024 * 1024)


def big_result_server(start_server, *options):
    return start_server("--max-line", str(40 * 1024 * 1024), *options)


def read_big_did(s, id):
    msg = s.expect("did", id=id, timeout=20)
    assert msg["res"] == BIG_RESULT, "the result arrived cut off or altered"


def test_drain_waits_for_a_result_still_being_written_to_a_slow_submitter(start_server):
    """The results of jobs in flight are delivered (SPEC 8) to a submitter
    that reads them late, too: the drain does not cut the last one off
    after a grace period of its own."""
    srv = big_result_server(start_server, "--drain-timeout", "20")
    w, s, j = draining_with_one_job(srv)
    w.send(did(j["id"], res=BIG_RESULT))
    time.sleep(2.5)                         # the submitter reads nothing meanwhile
    assert srv.proc.poll() is None, "exited with a result still unsent"
    read_big_did(s, 1)
    assert srv.wait(5) == 0


def test_a_result_is_delivered_whole_though_the_submitter_sent_more_meanwhile(start_server):
    """A paused submitter's line stays unread, and exiting with input unread
    resets the connection, which drops what the kernel had not delivered
    yet: the drain waits until the submitter has it all."""
    srv = big_result_server(start_server, "--drain-timeout", "20")
    w, s, j = draining_with_one_job(srv)
    w.send(did(j["id"], res=BIG_RESULT))
    time.sleep(0.5)                         # the server has paused the submitter
    s.send({"cmd": "metrics"})
    time.sleep(1)
    read_big_did(s, 1)
    assert srv.wait(5) == 0


def test_sigterm_with_nothing_running_still_sends_the_results_not_yet_written(start_server):
    """Nothing running, but a finished job's result is still in the server's
    output: SIGTERM sends it before exiting, not half of it."""
    srv = big_result_server(start_server, "--drain-timeout", "20")
    w = worker(srv, "t")
    s = srv.connect()
    s.send(do(1, "t"))
    w.send(did(take_job(w, "t")["id"], res=BIG_RESULT))
    sync_quiet(w)                           # the result has reached the server
    srv.signal(signal.SIGTERM)
    time.sleep(1)
    assert srv.proc.poll() is None, "exited with a result still unsent"
    read_big_did(s, 1)
    assert srv.wait(5) == 0


def test_replies_a_connection_does_not_read_do_not_hold_an_idle_drain(start_server):
    """SPEC 4: with no job in flight, SIGTERM exits at once. A connection
    that asks for metrics thousands of times and reads nothing is owed no
    result: its unsent replies held the exit for the whole drain timeout."""
    srv = start_server("--drain-timeout", "20")
    flooder = srv.connect()
    flooder.send_raw(b'{"cmd":"metrics"}\r\n' * 20000)
    time.sleep(1)                           # its replies fill the buffers
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(10) == 0
    assert time.monotonic() - t0 < 5, "unread replies held the drain"
    flooder.close()


def test_one_drain_timeout_bounds_the_running_jobs_and_the_unsent_results_together(
        start_server):
    srv = big_result_server(start_server, "--drain-timeout", "3")
    w, s, j = draining_with_one_job(srv)
    t0 = time.monotonic()
    time.sleep(2)                           # the job runs for most of the timeout
    w.send(did(j["id"], res=BIG_RESULT))    # and its result is never read
    assert srv.wait(10) == 0
    elapsed = time.monotonic() - t0
    assert 2 <= elapsed < 4.5, "the drain took %.1f s, its timeout is 3" % elapsed
    assert "still unsent" in srv.stderr()


def test_the_server_module_loads_where_fcntl_and_termios_are_missing():
    """A copied deputy_server.py must import on a system without them (the
    drain then only waits for what the server itself still holds)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['fcntl'] = sys.modules['termios'] = None; "
            "import socket, deputy_server; "
            "print(deputy_server.unacknowledged(socket.socket()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
