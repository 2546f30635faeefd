"""The client's side of operations (SPEC section 8, issue 6): the secret,
TLS verified against a CA the tests make, and errors that retrying cannot
fix surfacing instead of hanging."""
import logging
import ssl
import time

import gevent
import pytest
import trustme

import deputy_client
from conftest import free_port
from test_client_helpers import WAIT, job_type, run_cli, wait_until
from deputy_client import AuthError, DeputyError

pytest_plugins = ["test_client_helpers"]    # the clients and shared_server fixtures

SECRET = "correct horse battery staple"


@pytest.fixture
def secret_server(start_server):
    return start_server("--secret", SECRET)


def test_the_secret_opens_the_server(secret_server, clients):
    t = job_type()
    worker = clients(secret_server.address, secret=SECRET)
    worker.can_do({t: lambda arg: arg + "!"})
    submitter = clients(secret_server.address, secret=SECRET)
    assert submitter.call(t, "in", timeout=WAIT) == "in!"
    assert submitter.metrics()["workers"] == 1


def test_the_secret_from_the_environment(secret_server, clients, monkeypatch):
    monkeypatch.setenv("DEPUTY_SECRET", SECRET)
    client = clients(secret_server.address)
    assert "jobs_added" in client.metrics()


def test_a_wrong_secret_fails_jobs_and_metrics_instead_of_hanging(secret_server, clients, caplog):
    client = clients(secret_server.address, secret="wrong")
    job = client.do(job_type(), 1)
    with pytest.raises(AuthError, match="refused the secret: authentication failed"):
        job.get(WAIT)
    with pytest.raises(AuthError):
        client.metrics()
    with pytest.raises(AuthError):
        client.do(job_type(), 2).get(WAIT)
    assert any(r.levelno == logging.ERROR and "giving up" in r.getMessage()
               for r in caplog.records)
    assert not any("wrong" in r.getMessage() for r in caplog.records)


def test_a_server_given_up_on_answers_metrics_at_once_as_none(secret_server, shared_server,
                                                               clients):
    """It will never answer: metrics() does not wait its timeout out for it,
    every time, but reports it as None beside the servers that answered."""
    client = clients([shared_server.address, secret_server.address], secret="wrong")
    wait_until(lambda: all(c.tried for c in client.connections), what="both servers tried")
    for _ in range(2):
        started = time.monotonic()
        got = client.metrics(timeout=3)
        assert time.monotonic() - started < 1.5
        assert got["servers"][secret_server.address] is None
        assert got["servers"][shared_server.address]["connections_open"] >= 1


def test_metrics_from_servers_down_or_given_up_is_a_deputy_error_at_once(secret_server, clients):
    down = "127.0.0.1:%d" % free_port()
    client = clients([down, secret_server.address], secret="wrong")
    wait_until(lambda: all(c.tried for c in client.connections), what="both servers tried")
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(DeputyError) as failed:
            client.metrics(timeout=3)
        assert not isinstance(failed.value, deputy_client.Timeout)
        assert time.monotonic() - started < 1.5
        assert "refused the secret" in str(failed.value) and down in str(failed.value)


def test_no_secret_for_a_server_that_wants_one_fails_clearly(secret_server, clients):
    client = clients(secret_server.address)
    job = client.do(job_type(), 1)
    with pytest.raises(AuthError, match="authentication required.*DEPUTY_SECRET"):
        job.get(WAIT)


def test_work_raises_the_error_once_every_server_gave_up(secret_server, clients):
    worker = clients(secret_server.address, secret="wrong")
    worker.can_do({job_type(): len})
    working = gevent.spawn(worker.work)
    working.join(WAIT)
    assert working.dead, "work() still waiting on a client no server will take"
    with pytest.raises(AuthError, match="refused the secret"):
        working.get()
    with pytest.raises(AuthError):
        worker.work()                        # at once, when called afterwards


def test_cli_work_with_a_refused_secret_exits_with_one_line(secret_server):
    for env in ({"DEPUTY_SECRET": "nope"}, {}):
        done = run_cli("-a", secret_server.address, "work", job_type(), "--", "cat", env=env)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert "refused the secret" in done.stderr or "authentication required" in done.stderr


def test_cli_secret_from_a_file_and_from_the_environment(secret_server, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("  %s\n" % SECRET)
    from_file = run_cli("-a", secret_server.address, "--secret-file", str(secret_file), "metrics")
    assert from_file.returncode == 0, from_file.stderr
    from_env = run_cli("-a", secret_server.address, "metrics", env={"DEPUTY_SECRET": SECRET})
    assert from_env.returncode == 0, from_env.stderr
    refused = run_cli("-a", secret_server.address, "metrics", env={"DEPUTY_SECRET": "nope"})
    assert refused.returncode == 1
    assert "refused the secret" in refused.stderr and "nope" not in refused.stderr
    missing = run_cli("-a", secret_server.address, "--secret-file", str(tmp_path / "none"),
                      "metrics")
    assert missing.returncode == 2 and "cannot read the secret file" in missing.stderr


# -- TLS -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate_authority():
    return trustme.CA()


@pytest.fixture
def tls_files(certificate_authority, tmp_path):
    cert = certificate_authority.issue_cert("127.0.0.1")
    paths = {name: str(tmp_path / name) for name in ("ca.pem", "cert.pem", "key.pem")}
    certificate_authority.cert_pem.write_to_path(paths["ca.pem"])
    cert.cert_chain_pems[0].write_to_path(paths["cert.pem"])
    cert.private_key_pem.write_to_path(paths["key.pem"])
    return paths


@pytest.fixture
def tls_server(start_server, tls_files):
    return start_server("--tls-cert", tls_files["cert.pem"], "--tls-key", tls_files["key.pem"])


def test_tls_verified_against_a_ca_file(tls_server, tls_files, clients):
    t = job_type()
    worker = clients(tls_server.address, tls=tls_files["ca.pem"])
    worker.can_do({t: lambda arg: arg * 2})
    submitter = clients(tls_server.address, tls=tls_files["ca.pem"])
    assert submitter.map(t, range(100), timeout=WAIT) == [n * 2 for n in range(100)]


def test_tls_with_an_ssl_context(tls_server, tls_files, clients):
    context = ssl.create_default_context(cafile=tls_files["ca.pem"])
    client = clients(tls_server.address, tls=context)
    assert "jobs_added" in client.metrics()


def test_tls_refuses_a_server_it_cannot_verify(tls_server, clients):
    client = clients(tls_server.address, tls=True)       # the system's CAs: not ours
    job = client.do(job_type(), 1)
    with pytest.raises(DeputyError, match="certificate verify failed"):
        job.get(WAIT)


def test_tls_and_the_secret_together(start_server, tls_files, clients):
    server = start_server("--tls-cert", tls_files["cert.pem"], "--tls-key", tls_files["key.pem"],
                          "--secret", SECRET)
    client = clients(server.address, tls=tls_files["ca.pem"], secret=SECRET)
    assert "jobs_added" in client.metrics()


def test_cli_tls(tls_server, tls_files):
    verified = run_cli("-a", tls_server.address, "--tls-ca", tls_files["ca.pem"], "metrics")
    assert verified.returncode == 0, verified.stderr
    unverified = run_cli("-a", tls_server.address, "--tls", "metrics")
    assert unverified.returncode == 1
    assert "certificate verify failed" in unverified.stderr


def test_tls_option_is_checked(clients):
    with pytest.raises(DeputyError, match="tls must be"):
        clients("127.0.0.1:1", tls=42)
