"""Shared fixtures: real server processes on free loopback ports, and a raw
JSON-lines connection with a timeout on every read."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import orjson
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "deputy_server.py")
READ_TIMEOUT = 5.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `python deputy_server.py` child process, stopped by the fixture."""

    def __init__(self, *args, port=None, env=None, wait=True):
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.address = "%s:%d" % (self.host, self.port)
        self.stderr_file = tempfile.TemporaryFile()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.argv = [sys.executable, SERVER, "-p", str(self.port)] + list(args)
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=self.stderr_file,
            stdin=subprocess.DEVNULL, env=full_env, cwd=ROOT,
            start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited %s: %s" % (self.proc.returncode, self.stderr()))
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("server did not start: " + self.stderr())

    def stderr(self):
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")

    def connect(self, **kw):
        return RawConn((self.host, self.port), **kw)

    def signal(self, signum):
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout=10.0):
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.stderr_file.close()


class RawConn:
    """A plain blocking socket speaking JSON lines; every read times out."""

    def __init__(self, address, timeout=READ_TIMEOUT):
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) if not isinstance(address, str) else None
        self.timeout = timeout
        self.buf = b""

    def send(self, *messages):
        self.sock.sendall(b"".join(orjson.dumps(m) + b"\r\n" for m in messages))

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv_line(self, timeout=None):
        self.sock.settimeout(timeout or self.timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def recv(self, timeout=None):
        line = self.recv_line(timeout)
        assert line.endswith(b"\r"), "server lines end in CR LF: %r" % line
        return orjson.loads(line)

    def recv_n(self, n, timeout=None):
        return [self.recv(timeout) for _ in range(n)]

    def expect(self, cmd, timeout=None, **fields):
        msg = self.recv(timeout)
        assert msg.get("cmd") == cmd, "expected %s, got %r" % (cmd, msg)
        for key, value in fields.items():
            assert msg.get(key) == value, "expected %s=%r in %r" % (key, value, msg)
        return msg

    def nothing_within(self, seconds=0.2):
        """True when the server sends nothing for `seconds`."""
        if self.buf:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return True
        if chunk:
            self.buf += chunk
        return False

    def is_closed(self, timeout=None):
        """True when the server closes this connection (after any pending data)."""
        self.sock.settimeout(timeout or self.timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def metrics(self):
        self.send({"cmd": "metrics"})
        return self.expect("metrics")["metrics"]

    def close(self):
        self.sock.close()


@pytest.fixture
def start_server():
    """Factory: start_server('--max-attempts', '2') -> a running ServerProcess."""
    started = []

    def start(*args, **kw):
        server = ServerProcess(*args, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server):
    return start_server()


@pytest.fixture
def connect(server):
    """Factory of raw connections to the default server, all closed after."""
    conns = []

    def make(**kw):
        conn = server.connect(**kw)
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        conn.close()


@pytest.fixture(scope="module")
def shared():
    """One server for a test module's tests that do not need clean metrics
    (each uses types of its own); stopped after the module."""
    srv = ServerProcess()
    yield srv
    srv.stop()
