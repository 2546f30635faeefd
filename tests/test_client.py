"""The client library against a real server over real sockets (SPEC section
6, issue 3): submitting, pipelining, futures, handlers, capacity, and
surviving lost workers and a restarted server."""
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import gevent
import gevent.event
import gevent.server
import gevent.socket
import gevent.subprocess
import greenlet
import pytest
import orjson

from test_client_helpers import ROOT, WAIT, free_port, job_type, wait_until
import deputy_client
from deputy_client import (
    Client, ClientClosed, DeputyError, JobCancelled, JobFailed, JobRefused, Timeout, progress)

pytest_plugins = ["test_client_helpers"]    # the clients and shared_server fixtures


# -- addresses -----------------------------------------------------------------

def test_address_as_string_and_as_tuple(shared_server, clients):
    t = job_type()
    worker = clients("127.0.0.1:%d" % shared_server.port)
    worker.can_do({t: lambda arg: arg + 1})
    submitter = clients(("127.0.0.1", shared_server.port))
    assert submitter.call(t, 41, timeout=WAIT) == 42
    port_as_text = clients(("127.0.0.1", str(shared_server.port)))
    assert [c.label for c in port_as_text.connections] == [shared_server.address]
    assert port_as_text.call(t, 1, timeout=WAIT) == 2


def test_unix_socket_address(start_server, clients, tmp_path):
    path = str(tmp_path / "deputy.sock")
    server = start_server("-s", path)
    t = job_type()
    worker = clients(server.address)
    worker.can_do({t: lambda arg: "over " + arg})
    submitter = clients("unix:" + path)
    assert submitter.call(t, "unix", timeout=WAIT) == "over unix"


@pytest.mark.parametrize("address", [
    "127.0.0.1:http", "127.0.0.1:0", "127.0.0.1:70000", "", [], 5,
    ":80", "127.0.0.1:11746:5", "::1", "[::1", "[::1]80", "[]:80", "unix:"])
def test_bad_address_is_a_deputy_error(address):
    """Refused at once, not a client that retries an address that cannot
    be meant (an IPv6 address goes in brackets: [::1]:11746)."""
    with pytest.raises(DeputyError):
        Client(address)


@pytest.mark.parametrize("options", [
    {"secret": b"bytes"}, {"secret": 5}, {"connect_timeout": "5"}, {"connect_timeout": 0},
    {"backoff_max": -1}, {"backoff_max": float("nan")}])
def test_bad_client_options_are_a_deputy_error_at_once(options):
    """Not a connection greenlet that dies on them, leaving every job to hang."""
    with pytest.raises(DeputyError):
        Client(("127.0.0.1", free_port()), **options)


# -- submitting and futures ----------------------------------------------------

def test_ten_thousand_jobs_pipeline_without_waiting_for_answers(shared_server, clients):
    t = job_type()
    submitter = clients(shared_server.address)
    jobs = [submitter.do(t, n) for n in range(10000)]
    assert not any(job.ready() for job in jobs)
    # No worker can do t yet, so no answer can have come back: every job
    # reaching the server's queue shows they all went out without one.
    wait_until(lambda: queued(submitter, t) == 10000, what="10,000 jobs queued")
    worker = clients(shared_server.address)
    worker.can_do({t: lambda arg: arg * 2}, capacity=32)
    assert [job.get(WAIT) for job in jobs] == [n * 2 for n in range(10000)]


def queued(client, job_type_name):
    return client.metrics()["types"].get(job_type_name, {}).get("queued", 0)


def test_results_reach_the_right_futures_when_jobs_finish_out_of_order(shared_server, clients):
    t = job_type()
    finished = []

    def slow_echo(arg):
        gevent.sleep(random.random() * 0.01)
        finished.append(arg)
        return {"echo": arg}

    worker = clients(shared_server.address)
    worker.can_do({t: slow_echo}, capacity=16)
    submitter = clients(shared_server.address)
    jobs = [submitter.do(t, n) for n in range(300)]
    assert [job.get(WAIT) for job in jobs] == [{"echo": n} for n in range(300)]
    assert finished != sorted(finished), "jobs should have finished out of order"
    assert len({job.id for job in jobs}) == 300


def test_get_times_out_and_the_job_still_gets_its_result(shared_server, clients):
    t = job_type()
    submitter = clients(shared_server.address)
    job = submitter.do(t, "late")
    assert not job.ready() and not job.successful()
    with pytest.raises(Timeout) as raised:
        job.get(timeout=0.05)
    assert isinstance(raised.value, gevent.Timeout)
    assert isinstance(raised.value, DeputyError)
    assert isinstance(raised.value, TimeoutError)      # the built-in one
    assert "no result after 0.05 s" in str(raised.value)
    worker = clients(shared_server.address)
    worker.can_do({t: lambda arg: arg.upper()})
    assert job.get(WAIT) == "LATE"
    assert job.ready() and job.successful()
    assert submitter.call(t, "again", timeout=WAIT) == "AGAIN"


def test_arg_defaults_to_null_and_any_json_value_round_trips(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)
    worker.can_do({t: lambda arg: arg})
    submitter = clients(shared_server.address)
    assert submitter.call(t, timeout=WAIT) is None
    value = {"s": "é\u2028", "n": [1, -2.5, 2 ** 63 - 1], "b": [True, False, None], "o": {}}
    assert submitter.call(t, value, timeout=WAIT) == value


def test_an_arg_that_is_not_json_raises_at_once(shared_server, clients):
    submitter = clients(shared_server.address)
    with pytest.raises(DeputyError, match="cannot send"):
        submitter.do(job_type(), {1, 2})
    with pytest.raises(DeputyError):
        submitter.do(job_type(), 2 ** 70)


@pytest.mark.parametrize("arg", [
    float("nan"), float("inf"), [1, -float("inf")], {"n": {"deep": float("nan")}}, 2 ** 64,
    -2 ** 63 - 1])
def test_an_arg_json_cannot_carry_exactly_is_refused_not_altered(arg, clients):
    # orjson would write NaN and Infinity as null: SPEC 1 says refuse instead.
    submitter = clients(("127.0.0.1", free_port()))
    with pytest.raises(DeputyError, match="cannot send"):
        submitter.do(job_type(), arg)
    with pytest.raises(DeputyError, match="timeout must be a positive number"):
        submitter.do(job_type(), 1, timeout=float("inf"))


def test_results_json_cannot_carry_exactly_fail_the_job(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)
    worker.can_do({t: lambda arg: {"nan": float("nan"), "big": 2 ** 70, "edge": 2 ** 64 - 1}[arg]})
    submitter = clients(shared_server.address)
    for key in ("nan", "big"):
        with pytest.raises(JobFailed, match="^TypeError: result is not JSON: "):
            submitter.call(t, key, timeout=WAIT)
    assert submitter.call(t, "edge", timeout=WAIT) == 2 ** 64 - 1


def test_a_job_longer_than_max_line_is_refused_at_once(clients):
    submitter = clients(("127.0.0.1", free_port()))
    assert submitter.max_line == 1048576          # the server's default --max-line
    with pytest.raises(DeputyError, match="max_line"):
        submitter.do(job_type(), "x" * 1048576)
    small = clients(("127.0.0.1", free_port()), max_line=100)
    with pytest.raises(DeputyError, match="over max_line=100"):
        small.do("t", "x" * 100)
    small.do("t", "x" * 50)
    with pytest.raises(DeputyError, match="max_line"):
        Client(("127.0.0.1", free_port()), max_line=0)


def test_a_job_with_a_timeout_is_measured_as_the_line_it_will_send(start_server, clients):
    """The timeout goes out as what is left of it (5 becomes 4.99...): a job
    that fits only with the timeout as given is refused at once, not sent
    for the server to hang up the connection on."""
    server = start_server("--max-line", "1000")
    submitter = clients(server.address, max_line=1000)
    t = job_type()
    base = len(orjson.dumps({"cmd": "do", "id": "1", "type": t, "arg": "", "timeout": 5}))
    with pytest.raises(DeputyError, match="over max_line=1000"):
        submitter.do(t, "x" * (1000 - base), timeout=5)
    worker = clients(server.address, max_line=1000)
    worker.can_do({t: len})
    fits = 1000 - base - 24             # the longest a float of seconds left can be
    assert submitter.do(t, "x" * fits, timeout=5).get(WAIT) == fits


def test_a_job_over_the_servers_max_line_fails_instead_of_poisoning_the_connection(
        start_server, clients):
    # The client's max_line is larger than this server's: the server hangs
    # up on the line, and the client must not send it again on every
    # reconnection (re-running the other jobs each time).
    server = start_server("--max-line", "1000")
    t = job_type()
    runs = []

    def count(arg):
        runs.append(arg)
        gevent.sleep(0.05)
        return arg if isinstance(arg, int) else len(arg)

    worker = clients(server.address)
    worker.can_do({t: count}, capacity=4)
    submitter = clients(server.address)
    before = submitter.do(t, 1)
    gevent.sleep(0.02)
    big = submitter.do(t, "x" * 5000)
    after = submitter.do(t, 2)
    with pytest.raises(JobRefused, match="line too long"):
        big.get(WAIT)
    assert before.get(WAIT) == 1 and after.get(WAIT) == 2
    gevent.sleep(0.3)
    assert sorted(set(runs)) == [1, 2] and len(runs) <= 4     # no resubmission loop
    assert submitter.call(t, 3, timeout=WAIT) == 3


def test_a_result_longer_than_max_line_fails_the_job(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address, max_line=1000)
    worker.can_do({t: lambda arg: "y" * arg})
    submitter = clients(shared_server.address)
    with pytest.raises(JobFailed, match="^result too long: .* over max_line=1000"):
        submitter.call(t, 5000, timeout=WAIT)
    assert submitter.call(t, 10, timeout=WAIT) == "y" * 10


def test_an_error_text_longer_than_the_servers_max_line_fails_the_job_once(start_server, clients):
    # Sent as it is, the server would hang up on the worker and hand the
    # job out again, until "its worker was lost N times".
    server = start_server("--max-line", "1000")
    t = job_type()

    def fail_loudly(arg):
        raise ValueError("x" * 5000)

    worker = clients(server.address, max_line=1000)
    worker.can_do({t: fail_loudly, t + "-ok": lambda arg: arg})
    submitter = clients(server.address, max_line=1000)
    with pytest.raises(JobFailed, match="^result too long: .* over max_line=1000"):
        submitter.call(t, 1, timeout=WAIT)
    assert submitter.call(t + "-ok", 2, timeout=WAIT) == 2
    assert submitter.metrics()["jobs_reassigned"] == 0


def test_an_error_text_json_cannot_carry_fails_the_job_and_the_worker_goes_on(
        shared_server, clients):
    t = job_type()

    def fail_oddly(arg):
        raise ValueError("file name \udcff")      # a lone surrogate: not UTF-8

    worker = clients(shared_server.address)
    worker.can_do({t: fail_oddly, t + "-ok": lambda arg: arg}, capacity=1)
    submitter = clients(shared_server.address)
    for _ in range(3):          # with capacity 1, a lost slot would hang the next job
        with pytest.raises(JobFailed, match="^TypeError: result is not JSON: "):
            submitter.call(t, 1, timeout=WAIT)
    assert submitter.call(t + "-ok", 2, timeout=WAIT) == 2


def refusing_server():
    """A listener that answers every `do` with an `error` for its id, as a
    server does for a job it will not take; -> (address, its greenlet)."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        sock, _ = listener.accept()
        with sock, sock.makefile("rb") as lines:
            for line in lines:
                msg = orjson.loads(line)
                if msg.get("cmd") == "do":
                    sock.sendall(orjson.dumps({"cmd": "error", "id": msg["id"],
                                               "error": "not today"}) + b"\r\n")
    return "127.0.0.1:%d" % listener.getsockname()[1], listener, gevent.spawn(serve)


def test_a_job_the_server_refuses_fails_with_the_servers_error(clients):
    address, listener, serving = refusing_server()
    try:
        submitter = clients(address)
        job = submitter.do(job_type(), "refused")
        with pytest.raises(JobRefused) as raised:
            job.get(WAIT)
        assert isinstance(raised.value, JobFailed)
        assert raised.value.error == "refused by %s: not today" % address
        assert job.ready() and not job.successful()
        assert job.exception is raised.value
    finally:
        serving.kill()
        listener.close()


def test_call_and_map(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)

    @worker.can_do(t, capacity=8)
    def square(arg):
        if arg == "boom":
            raise ValueError("not a number")
        return arg * arg

    submitter = clients(shared_server.address)
    assert submitter.call(t, 7, timeout=WAIT) == 49
    assert submitter.map(t, range(100), timeout=WAIT) == [n * n for n in range(100)]
    assert submitter.map(t, [], timeout=WAIT) == []
    with pytest.raises(JobFailed, match="not a number"):
        submitter.map(t, [1, "boom", 3], timeout=WAIT)


def test_map_timeout_bounds_the_whole_call(shared_server, clients):
    submitter = clients(shared_server.address)
    with pytest.raises(Timeout):
        submitter.map(job_type(), [1, 2, 3], timeout=0.1)


# -- handlers ------------------------------------------------------------------

def test_a_raising_handler_fails_its_job_and_the_worker_goes_on(shared_server, clients):
    t = job_type()

    def picky(arg):
        if arg == 3:
            raise ValueError("bad input %s" % arg)
        if arg == 4:
            raise KeyError("x")
        if arg == 5:
            raise RuntimeError()
        if arg == 6:
            raise JobFailed("exactly this text")
        if arg == 7:
            return {1, 2}
        return arg

    worker = clients(shared_server.address)
    worker.can_do({t: picky})
    submitter = clients(shared_server.address)
    jobs = [submitter.do(t, n) for n in range(1, 9)]
    outcomes = [outcome(job) for job in jobs]
    assert outcomes[:2] == [1, 2]
    assert outcomes[2] == ("failed", "ValueError: bad input 3")
    assert outcomes[3] == ("failed", "KeyError: 'x'")
    assert outcomes[4] == ("failed", "RuntimeError")
    assert outcomes[5] == ("failed", "exactly this text")
    assert outcomes[6][0] == "failed"
    assert outcomes[6][1].startswith("TypeError: result is not JSON")
    assert outcomes[7] == 8


def outcome(job):
    try:
        return job.get(WAIT)
    except JobFailed as error:
        return ("failed", error.error)


class NotAnException(BaseException):
    pass


def test_a_gevent_timeout_or_other_base_exception_fails_its_job_and_frees_the_slot(
        shared_server, clients):
    t = job_type()

    def escaping(arg):
        if arg == "timeout":
            with gevent.Timeout(0.05):          # the handler's own timeout, escaping it
                gevent.sleep(WAIT)
        if arg == "base":
            raise NotAnException("not an Exception")
        if arg == "exit":
            raise gevent.GreenletExit()
        return arg

    worker = clients(shared_server.address)
    worker.can_do({t: escaping}, capacity=1)
    submitter = clients(shared_server.address)
    jobs = [submitter.do(t, arg) for arg in ("timeout", "base", "exit", "ok")]
    assert [outcome(job) for job in jobs] == [
        ("failed", "Timeout: 0.05 seconds"), ("failed", "NotAnException: not an Exception"),
        ("failed", "GreenletExit"), "ok"]
    assert (worker.worker.held, worker.worker.running) == (0, 0)


def leave(arg):
    """A handler that ends the program when its arg is "exit"."""
    if arg == "exit":
        sys.exit("bye")
    return arg


def test_system_exit_in_a_handler_fails_its_job_then_reaches_the_main_greenlet(
        shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)
    worker.can_do({t: leave})
    submitter = clients(shared_server.address)
    job = submitter.do(t, "exit")
    with pytest.raises(SystemExit, match="bye"):
        gevent.sleep(WAIT)                   # the hub passes it to this greenlet
    with pytest.raises(JobFailed, match="^SystemExit: bye$"):
        job.get(WAIT)
    assert submitter.call(t, "next", timeout=WAIT) == "next"


ENDING_WORKER_SCRIPT = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, %r)
    from deputy_client import Client
    worker = Client(sys.argv[1])
    def handler(arg):
        if arg == "exit":
            sys.exit("bye")
        if arg == "interrupt":
            raise KeyboardInterrupt
        return arg
    worker.can_do({sys.argv[2]: handler})
    if sys.argv[3] == "signal":
        signal.signal(signal.SIGTERM, lambda *args: worker.close())
    print("working", flush=True)
    worker.work()
    print("work() returned", flush=True)
""" % ROOT)


def start_worker_script(server, t, how):
    return subprocess.Popen([sys.executable, "-c", ENDING_WORKER_SCRIPT, server.address, t, how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("arg, error", [("exit", "SystemExit: bye"),
                                        ("interrupt", "KeyboardInterrupt")])
def test_a_program_ended_by_its_handler_still_fails_the_job(shared_server, clients, arg, error):
    """README's worker shape, without `with`: the exception ends the
    program, and the job's error reached the server first (not a lost
    worker whose job runs again)."""
    t = job_type()
    proc = start_worker_script(shared_server, t, "plain")
    try:
        assert proc.stdout.readline() == "working\n"
        submitter = clients(shared_server.address)
        job = submitter.do(t, arg)
        with pytest.raises(JobFailed) as failed:
            job.get(WAIT)
        assert failed.value.error == error
        assert proc.wait(WAIT) != 0
        figures = submitter.metrics()["types"][t]
        assert figures["failed"] == 1 and figures["queued"] == 0 and figures["running"] == 0
    finally:
        proc.kill()
        proc.communicate()


def test_close_from_a_plain_signal_handler_ends_work(shared_server):
    """README: work() blocks until close() is called, from a signal handler
    too: one installed with signal.signal runs in gevent's hub, which must
    not block."""
    proc = start_worker_script(shared_server, job_type(), "signal")
    try:
        assert proc.stdout.readline() == "working\n"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert out == "work() returned\n" and "Traceback" not in err
    finally:
        proc.kill()


def test_a_bad_ca_file_is_a_deputy_error(tmp_path):
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("hello\n")
    for ca in (str(tmp_path / "absent.pem"), str(not_pem)):
        with pytest.raises(DeputyError, match="CA file"):
            Client("127.0.0.1:1", tls=ca)


def test_job_cancelled_gets_past_except_exception_in_a_handler(shared_server, clients):
    assert issubclass(JobCancelled, gevent.GreenletExit)
    assert not issubclass(JobCancelled, Exception)
    t = job_type()
    started, swallowed, escaped = gevent.event.Event(), [], []

    def careless(arg):
        try:
            try:
                started.set()
                gevent.sleep(WAIT)
            except Exception as error:       # a common catch-all: not for cancellation
                swallowed.append(error)
                return "swallowed"
        except BaseException as error:
            escaped.append(error)
            raise

    worker = clients(shared_server.address)
    worker.can_do({t: careless})
    submitter = clients(shared_server.address)
    job = submitter.do(t, 1)
    assert started.wait(WAIT)
    job.cancel()
    with pytest.raises(JobFailed, match="^cancelled$"):
        job.get(WAIT)
    wait_until(lambda: escaped, what="the handler killed")
    assert isinstance(escaped[0], JobCancelled) and swallowed == []


def test_close_kills_handlers_and_leaves_no_greenlet_parked(shared_server, clients):
    t = job_type()
    slots = []

    def stuck(arg):
        slots.append(greenlet.getcurrent())
        gevent.sleep(WAIT)

    worker = clients(shared_server.address)
    worker.can_do({t: stuck}, capacity=3)
    submitter = clients(shared_server.address)
    for n in range(3):
        submitter.do(t, n)
    wait_until(lambda: len(slots) == 3, what="three handlers running")
    worker.close()
    wait_until(lambda: all(slot.dead for slot in slots), what="the handlers' greenlets ended")
    assert worker.worker.idle_slots == []


def test_progress_with_data_that_is_not_json_raises_deputy_error(shared_server, clients):
    t = job_type()
    raised = []

    def reporting(arg):
        for data in ({1, 2}, float("nan"), 2 ** 70):
            try:
                progress(data)
            except DeputyError as error:
                raised.append(str(error))
        return "done"

    worker = clients(shared_server.address)
    worker.can_do({t: reporting})
    submitter = clients(shared_server.address)
    assert submitter.call(t, 1, timeout=WAIT) == "done"
    assert len(raised) == 3 and all(text.startswith("progress data is not JSON")
                                    for text in raised)


@pytest.mark.parametrize("capacity", [1, 4])
def test_capacity_n_runs_n_handlers_at_once_and_never_more(shared_server, clients, capacity):
    t = job_type()
    gate = gevent.event.Event()
    state = {"running": 0, "peak": 0}

    def held_at_gate(arg):
        state["running"] += 1
        state["peak"] = max(state["peak"], state["running"])
        gate.wait(WAIT)
        state["running"] -= 1
        return arg

    worker = clients(shared_server.address)
    if capacity == 1:
        worker.can_do({t: held_at_gate})          # the default capacity
    else:
        worker.can_do({t: held_at_gate}, capacity=capacity)
    submitter = clients(shared_server.address)
    jobs = [submitter.do(t, n) for n in range(capacity * 3)]
    wait_until(lambda: state["running"] == capacity, what="%d handlers running" % capacity)
    gevent.sleep(0.2)
    assert state["running"] == capacity
    gate.set()
    assert [job.get(WAIT) for job in jobs] == list(range(capacity * 3))
    assert state["peak"] == capacity


def test_handlers_that_block_each_run_in_a_greenlet_of_their_own(shared_server, clients):
    t = job_type()
    seen = []

    def where(arg):
        seen.append(gevent.getcurrent())
        gevent.sleep(0.01)
        return arg

    worker = clients(shared_server.address)
    worker.can_do({t: where}, capacity=3)
    submitter = clients(shared_server.address)
    submitter.map(t, range(3), timeout=WAIT)
    assert len(set(map(id, seen))) == 3
    assert gevent.getcurrent() not in seen


def test_quick_handlers_that_arrive_together_run_in_one_greenlet(shared_server, clients):
    """README: a handler that returns without blocking leaves its greenlet
    to the next job that is waiting, with no switch through the hub."""
    t = job_type()
    seen = set()

    def quick(arg):
        seen.add(id(greenlet.getcurrent()))
        return arg

    worker = clients(shared_server.address)
    worker.can_do({t: quick}, capacity=32)
    submitter = clients(shared_server.address)
    assert submitter.map(t, range(300), timeout=WAIT) == list(range(300))
    assert len(seen) == 1


@pytest.mark.parametrize("order", ["blocking first", "blocking after a quick one"])
def test_a_handler_that_blocks_does_not_hold_back_the_jobs_that_came_with_it(
        shared_server, clients, order):
    """The slot that runs quick jobs one after another may reach one that
    blocks: the jobs behind it still start, each in a slot of its own."""
    t = job_type()
    gate = gevent.event.Event()

    def handler(arg):
        if arg == "wait":
            return gate.wait(WAIT)          # False if the opener never ran
        if arg == "open":
            gate.set()
        return arg

    args = ["wait", "quick", "open"] if order == "blocking first" else ["quick", "wait", "open"]
    worker = clients(shared_server.address)
    worker.can_do({t: handler}, capacity=3)
    submitter = clients(shared_server.address)
    results = submitter.map(t, args, timeout=WAIT)
    assert results == [True if arg == "wait" else arg for arg in args]


def test_jobs_behind_a_handler_that_ended_the_program_still_run(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)
    worker.can_do({t: leave}, capacity=3)
    submitter = clients(shared_server.address)
    jobs = [submitter.do(t, arg) for arg in ("exit", "a", "b")]
    with pytest.raises(SystemExit, match="bye"):
        gevent.sleep(WAIT)
    with pytest.raises(JobFailed, match="^SystemExit: bye$"):
        jobs[0].get(WAIT)
    assert [job.get(WAIT) for job in jobs[1:]] == ["a", "b"]
    assert (worker.worker.held, worker.worker.running) == (0, 0)


def test_decorator_forms_of_can_do(shared_server, clients):
    t = job_type("shout")
    worker = clients(shared_server.address)

    @worker.can_do(t, capacity=2)
    def shout(arg):
        return arg.upper()

    @worker.can_do
    def whisper_for_test_decorator(arg):
        return arg.lower()

    assert shout("x") == "X"          # the decorator gives the function back
    submitter = clients(shared_server.address)
    assert submitter.call(t, "hi", timeout=WAIT) == "HI"
    assert submitter.call("whisper_for_test_decorator", "HO", timeout=WAIT) == "ho"


def test_can_do_checks_its_arguments(shared_server, clients):
    worker = clients(shared_server.address)
    with pytest.raises(DeputyError):
        worker.can_do({"t": "not callable"})
    with pytest.raises(DeputyError):
        worker.can_do({"t": len}, capacity=0)
    with pytest.raises(DeputyError):
        worker.can_do({"t": len}, capacity=True)
    with pytest.raises(DeputyError, match="capacity"):
        worker.can_do("t", len)         # len taken for the capacity: no silent decorator
    with pytest.raises(DeputyError, match="non-empty"):
        worker.can_do({"": len})
    with pytest.raises(DeputyError, match="non-empty"):
        worker.can_do("")
    with pytest.raises(DeputyError, match="2\\*\\*64"):
        worker.can_do({"t": len}, capacity=2 ** 64)     # the protocol carries 64 bits
    with pytest.raises(TypeError, match="type name: handler"):
        worker.can_do(["t", "u"])
    with pytest.raises(TypeError, match="type name: handler"):
        worker.can_do(["ab"])           # dict() would read "ab" as the pair a: b
    with pytest.raises(TypeError, match="type name: handler"):
        worker.can_do([("t", len)])     # pairs are no dict either
    assert worker.worker.handlers == {}


def test_a_refused_capacity_leaves_the_client_working(shared_server, clients):
    """Checked before it is kept: a capacity beyond 64 bits, found only when
    can_do was encoded, used to make every later connection fail."""
    t = job_type()
    worker = clients(shared_server.address)
    with pytest.raises(DeputyError):
        worker.can_do({t: str.upper}, capacity=2 ** 70)
    worker.can_do({t: str.upper}, capacity=2 ** 64 - 1)
    assert clients(shared_server.address).call(t, "ok", timeout=WAIT) == "OK"
    assert worker.metrics(timeout=WAIT)["workers"] >= 1


BAD_TIMEOUTS = [(float("nan"), DeputyError), (True, DeputyError), ("10", TypeError),
                ([1], TypeError)]
BAD_TIMEOUT_IDS = ["nan", "bool", "str", "list"]


@pytest.mark.parametrize("timeout, error", BAD_TIMEOUTS, ids=BAD_TIMEOUT_IDS)
def test_call_and_map_refuse_a_bad_timeout_before_sending_anything(shared_server, clients,
                                                                    timeout, error):
    t = job_type()
    client = clients(shared_server.address)
    with pytest.raises(error, match="timeout must be a number"):
        client.call(t, 1, timeout=timeout)
    with pytest.raises(error, match="timeout must be a number"):
        client.map(t, [1, 2], timeout=timeout)
    assert client.metrics(timeout=WAIT)["types"].get(t, {}).get("queued", 0) == 0


@pytest.mark.parametrize("timeout, error", BAD_TIMEOUTS, ids=BAD_TIMEOUT_IDS)
def test_get_and_metrics_refuse_a_bad_timeout_whether_or_not_the_job_is_done(
        shared_server, clients, timeout, error):
    """README: a TypeError for the wrong type, DeputyError for NaN or a
    boolean; a job already done is no excuse (the same call would fail on
    one still pending)."""
    t = job_type()
    worker = clients(shared_server.address)
    worker.can_do({t: str.upper})
    client = clients(shared_server.address)
    pending = client.do(job_type(), "nobody does this type")
    done = client.do(t, "a")
    assert done.get(timeout=WAIT) == "A"
    for job in (pending, done):
        with pytest.raises(error, match="timeout must be a number"):
            job.get(timeout=timeout)
    with pytest.raises(error, match="timeout must be a number"):
        client.metrics(timeout=timeout)


def test_metrics_without_a_timeout_waits_for_the_answer(shared_server, clients):
    assert clients(shared_server.address).metrics(timeout=None)["connections_open"] >= 1


def test_after_close_can_do_and_metrics_raise_client_closed_at_once(shared_server):
    client = Client(shared_server.address)
    client.can_do({job_type(): len})
    client.metrics(timeout=WAIT)
    client.close()
    started = time.monotonic()
    with pytest.raises(ClientClosed):
        client.metrics(timeout=WAIT)
    with pytest.raises(ClientClosed):
        client.can_do({job_type(): len})
    with pytest.raises(ClientClosed):
        client.can_do("t")
    assert time.monotonic() - started < 1
    client.work()                       # "until close() is called": it was


def test_get_with_a_nan_timeout_is_refused_not_a_wait_forever(clients):
    job = clients(("127.0.0.1", free_port())).do(job_type(), 1)
    with pytest.raises(DeputyError, match="nan"):
        job.get(timeout=float("nan"))
    with pytest.raises(DeputyError, match="True"):
        job.get(timeout=True)       # a boolean is no number of seconds


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no text for this one")


def test_a_handler_error_whose_text_cannot_be_had_still_fails_its_job(shared_server, clients):
    """Its __str__ raising too must not lose the slot: the job fails with
    the type's name and the worker (capacity 1) goes on."""
    t = job_type()

    def unprintable(arg):
        raise UnprintableError()

    worker = clients(shared_server.address)
    worker.can_do({t: unprintable, t + "-ok": lambda arg: arg})
    submitter = clients(shared_server.address)
    with pytest.raises(JobFailed) as failed:
        submitter.call(t, 1, timeout=WAIT)
    assert failed.value.error == "UnprintableError"
    assert submitter.call(t + "-ok", "next", timeout=WAIT) == "next"


def test_a_close_that_lands_inside_do_fails_that_job(shared_server, clients):
    """A plain signal.signal handler runs wherever the main greenlet is: a
    close() in the middle of do() must leave that job failed with
    ClientClosed, not pending on a closed connection forever."""
    client = clients(shared_server.address)
    wait_until(lambda: client.connections[0].live, what="connected")
    choose = client._choose

    def close_then_choose(job):
        client.close()
        return choose(job)

    client._choose = close_then_choose
    job = client.do(job_type(), 1)
    with pytest.raises(ClientClosed):
        job.get(WAIT)
    with pytest.raises(ClientClosed):
        client.do(job_type(), 2)


def test_a_handler_may_submit_jobs_itself(shared_server, clients):
    outer, inner = job_type("outer"), job_type("inner")
    worker = clients(shared_server.address)

    def plus_one(arg):
        return arg + 1

    def twice_plus_one(arg):
        return worker.call(inner, arg, timeout=WAIT) + worker.call(inner, arg, timeout=WAIT)

    worker.can_do({outer: twice_plus_one, inner: plus_one}, capacity=2)
    submitter = clients(shared_server.address)
    assert submitter.call(outer, 10, timeout=WAIT) == 22


def test_one_client_submits_and_works_on_one_connection(shared_server, clients):
    t = job_type()
    both = clients(shared_server.address)
    both.can_do({t: lambda arg: -arg}, capacity=4)
    assert both.map(t, range(50), timeout=WAIT) == [-n for n in range(50)]
    assert len(both.connections) == 1


def test_progress_outside_a_handler_is_an_error():
    with pytest.raises(DeputyError, match="outside a job handler"):
        progress(50)


def test_work_blocks_until_close(shared_server, clients):
    worker = clients(shared_server.address)
    with pytest.raises(DeputyError, match="can_do"):
        worker.work()
    worker.can_do({job_type(): len})
    working = gevent.spawn(worker.work)
    gevent.sleep(0.1)
    assert not working.dead
    worker.close()
    working.join(WAIT)
    assert working.successful()


def test_close_fails_unanswered_jobs_and_later_calls(shared_server):
    t = job_type()
    with Client(shared_server.address) as submitter:
        job = submitter.do(t, 1)
        gevent.sleep(0.05)
    assert submitter.closed
    with pytest.raises(ClientClosed):
        job.get(WAIT)
    with pytest.raises(ClientClosed):
        submitter.do(t, 2)
    submitter.close()                   # closing twice is harmless


def test_close_sends_what_was_submitted_just_before(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)
    worker.can_do({t: len})
    wait_until(lambda: worker.connections[0].live, what="worker connected")
    with Client(shared_server.address) as submitter:
        wait_until(lambda: submitter.connections[0].live, what="submitter connected")
        submitter.do(t, "sent before close", bg=True)
    observer = clients(shared_server.address)
    wait_until(lambda: observer.metrics()["types"].get(t, {}).get("queued", 1) == 0
               and observer.metrics()["jobs_added"] > 0, what="the job reached the server")


def test_a_bg_job_submitted_as_the_client_starts_is_sent_before_it_closes(start_server,
                                                                         clients):
    """Fire and forget, before the first connection is even up: close()
    waits for a server to send it to (SPEC 7: a bg job outlives its
    submitter)."""
    server = start_server()
    t = job_type()
    with Client(server.address) as submitter:
        submitter.do(t, "fire and forget", bg=True)
    observer = clients(server.address)
    assert observer.metrics()["types"][t]["queued"] == 1


def test_jobs_given_up_while_no_server_is_up_leave_nothing_behind(clients):
    """Cancelled and timed-out jobs do not pile up in the client while it
    waits for a server (a long outage must not grow its memory)."""
    client = clients("127.0.0.1:%d" % free_port())
    cancelled = [client.do("t", n) for n in range(50)]
    timed_out = [client.do("t", n, timeout=0.01) for n in range(50)]
    for job in cancelled:
        job.cancel()
    for job in cancelled + timed_out:
        with pytest.raises(JobFailed):
            job.get(WAIT)
    assert client._backlog == {}


def test_metrics_of_a_server_known_to_be_down_fail_at_once(clients):
    """README: metrics() raises DeputyError at once when no server can be
    reached, also after several reconnection attempts (when the next one
    is up to backoff_max away)."""
    client = clients("127.0.0.1:%d" % free_port(), backoff_max=30)
    client.backoff_initial = 20     # (read when its connection starts): the next
    wait_until(lambda: client.connections[0].last_error is not None,     # attempt is
               what="a failed attempt")                                  # 10-20 s away
    started = time.monotonic()
    with pytest.raises(DeputyError, match="no metrics: cannot reach 127.0.0.1.*refused"):
        client.metrics(timeout=5)
    assert time.monotonic() - started < 0.5


def test_metrics_of_a_server_back_during_a_long_back_off_are_had_at_once(start_server,
                                                                           clients):
    """metrics() asks a down server to try again now: one that came back
    answers, without waiting out the back-off."""
    port = free_port()
    client = clients("127.0.0.1:%d" % port, backoff_max=30)
    client.backoff_initial = 20
    wait_until(lambda: client.connections[0].last_error is not None, what="a failed attempt")
    start_server(port=port)
    started = time.monotonic()
    metrics = client.metrics(timeout=5)
    assert time.monotonic() - started < 2
    # (start_server's readiness probe may not have been seen to close yet)
    assert metrics["connections_open"] in (1, 2), metrics


def client_in_a_long_back_off(port):
    """A client of a server that is down, its next attempt 10-20 s away."""
    client = deputy_client.Client("127.0.0.1:%d" % port, backoff_max=30)
    client.backoff_initial = 20         # (read when its connection starts)
    wait_until(lambda: client.connections[0].last_error is not None, what="a failed attempt")
    return client


def test_a_bg_job_is_sent_by_close_after_an_outage_with_a_long_back_off(start_server,
                                                                         clients):
    port = free_port()
    t = job_type()
    client = client_in_a_long_back_off(port)
    client.do(t, "fire and forget", bg=True)
    server = start_server(port=port)
    client.close()
    assert clients(server.address).metrics()["types"][t]["queued"] == 1


def test_a_bg_job_is_sent_by_close_to_a_server_that_comes_up_while_it_waits(start_server,
                                                                            clients):
    """README: close() sends it if a server can be reached within 2 s; a
    down server is tried again and again meanwhile, not after its back-off
    (which is 10-20 s away here)."""
    port = free_port()
    t = job_type()
    client = client_in_a_long_back_off(port)
    client.do(t, "fire and forget", bg=True)
    servers = []
    starter = gevent.spawn_later(0.4, lambda: servers.append(start_server(port=port)))
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 2
    starter.join(WAIT)
    assert clients(servers[0].address).metrics()["types"][t]["queued"] == 1


def test_close_from_a_second_greenlet_while_the_first_waits_is_harmless(clients):
    client = deputy_client.Client("127.0.0.1:%d" % free_port())
    client.do("t", 1, bg=True)
    first = gevent.spawn(client.close)
    gevent.sleep(0.05)
    client.close()                      # returns: the first close is under way
    first.join(WAIT)
    assert client.closed and first.successful()
    with pytest.raises(ClientClosed):
        client.do("t", 2)


def test_an_interrupted_close_still_closes(clients):
    client = deputy_client.Client("127.0.0.1:%d" % free_port())
    client.do("t", 1, bg=True)
    with gevent.Timeout(0.1, False):
        client.close()                  # cut short while it waits for a server
    assert client.closed
    with pytest.raises(ClientClosed):
        client.do("t", 2)


def test_metrics(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)
    worker.can_do({t: len})
    worker.call(t, "four", timeout=WAIT)
    metrics = worker.metrics()
    for key in ("up_since", "connections", "connections_open", "workers", "jobs_added",
                "jobs_dispatched", "jobs_done", "jobs_failed", "jobs_reassigned",
                "jobs_abandoned", "jobs_queued", "jobs_running", "types"):
        assert key in metrics
    assert metrics["types"][t]["workers"] == 1
    assert "servers" not in metrics


def test_metrics_of_an_unreachable_server_fail_at_once_with_the_reason(clients):
    lonely = clients(("127.0.0.1", free_port()))
    with pytest.raises(DeputyError, match="cannot reach 127.0.0.1:.*refused") as raised:
        lonely.metrics(timeout=WAIT)
    assert not isinstance(raised.value, Timeout)


def test_metrics_time_out_when_the_server_does_not_answer(clients):
    with socket.socket() as silent:                 # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = clients(silent.getsockname())
        with pytest.raises(Timeout, match="no metrics from .* within 0.3 s"):
            client.metrics(timeout=0.3)


def test_lines_the_client_cannot_use_are_logged_and_skipped(clients, caplog):
    received = []

    def scripted_server(sock, address):
        for line in sock.makefile("rb"):
            received.append(line)
            sock.sendall(b'not json\r\n[1, 2]\r\n{"cmd": "did", "id": [1]}\r\n'
                         b'{"cmd": "nonsense"}\r\n{"no": "cmd"}\r\n\r\n'
                         b'{"cmd": "metrics", "metrics": {"jobs_added": 7}}\r\n')

    server = gevent.server.StreamServer(("127.0.0.1", 0), scripted_server)
    server.start()
    try:
        client = clients(("127.0.0.1", server.server_port))
        assert client.metrics(timeout=WAIT) == {"jobs_added": 7}
        assert client.metrics(timeout=WAIT) == {"jobs_added": 7}
    finally:
        server.stop()
    assert received == [b'{"cmd":"metrics"}\r\n'] * 2
    complaints = [r.getMessage() for r in caplog.records if "cannot use" in r.getMessage()]
    assert len(complaints) == 8          # the did for no job of ours is not worth a warning
    for what in ("JSONDecodeError", "TypeError", "KeyError: 'nonsense'", "KeyError: 'cmd'"):
        assert sum(what in complaint for complaint in complaints) == 2


# -- surviving the network -------------------------------------------------------

def test_calls_made_before_the_server_is_up_go_out_when_it_is(start_server, clients):
    port = free_port()
    t = job_type()
    worker = clients(("127.0.0.1", port))
    worker.can_do({t: lambda arg: arg * 3})
    submitter = clients(("127.0.0.1", port))
    jobs = [submitter.do(t, n) for n in range(5)]
    gevent.sleep(0.2)
    assert not any(job.ready() for job in jobs)
    start_server(port=port)
    assert [job.get(WAIT) for job in jobs] == [0, 3, 6, 9, 12]


def test_a_server_that_hangs_up_at_once_is_retried_with_backoff(clients):
    accepted = []

    def hang_up(sock, address):
        accepted.append(address)
        sock.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), hang_up)
    server.start()
    try:
        client = clients(("127.0.0.1", server.server_port))
        job = client.do("t", 1)
        gevent.sleep(1.0)
    finally:
        server.stop()
    # 0.05 s doubling: a handful of attempts in a second, not a busy loop.
    assert 3 <= len(accepted) <= 12
    assert not job.ready()


def test_close_from_inside_a_handler(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)
    stopped = gevent.event.Event()

    def last_job(arg):
        worker.close()
        stopped.set()
        return arg

    worker.can_do({t: last_job})
    working = gevent.spawn(worker.work)
    submitter = clients(shared_server.address)
    submitter.do(t, 1)
    assert stopped.wait(WAIT)
    working.join(WAIT)
    assert working.successful() and worker.closed


WORKER_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, %r)
    import gevent
    from deputy_client import Client

    client = Client(sys.argv[1])

    def stuck(arg):
        print("started", arg, flush=True)
        gevent.sleep(60)

    client.can_do({sys.argv[2]: stuck})
    client.work()
""" % ROOT)


def test_a_worker_killed_mid_job_its_job_finishes_elsewhere(server, clients):
    t = job_type()
    doomed = gevent.subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, server.address, t],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        submitter = clients(server.address)
        job = submitter.do(t, "precious")
        with gevent.Timeout(WAIT):
            assert doomed.stdout.readline() == "started precious\n"
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(WAIT)
    finally:
        if doomed.poll() is None:
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait(WAIT)
        doomed.stdout.close()
    rescuer = clients(server.address)
    rescuer.can_do({t: lambda arg: "rescued " + arg})
    assert job.get(WAIT) == "rescued precious"
    assert submitter.metrics()["jobs_reassigned"] == 1


def test_a_job_held_when_the_connection_drops_is_killed_and_done_again(start_server, clients):
    server = start_server()
    t = job_type()
    attempts, cancellations = [], []

    def stuck_the_first_time(arg):
        attempts.append(arg)
        if len(attempts) == 1:
            try:
                gevent.sleep(WAIT)
            except JobCancelled as cancelled:
                cancellations.append(str(cancelled))
                raise
        return "attempt %d" % len(attempts)

    worker = clients(server.address)
    worker.can_do({t: stuck_the_first_time})
    submitter = clients(server.address)
    job = submitter.do(t, "x")
    wait_until(lambda: attempts, what="the first attempt")
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(WAIT)
    wait_until(lambda: cancellations, what="the handler killed")
    assert "connection to %s lost" % server.address in cancellations[0]
    start_server(port=server.port)
    assert job.get(WAIT) == "attempt 2"


def test_server_killed_and_restarted_mid_batch_every_job_gets_one_result(
        start_server, clients, caplog):
    caplog.set_level(logging.DEBUG, logger="deputy_client")
    server = start_server()
    t = job_type()
    runs = {}

    def tenfold(arg):
        runs[arg] = runs.get(arg, 0) + 1
        gevent.sleep(0.002)
        return arg * 10

    worker = clients(server.address)
    worker.can_do({t: tenfold}, capacity=8)
    submitter = clients(server.address)
    jobs = [submitter.do(t, n) for n in range(400)]
    wait_until(lambda: sum(job.ready() for job in jobs) >= 50, what="50 results")
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(WAIT)
    # Once the client has seen the end of the stream, every result the
    # server sent before dying has been read: the rest must be resubmitted.
    wait_until(lambda: not submitter.connections[0].connected, what="the loss noticed")
    finished_before = sum(job.ready() for job in jobs)
    assert finished_before < 400, "the server should die mid-batch"
    submitted_while_down = [submitter.do(t, n) for n in range(400, 450)]
    restarted = start_server(port=server.port)
    jobs += submitted_while_down
    assert [job.get(WAIT) for job in jobs] == [n * 10 for n in range(450)]
    assert set(runs) == set(range(450))
    observer = restarted.connect()
    try:
        assert observer.metrics()["jobs_added"] == 450 - finished_before
    finally:
        observer.close()
    assert not [r for r in caplog.records if "no pending job" in r.getMessage()]
    assert [r for r in caplog.records if "lost connection" in r.getMessage()]


MONKEY_SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import sys, threading, time
    sys.path.insert(0, %r)
    from deputy_client import Client

    address, job_type = sys.argv[1], sys.argv[2]

    def square(arg):
        time.sleep(0.01)            # patched: yields to the other threads
        return arg * arg

    worker = Client(address)
    worker.can_do({job_type: square}, capacity=4)
    threading.Thread(target=worker.work, daemon=True).start()
    results = {}

    def submit(n):
        with Client(address) as client:
            results[n] = client.call(job_type, n, timeout=10)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    worker.close()
    print(sorted(results.items()))
""" % ROOT)


def test_works_in_a_script_that_called_monkey_patch_all(shared_server):
    done = subprocess.run([sys.executable, "-c", MONKEY_SCRIPT, shared_server.address, job_type()],
                          capture_output=True, text=True, timeout=WAIT * 2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([(n, n * n) for n in range(8)])
