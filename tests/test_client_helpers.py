"""Helpers for the client library tests (tests/test_client*.py): clients
that are always closed, a shared server per module, waiting with a bound,
and running `python deputy_client.py` as a user would. No tests here."""
import itertools
import os
import sys
import time

import gevent
import gevent.subprocess as subprocess
import pytest

from conftest import ROOT, ServerProcess, free_port  # noqa: F401

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import deputy_client  # noqa: E402

CLIENT = os.path.join(ROOT, "deputy_client.py")
WAIT = 10.0          # seconds any one wait in these tests may take
_type_numbers = itertools.count(1)


def job_type(name="t"):
    """A job type no other test uses, so tests can share one server."""
    return "%s-%d-%d" % (name, os.getpid(), next(_type_numbers))


def wait_until(condition, timeout=WAIT, what="condition"):
    """Poll `condition` (letting gevent run) until it is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %s s waiting for %s" % (timeout, what))
        gevent.sleep(0.005)


@pytest.fixture
def clients():
    """Factory: clients("127.0.0.1:PORT", ...) -> Client, closed after the test."""
    made = []

    def make(address, **kw):
        client = deputy_client.Client(address, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def shared_server():
    """One server for a module's tests that use distinct job types."""
    server = ServerProcess()
    yield server
    server.stop()


def run_cli(*args, input=None, timeout=WAIT, env=None):
    """Run `python deputy_client.py ARGS`; -> CompletedProcess (text).
    gevent's subprocess, so clients in this process keep working meanwhile."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.pop("DEPUTY_SECRET", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, CLIENT] + list(args), input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def start_cli(*args, env=None, **popen_kw):
    """Start `python deputy_client.py ARGS` in the background (caller stops it)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.pop("DEPUTY_SECRET", None)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, CLIENT] + list(args), env=full_env, cwd=ROOT,
                            start_new_session=True, **popen_kw)


def stop_process(process):
    if process.poll() is None:
        process.kill()
    process.wait(WAIT)
