"""Job control through the client (SPEC section 7, issue 5's client side):
priority, bg, unique, ttr, timeout, cancel, progress, and the CLI flags."""
import logging
import os
import socket
import sys
import textwrap
import time

import gevent
import gevent.event
import pytest

from test_client_helpers import (
    WAIT, free_port, job_type, run_cli, start_cli, stop_process, wait_until)
import deputy_client
from deputy_client import DeputyError, JobCancelled, JobFailed, Timeout, progress

pytest_plugins = ["test_client_helpers"]    # the clients and shared_server fixtures


def queued(client, t):
    return client.metrics()["types"].get(t, {}).get("queued", 0)


def recording_worker(clients, server, t, order, capacity=1):
    worker = clients(server.address)

    def record(arg):
        order.append(arg)
        return arg

    worker.can_do({t: record}, capacity=capacity)
    return worker


def test_higher_priority_is_handed_out_first_fifo_within_one(shared_server, clients):
    t = job_type()
    submitter = clients(shared_server.address)
    jobs = [submitter.do(t, "low-1", priority=-1), submitter.do(t, "zero-1"),
            submitter.do(t, "high-1", priority=5), submitter.do(t, "zero-2", priority=0),
            submitter.do(t, "high-2", priority=5), submitter.do(t, "low-2", priority=-1)]
    wait_until(lambda: queued(submitter, t) == 6)
    order = []
    recording_worker(clients, shared_server, t, order)
    for job in jobs:
        job.get(WAIT)
    assert order == ["high-1", "high-2", "zero-1", "zero-2", "low-1", "low-2"]


def test_a_bg_job_resolves_when_queued_and_outlives_its_submitter(shared_server, clients):
    t = job_type()
    submitter = clients(shared_server.address)
    job = submitter.do(t, "in the background", bg=True)
    assert job.get(WAIT) is None               # no worker exists yet: this was "queued"
    assert job.successful()
    submitter.close()
    order = []
    recording_worker(clients, shared_server, t, order)
    wait_until(lambda: order == ["in the background"], what="the bg job done")


def test_unique_jobs_coalesce_into_one_run(shared_server, clients):
    t = job_type()
    first, second = clients(shared_server.address), clients(shared_server.address)
    job_a = first.do(t, "first arg stands", unique="key-1")
    wait_until(lambda: queued(first, t) == 1)
    job_b = second.do(t, "joins", unique="key-1")
    job_c = second.do(t, "another key", unique="key-2")
    wait_until(lambda: queued(first, t) == 2)
    order = []
    recording_worker(clients, shared_server, t, order)
    assert job_a.get(WAIT) == job_b.get(WAIT) == "first arg stands"
    assert job_c.get(WAIT) == "another key"
    assert sorted(order) == ["another key", "first arg stands"]


def test_a_job_past_its_ttr_is_taken_back_its_handler_killed_and_it_runs_again(
        shared_server, clients, caplog):
    caplog.set_level(logging.DEBUG, logger="deputy_client")
    t = job_type()
    attempts, cancellations = [], []

    def stuck_the_first_time(arg):
        attempts.append(arg)
        if len(attempts) == 1:
            try:
                gevent.sleep(WAIT)
            except JobCancelled as cancelled:
                cancellations.append(str(cancelled))
                return "too late"          # discarded: the job is no longer held
        return "attempt %d" % len(attempts)

    worker = clients(shared_server.address)
    worker.can_do({t: stuck_the_first_time})
    submitter = clients(shared_server.address)
    assert submitter.call(t, "x", ttr=0.3, timeout=WAIT) == "attempt 2"
    assert len(cancellations) == 1 and "cancelled by" in cancellations[0]
    assert not [r for r in caplog.records if "refused a message" in r.getMessage()]


def test_a_timeout_fails_a_job_nobody_did_in_time(shared_server, clients):
    t = job_type()
    submitter = clients(shared_server.address)
    job = submitter.do(t, "never done", timeout=0.2)
    with pytest.raises(JobFailed) as failed:
        job.get(WAIT)
    assert failed.value.error == "timeout"


def test_a_timeout_kills_the_running_handler(shared_server, clients):
    t = job_type()
    killed = gevent.event.Event()

    def slow(arg):
        try:
            gevent.sleep(WAIT)
        except JobCancelled:
            killed.set()
            raise

    worker = clients(shared_server.address)
    worker.can_do({t: slow})
    submitter = clients(shared_server.address)
    with pytest.raises(JobFailed, match="^timeout$"):
        submitter.do(t, 1, timeout=0.3).get(WAIT)
    assert killed.wait(WAIT)


def test_a_timeout_holds_even_when_no_server_can_be_reached(clients):
    """No server holds the job: nothing can answer for it, so it fails at
    its deadline, not a grace period later."""
    submitter = clients(("127.0.0.1", free_port()))
    started = time.monotonic()
    job = submitter.do("t", 1, timeout=0.1)
    with pytest.raises(JobFailed, match="^timeout$"):
        job.get(WAIT)
    assert time.monotonic() - started < 0.1 + deputy_client.TIMEOUT_GRACE / 2
    with pytest.raises(DeputyError, match="timeout must be a positive number"):
        submitter.do("t", 1, timeout=0)


def test_a_job_a_server_holds_waits_a_grace_period_for_its_answer(clients):
    """The server's answer counts (a result may be on its way): a job sent
    to a server that says nothing fails only TIMEOUT_GRACE past its deadline."""
    with socket.socket() as silent:                 # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        submitter = clients(silent.getsockname())
        started = time.monotonic()
        job = submitter.do("t", 1, timeout=0.1)
        with pytest.raises(JobFailed, match="^timeout$"):
            job.get(WAIT)
        assert time.monotonic() - started >= 0.1 + deputy_client.TIMEOUT_GRACE - 0.02


def test_a_timeout_counts_from_do_even_after_the_hub_was_kept_from_running(clients):
    """A script that blocked the hub (CPU work, an unpatched time.sleep)
    left the event loop's clock behind: a timer started from it would end
    the job's timeout at once."""
    submitter = clients(("127.0.0.1", free_port()))     # unreachable: the client's own deadline
    gevent.sleep(0.05)
    time.sleep(1.5)                                      # blocks the hub
    started = time.monotonic()
    job = submitter.do("t", 1, timeout=0.3)
    with pytest.raises(JobFailed, match="^timeout$"):
        job.get(WAIT)
    assert time.monotonic() - started >= 0.3 - 0.02


def test_cancel_a_queued_job(shared_server, clients):
    t = job_type()
    submitter = clients(shared_server.address)
    job = submitter.do(t, "unwanted")
    wait_until(lambda: queued(submitter, t) == 1)
    assert job.cancel() is True
    with pytest.raises(JobFailed) as failed:
        job.get(WAIT)
    assert failed.value.error == "cancelled"
    assert queued(submitter, t) == 0
    assert job.cancel() is False


def test_cancel_a_running_job_kills_its_handler(shared_server, clients):
    t = job_type()
    started, killed = gevent.event.Event(), []

    def slow(arg):
        started.set()
        try:
            gevent.sleep(WAIT)
        except JobCancelled as cancelled:
            killed.append(cancelled)
            raise
        return "finished"

    worker = clients(shared_server.address)
    worker.can_do({t: slow})
    submitter = clients(shared_server.address)
    job = submitter.do(t, 1)
    assert started.wait(WAIT)
    job.cancel()
    with pytest.raises(JobFailed, match="^cancelled$"):
        job.get(WAIT)
    wait_until(lambda: killed, what="the handler killed")
    assert isinstance(killed[0], JobCancelled)
    # The worker's slot is free again.
    worker.can_do({t + "-next": lambda arg: arg})
    assert submitter.call(t + "-next", "next", timeout=WAIT) == "next"


def test_cancel_before_the_job_was_sent_needs_no_server(clients):
    submitter = clients(("127.0.0.1", free_port()))
    job = submitter.do("t", 1)
    assert job.cancel() is True
    with pytest.raises(JobFailed, match="^cancelled$"):
        job.get(0.1)


def test_call_cancels_its_job_when_it_times_out(shared_server, clients):
    t = job_type()
    submitter = clients(shared_server.address)
    with pytest.raises(Timeout):
        submitter.call(t, 1, timeout=0.2)
    wait_until(lambda: queued(submitter, t) == 0, what="the job cancelled")


def test_progress_reaches_the_submitter(shared_server, clients):
    t = job_type()
    gate = gevent.event.Event()

    def reporting(arg):
        progress(10)
        progress({"percent": 50})
        gate.wait(WAIT)
        return "done"

    worker = clients(shared_server.address)
    worker.can_do({t: reporting})
    submitter = clients(shared_server.address)
    seen = []
    job = submitter.do(t, 1, on_progress=lambda job, data: seen.append((job, data)))
    wait_until(lambda: len(seen) == 2, what="two progress reports")
    assert seen == [(job, 10), (job, {"percent": 50})]
    assert job.progress == {"percent": 50}
    gate.set()
    assert job.get(WAIT) == "done"


def test_a_failing_progress_callback_does_not_break_the_client(shared_server, clients, caplog):
    t = job_type()

    def reporting(arg):
        progress(1)
        return "done"

    worker = clients(shared_server.address)
    worker.can_do({t: reporting})
    submitter = clients(shared_server.address)
    job = submitter.do(t, 1)
    job.on_progress = lambda job, data: 1 / 0
    assert job.get(WAIT) == "done"
    assert job.progress == 1
    assert any("on_progress callback" in r.getMessage() for r in caplog.records)


def test_a_progress_callback_that_raises_a_timeout_does_not_end_the_connection(
        shared_server, clients, caplog):
    """A gevent.Timeout is no Exception; escaping the reader greenlet it
    would end the connection for good, and every later job would hang."""
    t = job_type()

    def reporting(arg):
        progress(1)
        return arg

    worker = clients(shared_server.address)
    worker.can_do({t: reporting})
    submitter = clients(shared_server.address)

    def raise_timeout(job, data):
        raise gevent.Timeout(0)

    assert submitter.do(t, 1, on_progress=raise_timeout).get(WAIT) == 1
    assert submitter.call(t, 2, timeout=WAIT) == 2
    assert any("on_progress callback" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("options, says", [
    (dict(ttr=-1), "ttr"), (dict(ttr=0), "ttr"), (dict(ttr="5"), "ttr"), (dict(ttr=True), "ttr"),
    (dict(timeout=0), "timeout"), (dict(timeout=True), "timeout"),
    (dict(priority=1.5), "priority"), (dict(priority=True), "priority"),
    (dict(priority=False), "priority"), (dict(priority=2 ** 64), "priority"),
    (dict(priority=-2 ** 63 - 1), "priority"), (dict(bg=1), "bg"), (dict(bg="yes"), "bg"),
    (dict(unique=5), "unique"), (dict(type=""), "type"), (dict(type=12345), "type"),
])
def test_a_bad_option_is_refused_at_the_call(shared_server, clients, options, says):
    """As the server would refuse it, but at do(): nothing is sent, and the
    mistake shows where it was made, not at get()."""
    submitter = clients(shared_server.address)
    job_args = dict(type=job_type(), arg=1)
    job_args.update(options)
    with pytest.raises(DeputyError, match=says):
        submitter.do(job_args.pop("type"), **job_args)
    assert submitter.metrics(timeout=WAIT)["jobs_added"] >= 0      # the client still works
    assert submitter._backlog == {} and all(not c.pending for c in submitter.connections)


def test_the_edges_of_each_option_are_sent(shared_server, clients):
    t = job_type()
    worker = clients(shared_server.address)
    worker.can_do({t: lambda arg: arg})
    submitter = clients(shared_server.address)
    for options in (dict(priority=2 ** 64 - 1), dict(priority=-2 ** 63), dict(bg=False),
                    dict(unique=""), dict(ttr=1e-3 + 30), dict(timeout=30)):
        assert submitter.do(t, 7, **options).get(WAIT) == 7


# -- the command line ----------------------------------------------------------

def test_cli_do_bg_returns_once_queued_and_prints_nothing(shared_server, clients):
    t = job_type()
    done = run_cli("-a", shared_server.address, "do", t, "later", "--bg")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    observer = clients(shared_server.address)
    assert queued(observer, t) == 1


def test_cli_do_timeout(shared_server):
    done = run_cli("-a", shared_server.address, "do", job_type(), "x", "--timeout", "0.3")
    assert done.returncode == 1
    assert done.stderr == "deputy-client: timeout\n"


def test_cli_do_priority_unique_and_ttr(shared_server, clients):
    t = job_type()
    submitter = clients(shared_server.address)
    low = [submitter.do(t, "low"), submitter.do(t, "coalesced", unique="k")]
    wait_until(lambda: queued(submitter, t) == 2)
    coalesced_before = submitter.metrics()["jobs_coalesced"]
    urgent = start_cli("-a", shared_server.address, "do", t, "urgent", "--priority", "9",
                       "--ttr", "5", stdout=gevent.subprocess.PIPE, text=True)
    joining = start_cli("-a", shared_server.address, "do", t, "ignored", "--unique", "k",
                        stdout=gevent.subprocess.PIPE, text=True)
    try:
        wait_until(lambda: queued(submitter, t) == 3, what="urgent queued")
        wait_until(lambda: submitter.metrics()["jobs_coalesced"] == coalesced_before + 1,
                   what="the unique job joined")
        order = []
        recording_worker(clients, shared_server, t, order)
        assert [job.get(WAIT) for job in low] == ["low", "coalesced"]
        assert urgent.communicate(timeout=WAIT)[0] == '"urgent"\n'
        assert joining.communicate(timeout=WAIT)[0] == '"coalesced"\n'
        assert order == ["urgent", "low", "coalesced"]
    finally:
        stop_process(urgent)
        stop_process(joining)


SLEEPY_COMMAND = textwrap.dedent("""
    import os, sys, time
    with open(sys.argv[1], "w") as pid_file:
        pid_file.write(str(os.getpid()))
    time.sleep(30)
""")


def test_cli_work_kills_the_command_of_a_cancelled_job(shared_server, clients, tmp_path):
    t = job_type()
    pid_file = tmp_path / "pid"
    worker = start_cli("-a", shared_server.address, "work", t, "--",
                       sys.executable, "-c", SLEEPY_COMMAND, str(pid_file))
    try:
        submitter = clients(shared_server.address)
        job = submitter.do(t, 1)
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), what="the command started")
        pid = int(pid_file.read_text())
        job.cancel()
        with pytest.raises(JobFailed, match="^cancelled$"):
            job.get(WAIT)
        wait_until(lambda: not process_exists(pid), what="the command killed")
    finally:
        stop_process(worker)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False
