"""SPEC section 4, black box: the server program, its options, listeners,
errors and signals."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from rawhelpers import (
    wait_unix_ready, RawConn, did, do, free_port, roundtrip_ok,
    sync_quiet, take_job, unix_path, wait_for, wait_metrics, worker)
from rawhelpers import warm_server  # noqa: F401 (the `server` fixture, from a warm spare)
from conftest import ROOT, SERVER


def run_server(*args, timeout=3, cwd=ROOT, script=SERVER):
    """Run the server for options that must make it exit; fail if it keeps
    running instead. Gets a free port unless -p is among args."""
    args = list(args)
    if "-p" not in args and "--help" not in args and "--version" not in args:
        args = ["-p", str(free_port())] + args
    proc = subprocess.Popen([sys.executable, script] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("the server kept running with %r; stderr: %r" % (args, err))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_clear_line(proc):
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, "should fail: rc=0, stderr %r" % err
    assert "Traceback" not in err, err
    lines = [text for text in err.splitlines() if text.strip()]
    assert len(lines) == 1, "one clear line on stderr, got %r" % err
    assert len(lines[0]) > 10


def can_connect(host, port, timeout=0.5):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# -- listening -----------------------------------------------------------------

def test_listens_on_loopback_only_by_default(server):
    assert can_connect("127.0.0.1", server.port)
    # Bound to 0.0.0.0 or :: it would answer on 127.0.0.2 too.
    assert not can_connect("127.0.0.2", server.port), "listens beyond 127.0.0.1"
    for addr in other_addresses():
        assert not can_connect(addr, server.port), "listens on %s" % addr


def other_addresses():
    found = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
            if not addr.startswith("127."):
                found.append(addr)
    except OSError:
        pass
    return found


def test_default_port_is_11746():
    if can_connect("127.0.0.1", 11746):
        pytest.skip("port 11746 is taken on this machine")
    proc = subprocess.Popen([sys.executable, SERVER], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: can_connect("127.0.0.1", 11746) or proc.poll() is not None, 10)
        assert proc.poll() is None, proc.stderr.read()
        c = RawConn(("127.0.0.1", 11746))
        sync_quiet(c)
        c.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0


def test_h_sets_the_listen_address(start_server):
    srv = start_server("-h", "127.0.0.2", wait=False)
    wait_for(lambda: can_connect("127.0.0.2", srv.port) or srv.proc.poll() is not None, 10)
    assert srv.proc.poll() is None, srv.stderr()
    assert not can_connect("127.0.0.1", srv.port)
    c = RawConn(("127.0.0.2", srv.port))
    sync_quiet(c)
    c.close()


def test_tcp_and_unix_socket_share_one_broker(start_server, tmp_path):
    path = unix_path(tmp_path)
    srv = start_server("-s", path)
    wait_unix_ready(path)
    assert os.path.exists(path)
    w = worker(srv, "t", address=path)          # worker on the UNIX socket
    s = srv.connect()                           # submitter on TCP
    s.send(do("x", "t", {"via": "tcp"}))
    job = take_job(w, "t")
    assert job["arg"] == {"via": "tcp"}
    w.send(did(job["id"], res="via unix"))
    s.expect("did", id="x", res="via unix")
    # And the other way round.
    w2 = worker(srv, "u")
    s2 = RawConn(path)
    s2.send(do(1, "u", 1))
    j = take_job(w2, "u")
    w2.send(did(j["id"], res=2))
    s2.expect("did", id=1, res=2)
    m = wait_metrics(s2, lambda m: m["connections_open"] == 4)
    assert m["workers"] == 2
    assert roundtrip_ok(srv, address=path)


# -- help, version, bad options -------------------------------------------------

def test_help():
    proc = run_server("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    for word in ("-h", "-p", "-s", "-v", "--max-line", "--max-attempts", "--metrics-interval"):
        assert word in out, "--help does not mention %s" % word
    assert "Traceback" not in proc.stderr.decode()


def test_version():
    proc = run_server("--version")
    assert proc.returncode == 0, proc.stderr
    text = (proc.stdout + proc.stderr).decode().strip()
    assert text and any(ch.isdigit() for ch in text), text
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["-x"],
    ["-p"],
    ["-p", "notaport"],
    ["-p", "70000"],
    ["-p", "-5"],
    ["-p", "\u0663"],              # an Arabic-Indic 3: int() would take it
    ["--max-line", "1_000"],
    ["--http", "8_080"],
    ["--ttr", "\u0661.5"],
    ["--max-line", "lots"],
    ["--max-line", "-1"],
    ["--max-attempts", "many"],
    ["--metrics-interval", "often"],
    ["-h", "not an address!"],
    ["extra-positional-argument"],
    ["-h", ""],                 # not "every interface"
    ["-s", ""],
    ["--ttr", ""],
    ["--http", ""],
    ["--http", "::1"],              # an IPv6 address without its port
    ["--secret-file", ""],
    ["--auth-timeout", "soon"],
    ["--auth-timeout", "-1"],
    ["--auth-timeout", "nan"],
], ids=lambda a: " ".join(a) or "none")
def test_bad_option_gives_one_clear_line(args):
    proc = run_server(*args)
    assert_one_clear_line(proc)


def test_a_bad_auth_timeout_says_what_it_must_be():
    proc = run_server("--auth-timeout", "-1")
    assert b"--auth-timeout must be a number >= 0, not '-1'" in proc.stderr


def test_port_in_use(start_server):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        proc = run_server("-p", str(port))
        assert_one_clear_line(proc)
        assert str(port) in proc.stderr.decode(), "say which port"
    finally:
        blocker.close()


def test_port_in_use_by_another_deputy(server):
    proc = run_server("-p", str(server.port))
    assert_one_clear_line(proc)
    assert roundtrip_ok(server), "the running server is unharmed"


@pytest.mark.parametrize("where", ["missing-dir", "too-long", "is-a-directory"])
def test_unwritable_socket_path(tmp_path, where):
    if where == "missing-dir":
        path = str(tmp_path / "no" / "such" / "dir" / "x.sock")
    elif where == "too-long":
        path = str(tmp_path / ("x" * 200 + ".sock"))
    else:
        path = str(tmp_path / "adir")
        os.mkdir(path)
    proc = run_server("-s", path)
    assert_one_clear_line(proc)
    if where == "is-a-directory":
        assert os.path.isdir(path), "the server must not remove a directory"


def test_regular_file_at_socket_path_is_not_destroyed(tmp_path):
    path = unix_path(tmp_path, "precious.txt")
    with open(path, "w") as f:
        f.write("user data")
    proc = subprocess.Popen([sys.executable, SERVER, "-p", str(free_port()), "-s", path],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        proc.wait(5)
        pytest.fail("the server replaced a regular file with its socket")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr.read().decode()
    with open(path) as f:
        assert f.read() == "user data"


def test_stale_socket_file_is_replaced(start_server, tmp_path):
    path = unix_path(tmp_path)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()                     # the file stays, nobody listens
    assert os.path.exists(path)
    srv = start_server("-s", path)
    wait_unix_ready(path)
    assert roundtrip_ok(srv, address=path)


def test_live_socket_is_not_stolen(start_server, tmp_path):
    path = unix_path(tmp_path)
    first = start_server("-s", path)
    wait_unix_ready(path)
    c = RawConn(path)
    before = sync_quiet(c)
    proc = run_server("-s", path)
    assert_one_clear_line(proc)
    assert os.path.exists(path)
    # The path still leads to the first server.
    c2 = RawConn(path)
    m = sync_quiet(c2)
    assert m["up_since"] == before["up_since"]
    assert m["connections"] > before["connections"]
    assert roundtrip_ok(first, address=path)
    c.close()
    c2.close()


# -- signals ---------------------------------------------------------------------

def test_sigint_exits_zero_and_removes_socket(start_server, tmp_path):
    path = unix_path(tmp_path)
    srv = start_server("-s", path)
    wait_unix_ready(path)
    # With work in flight: SIGINT does not wait for it.
    w = worker(srv, "t")
    s = srv.connect()
    s.send(do(1, "t"), do(2, "t"))
    take_job(w, "t")
    t0 = time.monotonic()
    srv.signal(signal.SIGINT)
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 2, "SIGINT stops it at once"
    assert not os.path.exists(path), "the socket file is removed"
    assert "Traceback" not in srv.stderr()
    assert not can_connect("127.0.0.1", srv.port)


def test_sigterm_with_nothing_in_flight_exits_at_once(start_server, tmp_path):
    path = unix_path(tmp_path)
    srv = start_server("-s", path)
    wait_unix_ready(path)
    idle_worker = worker(srv, "t")
    c = srv.connect()
    sync_quiet(c)
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait(5) == 0
    assert time.monotonic() - t0 < 2, "nothing in flight: exits at once"
    assert not os.path.exists(path)
    assert "Traceback" not in srv.stderr()
    idle_worker.close()


def test_runs_as_python_file_copied_elsewhere(tmp_path):
    copy = tmp_path / "deputy_server.py"
    shutil.copy(SERVER, copy)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(copy), "-p", str(port)], cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: can_connect("127.0.0.1", port) or proc.poll() is not None, 10)
        assert proc.poll() is None, proc.stderr.read()
        c = RawConn(("127.0.0.1", port))
        c.send({"cmd": "can_do", "types": ["t"]}, do(1, "t", "hi"))
        job = take_job(c, "t")
        c.send(did(job["id"], res="there"))
        c.expect("did", id=1, res="there")
        c.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0


def test_installed_console_script():
    exe = shutil.which("deputy-server")
    if exe is None:
        pytest.skip("deputy-server is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--version"], capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    port = free_port()
    p = subprocess.Popen([exe, "-p", str(port)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: can_connect("127.0.0.1", port) or p.poll() is not None, 10)
        assert p.poll() is None, p.stderr.read().decode(errors="replace")
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(5) == 0
        p.stderr.close()
