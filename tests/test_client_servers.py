"""One client over several servers (SPEC section 9, issue 7), and servers
going away: killed, restarted, draining."""
import os
import signal
import socket
import time

import gevent
import gevent.event
import orjson
import pytest

pytest_plugins = ["test_client_helpers"]    # the clients and shared_server fixtures

from test_client_helpers import WAIT, job_type, run_cli, wait_until
from deputy_client import JobFailed


@pytest.fixture
def three_servers(start_server):
    return [start_server() for _ in range(3)]


def addresses(servers):
    return [server.address for server in servers]


def all_live(client):
    wait_until(lambda: all(conn.live for conn in client.connections),
               what="every server connected")
    return client


class CapacityWatch:
    """A handler that counts how many of its calls run at once."""

    def __init__(self, seconds=0.002):
        self.running = self.peak = 0
        self.seconds = seconds

    def __call__(self, arg):
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            gevent.sleep(self.seconds)
        finally:
            self.running -= 1
        return arg * 2


def server_figure(server, name):
    """One figure of a server's metrics, asked over a raw connection."""
    conn = server.connect()
    try:
        return conn.metrics()[name]
    finally:
        conn.close()


def jobs_added(server):
    return server_figure(server, "jobs_added")


def test_jobs_submitted_as_a_client_starts_are_spread_over_every_server(three_servers,
                                                                          clients):
    """SPEC 9, "in turn": also the jobs a new client submits before its
    connections are up (they wait until every server has been tried)."""
    t = job_type()
    before = [jobs_added(server) for server in three_servers]
    submitter = clients(addresses(three_servers))
    jobs = [submitter.do(t, n, bg=True) for n in range(30)]
    for job in jobs:
        job.get(WAIT)
    added = [jobs_added(server) - was for server, was in zip(three_servers, before)]
    assert added == [10, 10, 10]


def test_a_new_client_spreads_its_first_jobs_though_the_hub_was_kept_from_running(
        three_servers, clients):
    """A script that blocked the hub before making its client (an unpatched
    time.sleep here) left the event loop's clock behind: counted from it,
    the start-up wait for every server would be over before it began, and
    every job would go to whichever server connected first."""
    t = job_type()
    before = [jobs_added(server) for server in three_servers]
    gevent.sleep(0.05)
    time.sleep(1.5)                         # > STARTUP_GRACE, blocking the hub
    submitter = clients(addresses(three_servers))
    for job in [submitter.do(t, n, bg=True) for n in range(30)]:
        job.get(WAIT)
    added = [jobs_added(server) - was for server, was in zip(three_servers, before)]
    assert added == [10, 10, 10]


def test_a_server_that_does_not_answer_delays_a_new_clients_jobs_only_a_moment(
        start_server, clients):
    """Start-up waits for every server to be tried, but once one is up the
    others get 0.1 s more, not the whole second: a host that accepts and
    never answers (its auth reply never comes) does not hold the jobs up."""
    secret = "s3cret"
    good = start_server("--secret", secret)
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)                      # the kernel accepts; nobody answers
    try:
        t = job_type()
        worker = clients(good.address, secret=secret)
        worker.can_do({t: len})
        wait_until(lambda: worker.connections[0].live, what="worker connected")
        submitter = clients([good.address, "127.0.0.1:%d" % mute.getsockname()[1]],
                            secret=secret)
        started = time.monotonic()
        assert submitter.do(t, "abc", timeout=0.8).get(WAIT) == 3
        assert time.monotonic() - started < 0.6
    finally:
        mute.close()


def test_a_new_client_hashes_unique_keys_like_one_already_connected(three_servers, clients):
    """SPEC 9, "a consistent hash of unique": a key goes to the same
    server from every client, also from one that has just started, so the
    two submissions coalesce."""
    t = job_type()
    old = all_live(clients(addresses(three_servers)))
    old_jobs = [old.do(t, n, unique="key-%d" % n) for n in range(30)]
    wait_until(lambda: sum(jobs_added(server) for server in three_servers) >= 30,
               what="the first client's jobs queued")
    new = clients(addresses(three_servers))
    new_jobs = [new.do(t, n, unique="key-%d" % n) for n in range(30)]
    wait_until(lambda: sum(server_figure(server, "jobs_coalesced") for server in three_servers) == 30,
               what="every key of the new client joined the old client's job")
    for job in old_jobs + new_jobs:
        job.cancel()


def test_jobs_go_round_robin_over_live_servers(three_servers, clients):
    t = job_type()
    worker = all_live(clients(addresses(three_servers)))
    worker.can_do({t: CapacityWatch()}, capacity=4)
    submitter = all_live(clients(addresses(three_servers)))
    assert submitter.map(t, range(300), timeout=WAIT) == [n * 2 for n in range(300)]
    assert [jobs_added(server) for server in three_servers] == [100, 100, 100]


def test_a_unique_key_goes_to_the_same_server_from_every_client(three_servers, clients):
    t = job_type()
    first = all_live(clients(addresses(three_servers)))
    second = all_live(clients(list(reversed(addresses(three_servers)))))
    keys = ["key-%d" % n for n in range(30)]
    jobs = [first.do(t, key, unique=key) for key in keys]
    wait_until(lambda: first.metrics()["jobs_queued"] == 30, what="30 jobs queued")
    jobs += [second.do(t, "joins " + key, unique=key) for key in keys]
    wait_until(lambda: first.metrics()["jobs_coalesced"] == 30, what="every key joined")
    per_server = [jobs_added(server) for server in three_servers]
    assert sum(per_server) == 60 and all(count > 0 for count in per_server)
    worker = clients(addresses(three_servers))
    worker.can_do({t: lambda arg: arg}, capacity=8)
    assert [job.get(WAIT) for job in jobs] == keys + keys


def test_worker_capacity_is_shared_across_servers(three_servers, clients):
    t = job_type()
    watches = [CapacityWatch(0.005), CapacityWatch(0.005)]
    for watch in watches:
        worker = all_live(clients(addresses(three_servers)))
        worker.can_do({t: watch}, capacity=3)
    submitter = all_live(clients(addresses(three_servers)))
    assert submitter.map(t, range(300), timeout=WAIT * 2) == [n * 2 for n in range(300)]
    assert [watch.peak for watch in watches] == [3, 3]


def test_a_full_worker_tells_every_server_cant_do_until_a_slot_frees(three_servers, clients):
    """Capacity shared over servers: while its one slot is busy the worker
    is nobody's idle worker (no job offered only to be given back), and
    says can_do again once the slot frees."""
    t = job_type()
    worker = all_live(clients(addresses(three_servers)))
    started, gate = gevent.event.Event(), gevent.event.Event()

    def gated(arg):
        started.set()
        gate.wait(WAIT)
        return arg
    worker.can_do({t: gated}, capacity=1)

    def workers_per_server():
        servers = worker.metrics()["servers"].values()
        return [server["types"].get(t, {}).get("workers", 0) for server in servers]
    wait_until(lambda: workers_per_server() == [1, 1, 1], what="can_do on every server")
    submitter = all_live(clients(addresses(three_servers)))
    job = submitter.do(t, "x")
    assert started.wait(WAIT)
    wait_until(lambda: workers_per_server() == [0, 0, 0], what="cant_do on every server")
    gate.set()
    assert job.get(WAIT) == "x"
    wait_until(lambda: workers_per_server() == [1, 1, 1], what="can_do again")


def type_figure(server, job_type, name):
    types = server_figure(server, "types")
    return types.get(job_type, {}).get(name, 0)


def full_of_one_servers_jobs(clients, one, other, t):
    """A worker of capacity 4 on servers one and other, holding four jobs
    of one's, each waiting for its gate (gates: by arg, as each starts),
    and told other cant_do. -> (gates, the four jobs)."""
    gates = {}

    def gated(arg):
        gate = gates[arg] = gevent.event.Event()
        gate.wait(WAIT)
        return arg
    worker = all_live(clients(addresses([one, other])))
    worker.can_do({t: gated}, capacity=4)
    firsts = [all_live(clients(one.address)).do(t, "one-%d" % n) for n in range(4)]
    wait_until(lambda: len(gates) == 4, what="four jobs in hand")
    wait_until(lambda: type_figure(other, t, "workers") == 0, what="cant_do while full")
    return gates, firsts


def test_a_slot_freed_after_a_full_spell_is_offered_not_the_whole_capacity(
        three_servers, clients):
    """Full with four jobs from one server, a slot frees: each server is
    offered what it holds plus that one slot, so the other server, with
    twenty jobs queued, hands out one, not four of which three go back."""
    t = job_type()
    one, other = three_servers[:2]
    gates, firsts = full_of_one_servers_jobs(clients, one, other, t)
    seconds = [all_live(clients(other.address)).do(t, "other-%d" % n) for n in range(20)]
    wait_until(lambda: type_figure(other, t, "queued") == 20, what="twenty queued")
    gates["one-0"].set()
    assert firsts[0].get(WAIT) == "one-0"
    wait_until(lambda: len(gates) == 5, what="the free slot taken")
    gevent.sleep(0.2)
    assert server_figure(other, "jobs_released") == 0
    assert type_figure(other, t, "running") == 1 and type_figure(other, t, "queued") == 19
    for gate in list(gates.values()):
        gate.set()
    for job in firsts + seconds:
        job.cancel()


def test_a_server_that_uses_up_a_small_offer_is_offered_the_free_slots(
        three_servers, clients):
    """After a full spell the other server was offered one slot; once every
    slot is free again, its first job brings it an offer of the rest, so
    the worker runs four of its jobs at once, not one at a time."""
    t = job_type()
    one, other = three_servers[:2]
    gates, firsts = full_of_one_servers_jobs(clients, one, other, t)
    for n, job in enumerate(firsts):
        gates["one-%d" % n].set()
        assert job.get(WAIT) == "one-%d" % n
    wait_until(lambda: type_figure(other, t, "idle") == 1, what="an offer after the full spell")
    seconds = [all_live(clients(other.address)).do(t, "other-%d" % n) for n in range(6)]
    wait_until(lambda: sum(name.startswith("other") for name in gates) == 4,
               what="four of the other server's jobs at once")
    gevent.sleep(0.2)
    assert sum(name.startswith("other") for name in gates) == 4
    assert server_figure(other, "jobs_released") == 0
    for job in seconds:
        job.cancel()
    for gate in list(gates.values()):
        gate.set()


def test_a_worker_that_lowers_its_capacity_below_what_it_holds_is_offered_nothing(
        three_servers, clients):
    """Full after lowering its capacity, with a job finishing: no server
    may offer it a job only to have it given back, again and again."""
    t = job_type()
    gates, done = [], []

    def gated(arg):
        gate = gevent.event.Event()
        gates.append(gate)
        gate.wait(WAIT)
        done.append(arg)
        return arg
    worker = all_live(clients(addresses(three_servers)))
    worker.can_do({t: gated}, capacity=3)
    submitter = all_live(clients(three_servers[0].address))
    jobs = [submitter.do(t, n) for n in range(6)]
    wait_until(lambda: len(gates) == 3, what="three jobs in hand")
    worker.can_do({t: gated}, capacity=1)
    gates[0].set()
    wait_until(lambda: len(done) == 1, what="one job done")
    gevent.sleep(0.3)
    assert server_figure(three_servers[0], "jobs_released") <= 2
    for gate in gates:
        gate.set()
    for job in jobs:
        job.cancel()


def test_a_lost_server_jobs_go_to_the_others_and_it_takes_jobs_again_when_back(
        three_servers, clients, start_server):
    t = job_type()
    watches = [CapacityWatch(0.003), CapacityWatch(0.003)]
    for watch in watches:
        all_live(clients(addresses(three_servers))).can_do({t: watch}, capacity=3)
    submitter = all_live(clients(addresses(three_servers)))
    jobs = [submitter.do(t, n) for n in range(600)]
    wait_until(lambda: sum(job.ready() for job in jobs) >= 100, what="100 results")
    doomed = three_servers[1]
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(WAIT)
    assert sum(job.ready() for job in jobs) < 600, "the server should die mid-batch"
    # Its unanswered jobs go to the two others at once: no waiting for it.
    assert [job.get(WAIT) for job in jobs] == [n * 2 for n in range(600)]
    restarted = start_server(port=doomed.port)
    wait_until(lambda: all(conn.live for conn in submitter.connections), what="reconnected")
    assert submitter.map(t, range(90), timeout=WAIT) == [n * 2 for n in range(90)]
    assert jobs_added(restarted) == 30
    assert max(watch.peak for watch in watches) <= 3


def test_metrics_add_up_all_servers_and_show_each(three_servers, clients):
    t = job_type()
    submitter = all_live(clients(addresses(three_servers)))
    for n in range(6):
        submitter.do(t, n)
    wait_until(lambda: submitter.metrics()["jobs_queued"] == 6, what="6 jobs queued")
    metrics = submitter.metrics()
    assert sorted(metrics["servers"]) == sorted(addresses(three_servers))
    each = list(metrics["servers"].values())
    assert [m["jobs_added"] for m in each] == [2, 2, 2]
    assert metrics["jobs_added"] == 6
    assert metrics["types"][t]["queued"] == 6
    assert metrics["connections_open"] == sum(m["connections_open"] for m in each)
    assert metrics["up_since"] == min(m["up_since"] for m in each)


def test_metrics_show_a_server_that_does_not_answer(three_servers, clients):
    submitter = all_live(clients(addresses(three_servers)))
    three_servers[2].stop()
    wait_until(lambda: not submitter.connections[2].live, what="the server gone")
    metrics = submitter.metrics(timeout=0.5)
    assert metrics["servers"][three_servers[2].address] is None
    assert metrics["connections_open"] == sum(
        m["connections_open"] for m in metrics["servers"].values() if m)


def test_cli_status_and_metrics_over_several_servers(three_servers, clients):
    t = job_type("multi")
    submitter = all_live(clients(addresses(three_servers)))
    for n in range(3):
        submitter.do(t, n)
    wait_until(lambda: submitter.metrics()["jobs_queued"] == 3, what="3 jobs queued")
    flags = [word for server in three_servers for word in ("-a", server.address)]
    status = run_cli(*flags, "status")
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()]
    assert rows[0] == ["SERVER", "TYPE", "QUEUED", "RUNNING", "WORKERS", "IDLE"]
    for server in three_servers:
        assert [server.address, t, "1", "0", "0", "0"] in rows
    assert ["all", t, "3", "0", "0", "0"] in rows
    metrics = run_cli(*flags, "metrics")
    assert metrics.returncode == 0, metrics.stderr
    shown = orjson.loads(metrics.stdout)
    assert shown["jobs_added"] == 3 and len(shown["servers"]) == 3


# -- draining --------------------------------------------------------------------

def gated_worker(clients, server_addresses, t):
    """A worker whose handler waits for a gate; -> (started, gate)."""
    started, gate = gevent.event.Event(), gevent.event.Event()

    def gated(arg):
        started.set()
        gate.wait(WAIT)
        return arg

    worker = all_live(clients(server_addresses))
    worker.can_do({t: gated}, capacity=4)
    return started, gate


def test_jobs_refused_by_a_draining_server_go_to_another(start_server, clients):
    servers = [start_server(), start_server()]
    t = job_type()
    submitter = all_live(clients(addresses(servers)))
    started, gate = gated_worker(clients, addresses(servers), t)
    in_flight = submitter.do(t, "in flight")            # round robin: the second server
    assert started.wait(WAIT)
    draining = next(s for s in servers if s.address == in_flight._conn.label)
    draining.signal(signal.SIGTERM)
    gevent.sleep(0.2)
    later = [submitter.do(t, n) for n in range(6)]
    wait_until(lambda: sum(job._conn is not None and job._conn.label != draining.address
                           for job in later) == 6, what="every later job on the other server")
    gate.set()
    assert in_flight.get(WAIT) == "in flight"
    assert [job.get(WAIT) for job in later] == list(range(6))
    assert draining.wait(WAIT) == 0


def the_only_server_draining(start_server, clients):
    """A server draining (SIGTERM) while a gated job keeps it alive; ->
    (server, submitter, job type, the job in flight, its gate)."""
    server = start_server()
    t = job_type()
    submitter = all_live(clients(server.address))
    started, gate = gated_worker(clients, server.address, t)
    in_flight = submitter.do(t, "in flight")
    assert started.wait(WAIT)
    server.signal(signal.SIGTERM)
    gevent.sleep(0.2)
    return server, submitter, t, in_flight, gate


def test_a_job_refused_while_the_only_server_drains_goes_to_its_successor(start_server, clients):
    server, submitter, t, in_flight, gate = the_only_server_draining(start_server, clients)
    refused = submitter.do(t, "refused while draining")
    gevent.sleep(0.2)
    assert not refused.ready()
    gate.set()
    assert in_flight.get(WAIT) == "in flight"
    assert server.wait(WAIT) == 0
    start_server(port=server.port)
    assert refused.get(WAIT) == "refused while draining"


def test_a_successor_started_while_the_old_server_drains_gets_the_refused_job_once_it_exits(
        start_server, clients):
    """README: one connection per address, so the successor waits for the
    old server's exit (this pins that; the client gives it all the jobs
    then, the queued as well as the refused)."""
    server, submitter, t, in_flight, gate = the_only_server_draining(start_server, clients)
    refused = submitter.do(t, "refused while draining")
    successor = start_server(port=server.port)      # the old listener is closed by now
    gevent.sleep(0.5)
    assert not refused.ready() and successor.proc.poll() is None
    gate.set()
    assert in_flight.get(WAIT) == "in flight"
    assert server.wait(WAIT) == 0
    assert refused.get(WAIT) == "refused while draining"


def test_a_job_cancelled_before_the_draining_refusal_came_back_is_not_sent_again(
        start_server, clients):
    """do and cancel go out together; the server refuses the do as
    "draining" and knows nothing to cancel: the job fails as cancelled
    there and then, it does not run on the server's successor."""
    server, submitter, t, in_flight, gate = the_only_server_draining(start_server, clients)
    unwanted = submitter.do(t, "unwanted")
    assert unwanted.cancel() is True
    with pytest.raises(JobFailed, match="^cancelled$"):
        unwanted.get(WAIT)
    gate.set()
    assert in_flight.get(WAIT) == "in flight"
    assert server.wait(WAIT) == 0
    successor = start_server(port=server.port)
    assert submitter.call(t, "after", timeout=WAIT) == "after"
    assert server_figure(successor, "jobs_added") == 1      # "after" only


def test_close_waits_for_unresponsive_servers_at_once_not_one_after_another(
        three_servers, clients):
    """Three stopped servers, each writer blocked on a full socket: close()
    gives up on them together, after about 2 s, not 2 s each."""
    client = all_live(clients(addresses(three_servers)))
    for server in three_servers:
        server.signal(signal.SIGSTOP)
    try:
        for n in range(30000):
            client.do("nobody", "x" * 2000)
        gevent.sleep(0.5)
        started = time.monotonic()
        client.close()
        took = time.monotonic() - started
    finally:
        for server in three_servers:
            server.signal(signal.SIGCONT)
    assert took < 3.5, "close() took %.1f s" % took
