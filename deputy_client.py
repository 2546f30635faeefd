"""Deputy client: submit jobs to Deputy job servers, and do them, from gevent.

One file, one class. A `Client` holds a connection to each server it is
given; it can submit jobs and do jobs over the same connections::

    from deputy_client import Client

    with Client("127.0.0.1:11746") as client:
        job = client.do("resize", {"path": "a.png", "width": 100})
        print(job.get(timeout=10))            # the worker's result

    worker = Client("127.0.0.1:11746")

    @worker.can_do("resize", capacity=4)      # up to 4 jobs at once
    def resize(arg):
        return {"resized": arg["path"]}

    worker.work()                             # until worker.close()

It works in gevent programs and in scripts that called
`gevent.monkey.patch_all()`. Submitting never waits for a round trip; lost
connections are re-made with backoff and the jobs that had no result yet
are submitted again (at-least-once). From the shell::

    deputy-client do resize '{"path": "a.png"}'
    deputy-client work resize --capacity 4 -- ./resize.sh
    deputy-client status --watch

(`python deputy_client.py --help` lists every command.) The wire protocol,
JSON lines, is in the project's README.rst; this module speaks only that
and does not import deputy_server.
"""
import bisect
import collections
import collections.abc
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import socket as _stdlib_socket
import ssl
import sys
import time

import docopt
import gevent
import gevent.event
import gevent.socket
import gevent.ssl
import gevent.subprocess
import greenlet
import orjson

__version__ = "0.1.0"

DEFAULT_PORT = 11746
DEFAULT_ADDRESS = "127.0.0.1:%d" % DEFAULT_PORT
CONNECT_TIMEOUT = 5.0        # seconds for connect, TLS handshake and auth
BACKOFF_INITIAL = 0.05       # seconds before the first reconnection attempt
BACKOFF_MAX = 2.0            # reconnection delays double up to this
CLOSE_FLUSH_TIMEOUT = 2.0    # seconds close() waits for unsent output
METRICS_TIMEOUT = 5.0
TIMEOUT_GRACE = 1.0          # seconds past a job's timeout before the client fails it itself
STARTUP_GRACE = 1.0          # seconds a new client with several servers keeps its first jobs
                             # while it connects to each, so they are spread over all,
STARTUP_AFTER_FIRST = 0.1    # and at most this long once one of them is up
RECV_SIZE = 128 * 1024         # bigger buffers cost glibc an mmap+munmap per read
MAX_LINE = 1048576           # bytes: the server's default --max-line
LONGEST_SECONDS = 24         # bytes: the longest JSON of a float >= 0.001 (a timeout left)
HASH_POINTS = 64             # points per server on the consistent-hash ring
CRLF = b"\r\n"
METRICS_LINE = b'{"cmd":"metrics"}\r\n'

log = logging.getLogger("deputy_client")
loads = orjson.loads
dumps = orjson.dumps


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class DeputyError(Exception):
    """Base of every error this module raises."""


class JobFailed(DeputyError):
    """The job failed: `.error` is the text the worker (or server) sent.

    A handler may also raise JobFailed("text") to fail its job with exactly
    that text, without the "ExceptionType: " prefix other exceptions get.
    """

    def __init__(self, error, job=None):
        DeputyError.__init__(self, error)
        self.error = error
        self.job = job


class JobRefused(JobFailed):
    """The server refused the job (an `error` message carrying its id)."""


class Timeout(gevent.Timeout, DeputyError, TimeoutError):
    """A wait ran out of time. Also a `gevent.Timeout`, and the built-in
    `TimeoutError` (which concurrent.futures.TimeoutError and
    asyncio.TimeoutError are, from Python 3.11), so an OSError."""

    def __init__(self, message):
        gevent.Timeout.__init__(self, None)
        self.message = message

    def __str__(self):
        return self.message


class JobCancelled(gevent.GreenletExit):
    """Raised inside a handler whose job the server took back: cancelled
    by its submitter, timed out, past its ttr, or its connection was lost.
    The job's result would be discarded, so the handler's greenlet is
    killed with this. A GreenletExit, so gevent does not report it, and
    so a BaseException but not an Exception (nor a DeputyError): an
    `except Exception:` in a handler does not swallow it."""


class ClientClosed(DeputyError):
    """The client was closed before the job had its result."""


class AuthError(DeputyError):
    """The server refused this client's secret."""


# ---------------------------------------------------------------------------
# Addresses and framing
# ---------------------------------------------------------------------------

class Address:
    """Where a server listens: TCP host and port, or a UNIX socket path."""

    __slots__ = ("host", "port", "path", "label")

    def __init__(self, host=None, port=None, path=None):
        self.host, self.port, self.path = host, port, path
        if path is not None:
            self.label = "unix:" + path
        elif ":" in host:
            self.label = "[%s]:%d" % (host, port)
        else:
            self.label = "%s:%d" % (host, port)

    def __repr__(self):
        return "Address(%r)" % self.label


def parse_address(address):
    """'host:port', 'host', '[v6]:port', (host, port) or 'unix:/path'."""
    if isinstance(address, Address):
        return address
    if isinstance(address, tuple) and len(address) == 2:
        return Address(str(address[0]), parse_port(address[1], address))
    if not isinstance(address, str) or not address:
        raise DeputyError("bad server address %r" % (address,))
    if address.startswith("unix:"):
        if len(address) == 5:
            raise DeputyError("bad server address %r: no socket path" % (address,))
        return Address(path=address[5:])
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise DeputyError("bad server address %r: want [IPv6]:port" % (address,))
        port = rest[1:] if rest else DEFAULT_PORT
        return Address(host, parse_port(port, address))
    host, colon, port = address.rpartition(":")
    if ":" in host or (colon and not host):
        raise DeputyError("bad server address %r: want host:port (an IPv6 address in "
                          "brackets: [::1]:%d)" % (address, DEFAULT_PORT))
    if not colon:
        return Address(address, DEFAULT_PORT)
    return Address(host, parse_port(port, address))


def parse_port(port, address):
    try:
        number = plain_number(int, port)
    except (TypeError, ValueError):
        number = 0
    if not 0 < number < 65536:
        raise DeputyError("bad port in server address %r" % (address,))
    return number


def plain_number(kind, text):
    """kind(text) for the digits a user types: Python's int() and float()
    also take other scripts' digits ("٣" is 3) and underscores. (An int
    given as a port is taken as it is.)"""
    if isinstance(text, str) and (not text.isascii() or "_" in text):
        raise ValueError(text)
    return kind(text)


def parse_addresses(address):
    """One address or a list of them -> list of Address, duplicates dropped."""
    if not isinstance(address, (list, tuple)) or is_host_port(address):
        address = [address]
    parsed = {}
    for one in address:
        one = parse_address(one)
        parsed.setdefault(one.label, one)
    if not parsed:
        raise DeputyError("no server address given")
    return list(parsed.values())


def is_host_port(address):
    """(host, port) rather than two addresses: a port is an int or digits."""
    return (isinstance(address, tuple) and len(address) == 2
            and isinstance(address[0], str) and not isinstance(address[1], bool)
            and (isinstance(address[1], int)
                 or (isinstance(address[1], str) and address[1].isdigit())))


def ssl_context_for(tls):
    """tls=True, a CA file name, or an ssl.SSLContext -> context (or None)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return ssl.create_default_context()
    if isinstance(tls, str):
        try:
            return ssl.create_default_context(cafile=tls)
        except (OSError, ssl.SSLError) as error:     # (ssl.SSLError is an OSError)
            raise DeputyError("cannot use %r as the CA file for tls: %s"
                              % (tls, describe(error))) from None
    if isinstance(tls, ssl.SSLContext):
        return tls
    raise DeputyError("tls must be True, a CA file name or an ssl.SSLContext")


def complete_lines(parts, chunk):
    """Split what was received into complete lines; the unfinished rest of
    a line stays in `parts` (a list, so long lines are joined once)."""
    if chunk[-1:] == b"\n" and not parts:      # the usual read: whole lines only
        lines = chunk.split(b"\n")
        lines.pop()
        return lines
    if chunk.find(b"\n") < 0:      # (not `in`: bytes.__contains__ tries an int first)
        parts.append(chunk)
        return ()
    if parts:
        parts.append(chunk)
        chunk = b"".join(parts)
        parts.clear()
    lines = chunk.split(b"\n")
    rest = lines.pop()
    if rest:
        parts.append(rest)
    return lines


def message_line(message):
    return dumps(message) + CRLF


def exact_line(message):
    """message_line, refusing what JSON cannot carry exactly: orjson raises
    TypeError for an integer beyond 64 bits but writes NaN and Infinity as
    null, so a line with a null in it is checked for those."""
    line = dumps(message) + CRLF
    if line.find(b"null") >= 0:     # (not `in`: bytes.__contains__ tries an int first)
        check_exact(message)
    return line


def did_line(wid, field, value):
    """A worker's `did` for job wid: field b'res' (value: any JSON) or
    b'err' (a string). Raises TypeError like exact_line. Formatted
    directly: the dict exact_line would take costs more than the line."""
    if type(wid) is not int:        # the server's wids are; anything else, the slow way
        return exact_line({"cmd": "did", "id": wid, field.decode(): value})
    value_json = dumps(value)
    if value_json.find(b"null") >= 0:
        check_exact(value)
    return b'{"cmd":"did","id":%d,"%b":%b}\r\n' % (wid, field, value_json)


def check_exact(value):
    """TypeError when `value` holds a float JSON has no number for
    (NaN, Infinity) or an integer outside -2**63 .. 2**64-1."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError("%r is not a JSON number (NaN, Infinity, or too big for a float)"
                            % value)
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -2 ** 63 <= value < 2 ** 64:
            raise TypeError("integer %d exceeds the 64-bit range" % value)
    elif isinstance(value, dict):
        for item in value.values():
            check_exact(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_exact(item)


def line_too_long(line, max_line):
    """The server's rule: the line without its CR LF must fit in max_line."""
    return max_line is not None and len(line) - 2 > max_line


# ---------------------------------------------------------------------------
# Connection: one server, its socket, reader, writer and reconnection
# ---------------------------------------------------------------------------

class Connection:
    """One server. Knows the jobs it sent there that have no answer yet
    (`pending`, by job id) and the jobs that server gave it to do (`held`,
    by WID); the client decides where jobs go, the worker runs them.

    One greenlet connects, reads and reconnects; a second writes. Messages
    are appended to a buffer and written together once per turn of the
    event loop, so a burst of submissions costs one system call."""

    def __init__(self, client, address):
        self.client = client
        self.address = address
        self.label = address.label
        self.pending = {}
        self.held = {}
        self.metrics_waiters = collections.deque()
        self.connected = False     # a socket is open (after auth)
        self.live = False          # connected and taking jobs (not draining)
        self.throttled = False     # told the server we can do nothing for now
        self.offered = 0           # the capacity last told the server (several servers)
        self.tried = False         # the first connection attempt has ended, well or not
        self.last_error = None
        self.fatal = None          # an error retrying cannot fix (auth, certificate)
        self._out = []
        self._wake = gevent.event.Event()
        self._closing = False
        self._writer = None
        self._writing = False      # the writer is in a send
        self._sock = None
        self._retry = gevent.event.Event()     # set: end a back-off wait now
        self._greenlet = gevent.spawn(self._run)

    def __repr__(self):
        return "<Connection %s %s>" % (self.label, "live" if self.live else "down")

    # -- sending ------------------------------------------------------------

    def send(self, line):
        """Queue one encoded line (ending in CR LF) for the writer."""
        if self.connected:
            out = self._out
            out.append(line)
            if len(out) == 1:       # else the writer was woken for the first
                self._wake.set()

    def submit(self, job):
        self.pending[job.id] = job
        job._conn = self
        self.send(job._encoded())

    def _write_loop(self, sock):
        wake = self._wake
        try:
            while True:
                wake.wait()
                wake.clear()
                out = self._out
                if out:
                    self._out = []
                    self._writing = True
                    send_all(sock, b"".join(out))
                    self._writing = False
                if self._closing and not self._out:
                    return
        except OSError as error:
            log.debug("%s: write failed: %s", self.label, error)
            shut_down(sock)
        finally:
            self._writing = False

    def wait_written(self, timeout):
        """Wait until the writer has given everything queued to the kernel
        (or the connection is down, or timeout seconds passed)."""
        with gevent.Timeout(timeout, False):
            while self.connected and (self._out or self._writing):
                gevent.sleep(0.001)

    # -- connecting ---------------------------------------------------------

    def _run(self):
        """Connect, serve, and after a loss connect again: waiting a little
        longer after each failure (or each session that ended at once)."""
        delay = self.client.backoff_initial
        while not self.client.closed:
            try:
                sock, leftover = self._connect()
            except (AuthError, ssl.SSLCertVerificationError) as error:
                return self._give_up(error)
            except (OSError, ValueError) as error:
                self._note_failure(error)
            else:
                started = time.monotonic()
                self._serve(sock, leftover)
                if self.fatal is not None:
                    return self._give_up(self.fatal)
                if time.monotonic() - started > self.client.backoff_max:
                    delay = self.client.backoff_initial
            if not self.client.closed:
                self._retry.wait(random.uniform(delay / 2, delay))
                self._retry.clear()
                delay = min(delay * 2, self.client.backoff_max)

    def _connect(self):
        address, client = self.address, self.client
        if address.path is not None:
            sock = gevent.socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
            sock.settimeout(client.connect_timeout)
            try:
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = gevent.socket.create_connection(
                (address.host, address.port), timeout=client.connect_timeout)
            sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
            keep_alive(sock)
            if client.ssl_context is not None:
                sock = gevent.ssl.SSLSocket(sock=sock, server_hostname=address.host,
                                            _context=client.ssl_context)
        try:
            leftover = self._authenticate(sock) if client.secret else b""
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock, leftover

    def _authenticate(self, sock):
        """Send the secret; wait for the server's yes. -> bytes read past it."""
        sock.sendall(message_line({"cmd": "auth", "secret": self.client.secret}))
        received = b""
        while b"\n" not in received:
            chunk = sock.recv(RECV_SIZE)
            if not chunk:
                raise ConnectionError("server closed the connection during auth")
            received += chunk
        line, _, rest = received.partition(b"\n")
        reply = loads(line)
        if isinstance(reply, dict) and reply.get("cmd") == "auth" and reply.get("ok") is True:
            return rest
        if not isinstance(reply, dict):
            reply = {"error": reply}
        raise AuthError("%s refused the secret: %s" % (self.label, reply.get("error", reply)))

    def retry_now(self):
        """Someone waits on this server (metrics, a closing client's bg
        job): if it is down, try to connect now, not after the back-off."""
        if not self.connected:
            self._retry.set()

    def _note_failure(self, error):
        first = self.last_error is None
        self.last_error = error
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "cannot connect to %s: %s; retrying", self.label, describe(error),
                extra={"deputy_retrying": True})
        self._unreachable_for_metrics()
        self._first_attempt_over()

    def _first_attempt_over(self):
        if not self.tried:
            self.tried = True
            self.client._first_attempt_over()

    def _unreachable_for_metrics(self):
        """Whoever waits for this server's metrics learns it is down now,
        rather than waiting until its timeout."""
        waiters, self.metrics_waiters = self.metrics_waiters, collections.deque()
        for waiter in waiters:
            if not waiter.ready():
                waiter.set(None)

    def _give_up(self, error):
        """Stop reconnecting: retrying cannot fix a refused secret or a
        certificate that does not verify."""
        self.fatal = self.last_error = error
        self.client._connection_failed(self, error)
        # deputy_fatal: every server is given up on, so whatever waits
        # raises this error (the CLI prints it; it need not log it too).
        log.error("giving up on %s: %s", self.label, describe(error),
                  extra={"deputy_fatal": self.client._fatal is not None})
        self._unreachable_for_metrics()
        self._first_attempt_over()

    # -- one session --------------------------------------------------------

    def _serve(self, sock, leftover):
        self._out = []
        self.connected = True
        if self.last_error is not None:
            log.info("connected to %s", self.label)
            self.last_error = None
        self._sock = sock
        self._writer = gevent.spawn(self._write_loop, sock)
        try:
            self._say_hello()
            self.client._connection_up(self)
            self._first_attempt_over()
            self._read_loop(sock, leftover)
        except OSError as error:
            self.last_error = error
        except Exception as error:
            log.exception("%s: internal error; reconnecting", self.label)
            self.last_error = error
        finally:
            self._end_session(sock)

    def _say_hello(self):
        """What a new socket needs: can_do again, unanswered metrics requests."""
        self.client.worker.connection_up(self)
        waiters = [w for w in self.metrics_waiters if not w.ready()]
        self.metrics_waiters = collections.deque(waiters)
        for _ in waiters:
            self.send(METRICS_LINE)

    def _end_session(self, sock):
        self.connected = self.live = self.throttled = False
        self.offered = 0
        self._sock = None
        if self._writer is not None:
            self._writer.kill(block=False)
        sock.close()
        if self.client.closed:
            return
        if self.last_error is None:
            self.last_error = ConnectionError("connection closed by the server")
        if self.fatal is None:
            log.warning("lost connection to %s: %s; reconnecting", self.label,
                        describe(self.last_error), extra={"deputy_retrying": True})
        self.client.worker.connection_lost(self)
        jobs, self.pending = self.pending, {}
        self.client._connection_down(self, jobs.values())

    def _read_loop(self, sock, data):
        recv = sock.recv
        handle = self._handle_line
        parts = []
        while True:
            for line in complete_lines(parts, data):
                handle(line)
            data = recv(RECV_SIZE)
            if not data:
                return

    # -- messages from the server -------------------------------------------

    def _handle_line(self, line):
        if len(line) < 3:
            return
        try:
            message = loads(line)
            cmd = message["cmd"]
            if cmd == "did":
                self._on_did(message)
            elif cmd == "do":
                self.client.worker.take(self, message)
            else:
                self._message_handlers[cmd](self, message)
        except (ValueError, TypeError, LookupError, AttributeError) as error:
            # A server speaking another protocol (version) must not kill the
            # reader: say what was not understood and go on.
            log.warning("%s sent a message this client cannot use (%s: %s): %r",
                        self.label, type(error).__name__, error, line[:200])

    def _on_did(self, message):
        job = self.pending.pop(message.get("id"), None)
        if job is None:
            log.debug("%s: result for no pending job: %r", self.label, message)
        elif "err" in message:
            job._fail(JobFailed(message["err"], job))
        else:
            job._succeed(message.get("res"))

    def _on_queued(self, message):
        job = self.pending.pop(message.get("id"), None)
        if job is not None:
            job._succeed(None)

    def _on_progress(self, message):
        job = self.pending.get(message.get("id"))
        if job is not None:
            job._progress(message.get("data"))

    def _on_cancel(self, message):
        self.client.worker.cancel(self, message.get("id"))

    def _on_metrics(self, message):
        if self.metrics_waiters:
            self.metrics_waiters.popleft().set(message.get("metrics"))

    def _on_error(self, message):
        job_id, text = message.get("id"), str(message.get("error"))
        if text.startswith("authentication"):      # whatever message it was about
            return self._refused_auth(text)
        job = self.pending.get(job_id) if isinstance(job_id, str) else None
        if job is not None:
            del self.pending[job_id]
            if text.startswith("draining"):
                self._now_draining()
                if job._cancel_requested:   # the server never took it: nothing to cancel
                    job._fail(JobFailed("cancelled", job))
                else:
                    self.client._route(job)
            else:
                job._fail(JobRefused("refused by %s: %s" % (self.label, text), job))
        elif isinstance(job_id, str):
            log.debug("%s: error about finished job %s: %s", self.label, job_id, text)
        elif job_id is not None:
            # About a job this worker no longer holds: its progress, say,
            # crossed the server's cancel on the wire. Harmless.
            level = logging.DEBUG if text.startswith("no such job held") else logging.WARNING
            log.log(level, "%s refused a message about job %s: %s", self.label, job_id, text)
        elif text.startswith("line too long"):
            self._fail_too_long(text)
        else:
            log.warning("%s: error: %s", self.label, text)

    def _refused_auth(self, text):
        """The server wants a secret this client lacks (or refused it): the
        server closes the connection; retrying cannot help."""
        self.fatal = AuthError("%s: %s (give the client its secret, or set DEPUTY_SECRET)"
                               % (self.label, text))
        shut_down(self._sock)

    def _fail_too_long(self, text):
        """The server hangs up on a line over its --max-line (smaller than
        this client's max_line). Sent again, that line would cost every
        new connection the same way: fail its job instead. The server read
        the lines in order and stopped at the first that was too long."""
        match = re.search(r"limit (\d+)", text)
        jobs = list(self.pending.values())
        if match:
            limit = int(match.group(1))
            culprits = [job for job in jobs if line_too_long(job._encoded(), limit)]
        else:
            culprits = sorted(jobs, key=lambda job: len(job._encoded()))[-1:]
        if not culprits:
            log.warning("%s: error: %s", self.label, text)
        for job in culprits:
            del self.pending[job.id]
            job._fail(JobRefused("refused by %s: %s" % (self.label, text), job))

    def _now_draining(self):
        """The server is going down: send it no more jobs (until it is back)."""
        if self.live:
            log.info("%s is draining; sending jobs elsewhere", self.label)
            self.live = False
            self.client._connection_draining(self)

    _message_handlers = {
        "queued": _on_queued,
        "progress": _on_progress,
        "cancel": _on_cancel,
        "metrics": _on_metrics,
        "error": _on_error,
        "auth": lambda self, message: None,
    }

    # -- asked by the client and the worker ---------------------------------

    def ask_metrics(self):
        waiter = gevent.event.AsyncResult()
        if self.fatal is not None:      # given up on: it will never answer
            waiter.set(None)
            return waiter
        self.metrics_waiters.append(waiter)
        self.send(METRICS_LINE)
        return waiter

    def throttle(self, types):
        """Stop this server handing us jobs (the worker is full elsewhere)."""
        if self.connected and not self.throttled:
            self.send(message_line({"cmd": "cant_do", "types": types}))
        self.throttled = True

    def unthrottle(self, types, capacity):
        self.throttled = False
        self.say_can_do(types, capacity)

    def say_can_do(self, types, capacity):
        if types and not self.throttled:
            self.send(message_line({"cmd": "can_do", "types": types, "capacity": capacity}))
            self.offered = capacity

    def begin_close(self):
        """The writer writes what is buffered, then ends."""
        self._closing = True
        self._wake.set()

    def close(self, flush_timeout):
        """Wait (up to flush_timeout) for what is buffered to be written, then stop."""
        self.begin_close()
        writer = self._writer
        if self.connected and writer is not None and writer is not gevent.getcurrent():
            writer.join(flush_timeout)
        self.connected = self.live = False
        if self._sock is not None:
            shut_down(self._sock)
        if self._greenlet is not gevent.getcurrent():
            self._greenlet.kill(block=False)
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)


def error_text(error):
    """"Type: message" of what a handler raised; just the type when it has
    no message, or when its __str__ fails (the job must fail all the same)."""
    name = type(error).__name__
    try:
        message = str(error)
    except Exception:
        return name
    return "%s: %s" % (name, message) if message else name


def send_all(sock, data):
    """sock.sendall(data), but one plain send when the kernel takes it all,
    as it nearly always does: gevent's sendall costs a getsockopt call and
    three Python frames per call."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def keep_alive(sock):
    """Notice a server that vanished without a word (a cable pulled, a VM
    gone) within about a minute, rather than waiting on it forever."""
    sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(_stdlib_socket, option):
            sock.setsockopt(_stdlib_socket.IPPROTO_TCP, getattr(_stdlib_socket, option), value)


def shut_down(sock):
    try:
        sock.shutdown(_stdlib_socket.SHUT_RDWR)
    except OSError:
        pass


def describe(error):
    text = str(error) or type(error).__name__
    if isinstance(error, (OSError, DeputyError)):
        return text
    return "%s: %s" % (type(error).__name__, text)


def start_timer(seconds, callback):
    """A hub timer that fires `seconds` from now. The event loop measures a
    timer from the time it last read the clock, which is as old as however
    long the caller kept the hub from running (a monkey-patched script's CPU
    work, an unpatched time.sleep): a job's timeout would end at once.
    gevent.Timeout has the clock read afresh first (update=True); so does
    this."""
    timer = gevent.get_hub().loop.timer(seconds)
    timer.start(callback, update=True)
    return timer


# ---------------------------------------------------------------------------
# Futures: the Job a submitter holds
# ---------------------------------------------------------------------------

PENDING, SUCCEEDED, FAILED = 0, 1, 2


class Job:
    """A submitted job: a future for its result.

    `get(timeout=None)` waits and returns the result, or raises JobFailed
    (`.error` holds the text) or Timeout. `ready()`, `successful()`,
    `cancel()`; `progress` is the latest progress value the worker sent
    and `on_progress(job, data)`, when set, is called with each (in the
    connection's reader greenlet: it must not block).
    """

    __slots__ = ("id", "type", "unique", "bg", "deadline", "progress", "on_progress",
                 "_fields", "_line", "_conn", "_state", "_value", "_event",
                 "_cancel_requested", "_timer", "_backlog")

    def __init__(self, job_id, job_type, fields, unique=None, bg=False, deadline=None):
        self.id = job_id
        self.type = job_type
        self.unique = unique
        self.bg = bg
        self.deadline = deadline
        self.progress = None
        self.on_progress = None
        self._fields = fields if deadline is not None else None
        self._line = exact_line(fields)
        self._conn = None
        self._state = PENDING
        self._value = None
        self._event = None
        self._cancel_requested = False
        self._timer = None
        self._backlog = None        # the client's, while it waits there for a server

    def __repr__(self):
        state = ("pending", "succeeded", "failed")[self._state]
        return "<Job %s %s %s>" % (self.id, self.type, state)

    def get(self, timeout=None):
        if timeout is not None:         # (the usual get() has none: no call)
            check_wait(timeout)
        if self._state == PENDING:
            if self._event is None:
                self._event = gevent.event.Event()
            if not self._event.wait(timeout):
                raise Timeout("job %s (%s) has no result after %s s"
                              % (self.id, self.type, timeout))
        if self._state == SUCCEEDED:
            return self._value
        raise self._value

    def ready(self):
        return self._state != PENDING

    def successful(self):
        return self._state == SUCCEEDED

    @property
    def exception(self):
        """The JobFailed (or other DeputyError) of a failed job, else None."""
        return self._value if self._state == FAILED else None

    def cancel(self):
        """Ask for the job to be cancelled. Returns at once; `get()` then
        raises JobFailed("cancelled") unless the result came first. False
        when the job had already finished."""
        if self._state != PENDING:
            return False
        conn = self._conn
        if conn is None or not conn.connected:
            self._forget()
            self._fail(JobFailed("cancelled", self))
        elif not self._cancel_requested:
            self._cancel_requested = True
            conn.send(message_line({"cmd": "cancel", "id": self.id}))
        return True

    def _forget(self):
        """Take an unsent job out of where it waits to be sent."""
        if self._conn is not None:
            self._conn.pending.pop(self.id, None)
        self._conn = None

    def _encoded(self):
        """The do line; a timeout is sent as what is left of it."""
        if self._fields is None:
            return self._line
        fields = dict(self._fields, timeout=max(self.deadline - time.monotonic(), 0.001))
        return message_line(fields)

    def _succeed(self, value):
        if self._state == PENDING:
            self._state, self._value = SUCCEEDED, value
            self._done()

    def _fail(self, error):
        if self._state == PENDING:
            self._state, self._value = FAILED, error
            self._done()

    def _done(self):
        if self._backlog is not None:   # cancelled or timed out while no server was up
            self._backlog.pop(self.id, None)
            self._backlog = None
        self._line = self._fields = None
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self._event is not None:
            self._event.set()

    def _start_deadline_timer(self, seconds):
        """The server fails a job past its timeout; this covers a server
        that cannot be reached (or does not answer) by then."""
        self._timer = start_timer(seconds, self._deadline_passed)

    def _deadline_passed(self):
        """A job no server holds (it waits for one) fails at its deadline;
        one a server holds waits TIMEOUT_GRACE more for the server's own
        answer, which counts: a result may be on its way."""
        if self._state == PENDING and self._conn is not None:
            self._timer.close()
            self._timer = start_timer(TIMEOUT_GRACE, self._grace_passed)
        else:
            self._grace_passed()

    def _grace_passed(self):
        if self._state == PENDING:
            conn, self._conn = self._conn, None
            if conn is not None and conn.pending.pop(self.id, None) is self:
                conn.send(message_line({"cmd": "cancel", "id": self.id}))
            self._fail(JobFailed("timeout", self))

    def _progress(self, data):
        self.progress = data
        if self.on_progress is not None:
            try:
                self.on_progress(self, data)
            except (KeyboardInterrupt, SystemExit, gevent.GreenletExit):
                raise
            except BaseException:   # a gevent.Timeout, say: it must not end the connection
                log.exception("on_progress callback of job %s failed", self.id)


# ---------------------------------------------------------------------------
# Worker: handlers, shared capacity, one greenlet per job in hand
# ---------------------------------------------------------------------------

class Task:
    """A job a server gave this worker: where from, and the greenlet
    (slot) running its handler."""

    __slots__ = ("conn", "wid", "handler", "arg", "slot")

    def __init__(self, conn, wid, handler, arg):
        self.conn, self.wid = conn, wid
        self.handler, self.arg = handler, arg
        self.slot = None

    def is_held(self):
        return self.conn.held.get(self.wid) is self


def progress(data):
    """Inside a handler: send `data` (any JSON value) to the job's submitter
    as progress. Call it from the handler's own greenlet."""
    task = getattr(gevent.getcurrent(), "deputy_task", None)
    if task is None:
        raise DeputyError("progress() called outside a job handler's greenlet")
    try:
        line = exact_line({"cmd": "progress", "id": task.wid, "data": data})
    except TypeError as error:
        raise DeputyError("progress data is not JSON: %s" % error) from None
    max_line = task.conn.client.max_line
    if line_too_long(line, max_line):
        raise DeputyError("progress data too long: %d bytes, over max_line=%d"
                          % (len(line) - 2, max_line))
    if task.is_held():
        task.conn.send(line)


class Worker:
    """The doing half of a client. Each job runs in a greenlet (slot) of
    its own; at most `capacity` run at once, summed over every server. The
    slots are kept and reused, since making a greenlet costs more than a
    small job, and one whose handler returned runs the next job waiting
    to start itself, since even a switch through the hub costs a good
    part of a small job. With several servers, each is offered what it
    holds plus the slots free in all (see _offer); when the worker is full
    they are told `cant_do` until a slot frees, and a job that arrives
    anyway is given back with `release`."""

    def __init__(self, client, shared):
        self.client = client
        self.shared = shared         # several servers share the capacity
        self.handlers = {}
        self.capacity = 1
        self.held = 0                # jobs the servers count as ours
        self.running = 0             # slots busy with a handler
        self.ready = collections.deque()   # held, not started yet: waiting for a slot
        self.dispatch_due = False          # a _dispatch is scheduled
        self.idle_slots = []
        self.hub = gevent.get_hub()
        self.run_callback = self.hub.loop.run_callback

    def add(self, handlers, capacity):
        for job_type, handler in handlers.items():
            if not isinstance(job_type, str) or not callable(handler):
                raise DeputyError("can_do needs {type name: callable}, got %r: %r"
                                  % (job_type, handler))
            check_type_name(job_type)
        check_capacity(capacity)
        if capacity is not None:
            self.capacity = capacity
        self.handlers.update(handlers)
        types = list(self.handlers)
        for conn in self.client.connections:
            if self._free() > 0:
                conn.say_can_do(types, self._offer(conn))
        self._adjust_throttle()

    def remove(self, types):
        for job_type in types:
            self.handlers.pop(job_type, None)
        for conn in self.client.connections:
            conn.send(message_line({"cmd": "cant_do", "types": list(types)}))

    def connection_up(self, conn):
        if self.handlers:
            if self._free() <= 0:
                conn.throttled = True       # told when a slot frees
            conn.say_can_do(list(self.handlers), self._offer(conn))

    # -- jobs arriving and leaving ------------------------------------------

    def take(self, conn, message):
        wid = message.get("id")
        handler = self.handlers.get(message.get("type"))
        if handler is None or self.held >= self.capacity:
            log.debug("%s: giving job %s back (%s)", conn.label, wid,
                      "worker full" if handler else "no handler")
            conn.send(message_line({"cmd": "release", "id": wid}))
            return
        task = Task(conn, wid, handler, message.get("arg"))
        conn.held[wid] = task
        self.held += 1
        if self.held >= self.capacity:
            self._adjust_throttle()
        elif self.shared and len(conn.held) >= conn.offered:
            conn.say_can_do(list(self.handlers), self._offer(conn))   # it may have more
        self.ready.append(task)
        self._schedule_dispatch()

    def _schedule_dispatch(self):
        if not self.dispatch_due:
            self.dispatch_due = True
            self.run_callback(self._dispatch)

    def _dispatch(self):
        """At the next turn of the event loop, give each ready task a slot
        (an idle one, or a new one). A slot whose handler returns without
        blocking runs the next ready task itself, so a burst of quick jobs
        costs no greenlet switch per job; when a handler blocks, the hub
        comes back here and the next task gets the next slot."""
        self.dispatch_due = False
        while True:
            task = self._next_ready()
            if task is None:
                return
            slot = self.idle_slots.pop() if self.idle_slots else greenlet.greenlet(
                self._slot_loop, parent=self.hub)
            task.slot = slot
            slot.switch(task)

    def _next_ready(self):
        """The next ready task still held, counted as running; None when
        there is none or every slot the capacity allows is busy."""
        ready = self.ready
        while ready and self.running < self.capacity:
            task = ready.popleft()
            if task.is_held():
                self.running += 1
                return task
        return None

    def _slot_loop(self, task):
        slot = greenlet.getcurrent()
        while task is not None:
            slot.deputy_task = task
            try:
                self._run_task(task)
            except BaseException:
                # KeyboardInterrupt or SystemExit, re-raised for the hub to
                # pass to the main greenlet. This slot ends: jobs waiting
                # for one get new slots.
                self._schedule_dispatch()
                raise
            finally:
                slot.deputy_task = None
                self.running -= 1
            task = self._next_ready()
            if task is not None:
                task.slot = slot
            else:
                if self.client.closed or len(self.idle_slots) >= self.capacity:
                    return
                self.idle_slots.append(slot)
                task = self.hub.switch()

    def _run_task(self, task):
        """Run the handler and send its result or error. Whatever escapes
        it (a gevent.Timeout, any BaseException) fails the job, so the
        slot is never lost; KeyboardInterrupt and SystemExit go on up.
        (_next_ready has just checked that the task is still held.)"""
        try:
            result = task.handler(task.arg)
        except JobFailed as error:
            self._finish(task, self._did_line(task.wid, b"err", str(error.error)))
        except BaseException as error:
            if isinstance(error, JobCancelled) and not task.is_held():
                return      # the usual way a job taken back ends
            text = error_text(error)
            log.info("job %s failed: %s", task.wid, text, exc_info=log.isEnabledFor(logging.DEBUG))
            self._finish(task, self._did_line(task.wid, b"err", text))
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                task.conn.wait_written(CLOSE_FLUSH_TIMEOUT)     # the program may end now
                raise
        else:
            self._finish(task, self._did_line(task.wid, b"res", result))

    def _did_line(self, wid, field, value):
        """The did line of a result (field b"res") or of an error text
        (b"err"), or of why it cannot be sent: not JSON (an error text with
        a lone surrogate, say), or longer than the server takes (it would
        hang up on this worker, and the job would go round again)."""
        try:
            line = did_line(wid, field, value)
        except TypeError as error:
            return did_line(wid, b"err", "TypeError: result is not JSON: %s" % error)
        max_line = self.client.max_line
        if line_too_long(line, max_line):
            return did_line(wid, b"err", "result too long: %d bytes, over max_line=%d"
                            % (len(line) - 2, max_line))
        return line

    def _finish(self, task, line):
        if not task.is_held():
            return          # cancelled or taken back: the result goes nowhere
        del task.conn.held[task.wid]
        self.held -= 1
        task.conn.send(line)
        if self.shared:     # (the same test _adjust_throttle makes: a call fewer per job)
            self._adjust_throttle()

    def cancel(self, conn, wid):
        """The server took a job back: kill its handler, free its slot."""
        task = conn.held.pop(wid, None)
        if task is None:
            log.debug("%s cancelled job %s, which this worker does not hold", conn.label, wid)
            return
        self.held -= 1
        self._kill(task, "job %s was cancelled by %s" % (wid, conn.label))
        self._adjust_throttle()

    def connection_lost(self, conn):
        tasks, conn.held = list(conn.held.values()), {}
        self.held -= len(tasks)
        for task in tasks:
            self._kill(task, "connection to %s lost; the server hands job %s out again"
                       % (conn.label, task.wid))
        self._adjust_throttle()

    def _kill(self, task, why):
        """Raise JobCancelled in the task's handler, if it is still running it."""
        if task.slot is not None:
            self.hub.loop.run_callback(self._throw_if_running, task, JobCancelled(why))

    @staticmethod
    def _throw_if_running(task, error):
        slot = task.slot
        if getattr(slot, "deputy_task", None) is task and slot is not greenlet.getcurrent():
            slot.throw(error)

    def stop(self):
        """Kill every handler and idle slot (the client is closing)."""
        for conn in self.client.connections:
            for task in conn.held.values():
                self._kill(task, "client closed")
            conn.held = {}
        self.held = 0
        self.ready.clear()
        slots, self.idle_slots = self.idle_slots, []
        for slot in slots:
            self.hub.loop.run_callback(slot.switch, None)

    # -- sharing capacity over several servers ------------------------------

    def _free(self):
        """Slots free in all; 1 or more with one server (it is never throttled)."""
        return self.capacity - self.held if self.shared else self.capacity

    def _offer(self, conn):
        """The capacity to tell conn's server. With one server, the whole
        capacity. With several, what it holds plus what is free in all, so
        that no server is offered more than the free slots (when each was
        told the whole capacity, one that held few jobs when a slot freed
        could send nearly that many at once, all but one to be given back:
        1,600 releases for 900 jobs with capacity 32 on three servers,
        against 540). A server that fills its offer while slots are free
        elsewhere is offered more at once (take)."""
        return len(conn.held) + self._free() if self.shared else self.capacity

    def _adjust_throttle(self):
        if not self.shared or not self.handlers:
            return
        connections = self.client.connections
        types = list(self.handlers)
        if self.held >= self.capacity:
            for conn in connections:
                conn.throttle(types)
        else:
            for conn in connections:
                if conn.throttled:
                    conn.unthrottle(types, self._offer(conn))


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------

class HashRing:
    """Consistent hashing of `unique` keys onto servers, so every client
    given the same addresses sends a key to the same live server."""

    def __init__(self, labels):
        points = sorted((hash64("%s#%d" % (label, n)), index)
                        for index, label in enumerate(labels) for n in range(HASH_POINTS))
        self.points = [point for point, _ in points]
        self.owners = [owner for _, owner in points]

    def first_live(self, key, connections):
        start = bisect.bisect(self.points, hash64(key))
        count = len(self.owners)
        for step in range(count):
            conn = connections[self.owners[(start + step) % count]]
            if conn.live:
                return conn
        return None


def hash64(text):
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class Client:
    """A connection to one or more Deputy servers, to submit jobs and to
    do them.

    `address` is "host:port", (host, port), "unix:/path", or a list of
    these for several servers. `secret` (default: $DEPUTY_SECRET) is sent
    first on every connection. `tls` is True (verify against the system's
    CAs), a CA file name, or an ssl.SSLContext. `max_line` (bytes, the
    servers' --max-line) bounds each message: a longer job is refused by
    `do` at once, rather than sent for the server to hang up on.
    """

    def __init__(self, address=DEFAULT_ADDRESS, secret=None, tls=None,
                 connect_timeout=CONNECT_TIMEOUT, backoff_max=BACKOFF_MAX, max_line=MAX_LINE):
        addresses = parse_addresses(address)
        if max_line is not None and (isinstance(max_line, bool) or not isinstance(max_line, int)
                                     or max_line < 1):
            raise DeputyError("max_line must be an integer >= 1 or None, got %r" % (max_line,))
        self.max_line = max_line
        if secret is not None and not isinstance(secret, str):
            raise DeputyError("secret must be a str, got %r" % (type(secret).__name__,))
        self.secret = secret if secret is not None else os.environ.get("DEPUTY_SECRET") or None
        self.ssl_context = ssl_context_for(tls)
        check_seconds("connect_timeout", connect_timeout)
        check_seconds("backoff_max", backoff_max)
        self.connect_timeout = connect_timeout
        self.backoff_initial = min(BACKOFF_INITIAL, backoff_max)
        self.backoff_max = backoff_max
        self.closed = False
        self._closing = False        # close() is waiting to send background jobs
        self.worker = Worker(self, shared=len(addresses) > 1)
        self._unusable = gevent.event.Event()    # closed, or every server gave up
        self._ids = itertools.count(1)
        self._backlog = {}           # jobs waiting for a live server, in order
        self._live = []              # connections taking jobs, in address order
        self._turn = 0
        self._ring = HashRing([a.label for a in addresses])
        self._fatal = None
        # With several servers, the first jobs wait until every server has
        # been tried (or STARTUP_GRACE has passed): else they would all go
        # to whichever connected first, and unique keys would not go where
        # their hash says (SPEC 9).
        self._starting = len(addresses) > 1
        self._startup_timer = None
        if self._starting:
            self._startup_timer = start_timer(STARTUP_GRACE, self._end_startup)
        self.connections = []
        self.connections.extend(Connection(self, a) for a in addresses)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return "<Client %s>" % ", ".join(c.label for c in self.connections)

    # -- submitting ---------------------------------------------------------

    def do(self, type, arg=None, priority=0, bg=False, unique=None, ttr=None,
           timeout=None, on_progress=None):
        """Submit a job; returns its Job at once (nothing is waited for)."""
        if self.closed:
            raise ClientClosed("client is closed")
        # Every option is checked here, as the server would: a bad one is
        # the caller's mistake, raised at the call rather than from get().
        if not isinstance(type, str) or not type:
            raise DeputyError("a job type is a non-empty string, got %r" % (type,))
        fields = {"cmd": "do", "id": str(next(self._ids)), "type": type, "arg": arg}
        if priority.__class__ is not int or priority:
            check_priority(priority)
            fields["priority"] = priority
        if bg is not False:
            if bg is not True:
                raise DeputyError("bg must be True or False, got %r" % (bg,))
            fields["bg"] = True
        if unique is not None:
            if not isinstance(unique, str):
                raise DeputyError("unique must be a string, got %r" % (unique,))
            fields["unique"] = unique
        if ttr is not None:
            check_seconds("ttr", ttr)
            fields["ttr"] = ttr
        deadline = None
        if timeout is not None:
            check_seconds("timeout", timeout)
            fields["timeout"] = timeout
            deadline = time.monotonic() + timeout
        try:
            job = Job(fields["id"], type, fields, unique, bg, deadline)
        except TypeError as error:
            raise DeputyError("cannot send a %r job: %s" % (type, error)) from None
        length = len(job._line) - 2
        if deadline is not None:        # sent as what is left of it, perhaps written longer
            length += LONGEST_SECONDS - len(dumps(timeout))
        if self.max_line is not None and length > self.max_line:
            raise DeputyError("cannot send a %r job: its line is %d bytes, over max_line=%d"
                              % (type, length, self.max_line))
        job.on_progress = on_progress
        if deadline is not None:
            job._start_deadline_timer(timeout)
        self._route(job)
        return job

    def call(self, type, arg=None, timeout=None, **options):
        """Submit a job and wait for its result. When `timeout` runs out the
        job is cancelled and Timeout raised."""
        check_wait(timeout)             # before the job is sent
        job = self.do(type, arg, **options)
        try:
            return job.get(timeout)
        except Timeout:
            job.cancel()
            raise

    def map(self, type, args, timeout=None, **options):
        """Submit one job per arg (pipelined); return the results in order.
        Raises the first failure in order; `timeout` bounds the whole call
        (unfinished jobs are then cancelled)."""
        check_wait(timeout)             # before any job is sent
        jobs = [self.do(type, arg, **options) for arg in args]
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return [job.get(None if deadline is None else max(deadline - time.monotonic(), 0))
                    for job in jobs]
        except Timeout:
            for job in jobs:
                job.cancel()
            raise

    def _route(self, job):
        """Send a job to a live server, or keep it until one is live."""
        if job._state != PENDING:
            return
        if job.deadline is not None and time.monotonic() >= job.deadline:
            job._fail(JobFailed("timeout", job))
            return
        conn = None if self._starting else self._choose(job)
        if conn is not None:
            conn.submit(job)
        elif self._fatal is not None:
            job._fail(self._fatal)
        else:
            self._backlog[job.id] = job
            job._backlog = self._backlog
            job._conn = None
        if self.closed:     # closed meanwhile: by a signal handler, in the middle of do()
            job._forget()
            job._fail(ClientClosed("client closed before the job had its result"))

    def _choose(self, job):
        live = self._live
        if len(live) < 2:
            return live[0] if live else None
        if job.unique is not None:
            return self._ring.first_live(str(job.unique), self.connections)
        self._turn += 1
        return live[self._turn % len(live)]

    # -- connections coming and going -----------------------------------------

    def _connection_up(self, conn):
        conn.live = True
        self._live = [c for c in self.connections if c.live]
        if not self._starting:
            self._route_backlog()
        elif len(self._live) == 1:      # one is up: the others get a moment more, not a second
            self._startup_timer.close()
            self._startup_timer = start_timer(STARTUP_AFTER_FIRST, self._end_startup)

    def _route_backlog(self):
        jobs = list(self._backlog.values())
        self._backlog.clear()
        for job in jobs:
            job._backlog = None
            self._route(job)

    def _first_attempt_over(self):
        if self._starting and all(c.tried for c in self.connections):
            self._end_startup()

    def _end_startup(self):
        if self._starting:
            self._starting = False
            self._startup_timer.close()
            self._route_backlog()

    def _connection_draining(self, conn):
        self._live = [c for c in self.connections if c.live]

    def _connection_down(self, conn, jobs):
        self._live = [c for c in self.connections if c.live]
        for job in jobs:
            job._conn = None
            if job._cancel_requested:
                job._fail(JobFailed("cancelled", job))
            else:
                self._route(job)

    def _connection_failed(self, conn, error):
        """A connection gave up for good; when all have, fail what waits."""
        if all(c.fatal is not None for c in self.connections):
            self._fatal = error if isinstance(error, DeputyError) else DeputyError(describe(error))
            jobs = list(self._backlog.values())
            self._backlog.clear()
            for job in jobs:
                job._fail(self._fatal)
            for c in self.connections:
                for waiter in c.metrics_waiters:
                    waiter.set_exception(self._fatal)
            self._unusable.set()        # work() raises the error

    # -- working --------------------------------------------------------------

    def can_do(self, handlers, capacity=None):
        """Do jobs: `can_do({"resize": fn, ...}, capacity=4)`. A handler
        gets the job's arg and returns its result; up to `capacity` run at
        once (default 1), each in its own greenlet. Also a decorator:
        `@client.can_do("resize", capacity=4)`, or bare `@client.can_do`
        (the function's name is the type)."""
        if self.closed:
            raise ClientClosed("client is closed")
        if isinstance(handlers, str):
            job_type = handlers
            check_capacity(capacity)
            check_type_name(job_type)

            def register(handler):
                self.worker.add({job_type: handler}, capacity)
                return handler
            return register
        if callable(handlers) and not isinstance(handlers, dict):
            self.worker.add({handlers.__name__: handlers}, capacity)
            return handlers
        if not isinstance(handlers, collections.abc.Mapping):    # a list of names, say
            raise TypeError("can_do takes {type name: handler}, a type name or a function, "
                            "not %r" % (handlers,))
        self.worker.add(dict(handlers), capacity)
        return None

    def cant_do(self, *types):
        """Stop being given jobs of these types (jobs in hand finish)."""
        self.worker.remove(types)

    def work(self):
        """Do jobs until close() is called (from a handler, another greenlet
        or a signal handler). Raises the error (AuthError, DeputyError)
        when every server has been given up on (a refused secret, a
        certificate that does not verify)."""
        if not self.worker.handlers:
            raise DeputyError("work() needs handlers: call can_do() first")
        self._unusable.wait()
        if self._fatal is not None and not self.closed:
            raise self._fatal

    # -- metrics, closing -----------------------------------------------------

    def metrics(self, timeout=METRICS_TIMEOUT):
        """The server's metrics dict. With several servers: their sum, and
        under "servers" each server's own (None for one that did not answer)."""
        if self.closed:
            raise ClientClosed("client is closed")      # no server would ever answer
        if self._fatal is not None:
            raise self._fatal
        check_wait(timeout)
        for conn in self.connections:   # a server down: ask it now, not after its back-off
            conn.retry_now()
        deadline = None if timeout is None else time.monotonic() + timeout
        waiters = [(conn, conn.ask_metrics()) for conn in self.connections]
        each, timed_out = {}, False
        for conn, waiter in waiters:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                each[conn.label] = waiter.get(timeout=left)
            except gevent.Timeout:
                waiter.set(None)
                each[conn.label], timed_out = None, True
        answers = [m for m in each.values() if m is not None]
        if not answers:
            if timed_out:
                raise Timeout("no metrics from %s within %s s%s" % (
                    ", ".join(each), timeout, self._why_down()))
            raise DeputyError("no metrics: cannot reach %s" % self._why_down()[2:-1])
        if len(self.connections) == 1:
            return answers[0]
        total = sum_metrics(answers)
        total["servers"] = each
        return total

    def _send_background_jobs(self):
        """A background job outlives its submitter (SPEC 7): one still
        waiting for a server is sent before the client closes, if a server
        is up within CLOSE_FLUSH_TIMEOUT."""
        self._end_startup()
        with gevent.Timeout(CLOSE_FLUSH_TIMEOUT, False):
            while self._fatal is None and any(job.bg for job in self._backlog.values()):
                for conn in self.connections:   # down: try again now, whatever its back-off
                    conn.retry_now()
                gevent.sleep(0.05)

    def _why_down(self):
        errors = ["%s: %s" % (c.label, describe(c.last_error))
                  for c in self.connections if c.last_error is not None]
        return " (%s)" % "; ".join(errors) if errors else ""

    def close(self):
        """Write what is buffered, close every connection, kill running
        handlers; jobs without a result fail with ClientClosed."""
        if self.closed or self._closing:
            return
        if gevent.getcurrent() is gevent.get_hub():
            # A signal handler (signal.signal) or a loop callback: the hub
            # must not block, so the closing waits run in a greenlet.
            gevent.spawn(self.close)
            return
        self._closing = True
        try:
            if any(job.bg for job in self._backlog.values()):
                self._send_background_jobs()
        finally:
            self._close_now()

    def _close_now(self):
        self.closed = True
        self._live = []
        if self._startup_timer is not None:
            self._startup_timer.close()
        for conn in self.connections:       # every writer at once: one wait, not one each
            conn.begin_close()
        deadline = time.monotonic() + CLOSE_FLUSH_TIMEOUT
        for conn in self.connections:
            conn.close(max(deadline - time.monotonic(), 0))
        self.worker.stop()
        error = ClientClosed("client closed before the job had its result")
        for conn in self.connections:
            for job in list(conn.pending.values()):
                job._fail(error)
            conn.pending = {}
            for waiter in conn.metrics_waiters:
                if not waiter.ready():
                    waiter.set_exception(ClientClosed("client closed"))
        for job in list(self._backlog.values()):
            job._fail(error)
        self._backlog.clear()
        self._unusable.set()


def sum_metrics(answers):
    """Add several servers' metrics: numbers summed (up_since: the earliest),
    nested dicts (types) added key by key."""
    total = {}
    for metrics in answers:
        for key, value in metrics.items():
            total[key] = add_metric(key, total.get(key), value)
    return total


def add_metric(key, total, value):
    if isinstance(value, dict):
        total = total if isinstance(total, dict) else {}
        for inner_key, inner in value.items():
            total[inner_key] = add_metric(inner_key, total.get(inner_key), inner)
        return total
    if total is None:
        return value
    if key == "up_since":
        return min(total, value)
    if is_number(value) and is_number(total):
        return total + value
    return total


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_wait(timeout):
    """How long get() waits: None (for ever) or a number of seconds. NaN
    would wait for ever and a boolean is no number (DeputyError); anything
    else is of the wrong type (TypeError), which would fail only inside the
    wait, or not at all on a job already done."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or (isinstance(timeout, float) and timeout != timeout):
        raise DeputyError("timeout must be a number of seconds or None, not %r" % (timeout,))
    if not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a number of seconds or None, not %r" % (timeout,))


def check_priority(priority):
    if isinstance(priority, bool) or not isinstance(priority, int) \
            or not -2 ** 63 <= priority < 2 ** 64:
        raise DeputyError("priority must be an integer from -2**63 to 2**64-1, got %r"
                          % (priority,))


def check_seconds(option, seconds):
    if not is_number(seconds) or not 0 < seconds < float("inf"):
        raise DeputyError("%s must be a positive number of seconds, got %r" % (option, seconds))


def check_capacity(capacity):
    """Checked before anything is kept: a capacity the protocol cannot carry
    (beyond 64 bits), found only when can_do is encoded, would fail every
    later (re)connection."""
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or not 1 <= capacity < 2 ** 64):
        raise DeputyError("capacity must be an integer from 1 to 2**64-1, got %r" % (capacity,))


def check_type_name(job_type):
    if not job_type:
        raise DeputyError("a job type name is a non-empty string")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

USAGE = """Deputy client: submit jobs, do jobs, watch Deputy servers.

Usage:
  deputy-client [-a ADDR]... [options] do TYPE [ARG] [--priority N] [--bg] [--unique KEY] [--ttr S] [--timeout S]
  deputy-client [-a ADDR]... [options] map TYPE FILE
  deputy-client [-a ADDR]... [options] metrics
  deputy-client [-a ADDR]... [options] status [--watch] [--interval S]
  deputy-client [-a ADDR]... [options] work TYPE [--capacity N] -- COMMAND...
  deputy-client --help
  deputy-client --version

Commands:
  do       Submit one job and print its result as JSON. ARG is JSON; a bare
           word is taken as a string; none is null. A failed job prints its
           error on stderr and exits 1.
  map      Submit one job per line of FILE (JSON, or - for stdin), pipelined;
           print one JSON result per line, in order (null for a failed job,
           whose error goes to stderr; exit 1 if any failed).
  metrics  Print the metrics, pretty (summed over several servers, each shown).
  status   Per-type table of queued, running, workers and idle workers.
  work     Do TYPE jobs by running COMMAND for each: the arg as JSON on its
           stdin, its stdout (JSON, or else a string) the result; a non-zero
           exit fails the job with the last line of its stderr.

Options:
  -a ADDR, --address ADDR  A server, HOST:PORT or unix:PATH; repeat -a for
                           several servers [default: 127.0.0.1:11746]
  --secret-file FILE       Read the server's secret from FILE (default: the
                           DEPUTY_SECRET environment variable)
  --tls                    Speak TLS; verify the server against the system's CAs
  --tls-ca FILE            Speak TLS; verify the server against the CAs in FILE
  --priority N             Higher is handed out first [default: 0]
  --bg                     Background job: return once the server holds it
  --unique KEY             Join an unfinished job of the same type and KEY
  --ttr S                  Seconds a worker may hold the job before the server
                           takes it back and hands it out again
  --timeout S              Seconds from now until the job fails with "timeout"
  --capacity N             Jobs the worker runs at once [default: 1]
  --watch                  Redraw the status table every interval until Ctrl-C
  --interval S             Seconds between redraws [default: 1]
  --help                   Show this text
  --version                Show the version
"""


class UsageError(DeputyError):
    """A bad command-line value."""


def main(argv=None):
    """`deputy-client`: parse the command line, run one command, exit."""
    try:
        args = docopt.docopt(USAGE, argv=argv, version=__version__)
    except docopt.DocoptExit as usage:      # not --help or --version: those exit 0
        sys.stderr.write("%s\n" % usage)
        return 2
    # Ctrl-C reaches gevent's hub first, which would print "KeyboardInterrupt"
    # and a timestamp before passing it on to the command: it is how `work`
    # and `status --watch` are meant to end, not an error.
    hub = gevent.get_hub()
    hub.NOT_ERROR = tuple(hub.NOT_ERROR) + (KeyboardInterrupt,)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("deputy-client: %(message)s"))
    # An error that ends the command is printed once, when it does; and a
    # command that ends when no server answers says so in that error, so
    # "retrying" (or "reconnecting") would be news only to `work` and
    # `status --watch`.
    handler.addFilter(lambda record: not getattr(record, "deputy_fatal", False))
    if not (args["work"] or args["--watch"]):
        handler.addFilter(lambda record: not getattr(record, "deputy_retrying", False))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        client = Client(args["--address"], secret=cli_secret(args), tls=cli_tls(args))
    except (DeputyError, OSError) as error:
        return fail(describe(error), 2)
    try:
        return run_command(client, args)
    except UsageError as error:
        return fail(str(error), 2)
    except DeputyError as error:
        return fail(describe(error), 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped (`| head`): no traceback, and
        # nothing more written to the closed pipe when Python exits.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    finally:
        client.close()


def run_command(client, args):
    for name, command in (("do", command_do), ("map", command_map), ("metrics", command_metrics),
                          ("status", command_status), ("work", command_work)):
        if args[name]:
            return command(client, args)
    raise UsageError("no command")


def fail(text, status):
    sys.stderr.write("deputy-client: %s\n" % text)
    return status


def cli_secret(args):
    if not args["--secret-file"]:
        return None
    try:
        with open(args["--secret-file"], encoding="utf-8") as secret_file:
            return secret_file.read().strip()
    except OSError as error:
        raise DeputyError("cannot read the secret file: %s" % error) from None


def cli_tls(args):
    return args["--tls-ca"] or bool(args["--tls"]) or None


def cli_number(args, option, kind=float, minimum=None, positive=False, check=None):
    """An option's number; check: the library's own check of the value, so
    that whatever it would refuse (a priority beyond 64 bits, say) is a
    usage error too, found before anything is sent."""
    text = args[option]
    if text is None:
        return None
    try:
        value = plain_number(kind, text)
    except ValueError:
        raise UsageError("%s must be a number, got %r" % (option, text)) from None
    if kind is float and not math.isfinite(value):
        raise UsageError("%s must be a finite number, got %r" % (option, text))
    if (minimum is not None and value < minimum) or (positive and not value > 0):
        raise UsageError("%s must be %s, got %r" % (
            option, "positive" if positive else "at least %s" % minimum, text))
    if check is not None:
        try:
            check(value)
        except DeputyError as error:
            raise UsageError("%s: %s" % (option, error)) from None
    return value


def cli_type(args):
    try:
        check_type_name(args["TYPE"])
    except DeputyError as error:
        raise UsageError("TYPE: %s" % error) from None
    return args["TYPE"]


def parse_cli_arg(text, where="ARG"):
    """JSON, or when it is not JSON, the text as a string. JSON that cannot
    be sent exactly (an integer beyond 64 bits, a number too big for a
    float, NaN, Infinity) is a usage error, not a different value."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("%s is not valid UTF-8" % where) from None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    try:
        check_exact(value)
        dumps(value)        # a lone surrogate ("\ud800") is valid to json, not UTF-8
    except TypeError as error:
        raise UsageError("%s cannot be sent exactly as JSON: %s" % (where, error)) from None
    return value


def print_json(value, pretty=False):
    option = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS if pretty else 0
    sys.stdout.write(dumps(value, option=option).decode() + "\n")
    sys.stdout.flush()


def command_do(client, args):
    timeout = cli_number(args, "--timeout", positive=True)
    job = client.do(cli_type(args), parse_cli_arg(args["ARG"]),
                    priority=cli_number(args, "--priority", int, check=check_priority),
                    bg=args["--bg"],
                    unique=args["--unique"], ttr=cli_number(args, "--ttr", positive=True),
                    timeout=timeout)
    if timeout is None:                 # (else the timeout bounds the wait)
        wait_for_a_server(client, [job])
    try:
        result = job.get(timeout)
    except Timeout:
        job.cancel()
        if any(conn.connected for conn in client.connections):
            return fail("timeout", 1)
        return fail("timeout: no server reached%s" % client._why_down(), 1)
    except JobFailed as error:
        return fail(error.error, 1)
    if not args["--bg"]:
        print_json(result)
    return 0


def wait_for_a_server(client, jobs, timeout=CONNECT_TIMEOUT):
    """`do` and `map` do not wait for a server that is down, as the library
    does: none reached within timeout is exit 1, saying why, and the jobs
    are cancelled, so that none is sent once the command has failed (a
    user would submit it again). A server lost later is waited for: the
    jobs are submitted again when it is back."""
    deadline = time.monotonic() + timeout
    try:
        while not any(conn.connected for conn in client.connections):
            if client._fatal is not None:
                raise client._fatal
            if all(job.ready() for job in jobs):
                return
            if time.monotonic() >= deadline:
                raise DeputyError("cannot reach %s within %g s%s" % (
                    ", ".join(conn.label for conn in client.connections), timeout,
                    client._why_down()))
            gevent.sleep(0.02)
    except BaseException:               # (Ctrl-C too)
        for job in jobs:
            job.cancel()
        raise


def command_map(client, args):
    job_type = cli_type(args)
    jobs = [client.do(job_type, parse_cli_arg(line, "line %d" % number))
            for number, line in read_arg_lines(args["FILE"])]
    wait_for_a_server(client, jobs)
    show_progress = sys.stderr.isatty()
    failed, shown = 0, 0.0
    for number, job in enumerate(jobs, 1):
        try:
            print_json(job.get())
        except JobFailed as error:
            failed += 1
            print_json(None)
            sys.stderr.write("deputy-client: job %d failed: %s\n" % (number, error.error))
        if show_progress and (time.monotonic() - shown > 0.1 or number == len(jobs)):
            shown = time.monotonic()
            sys.stderr.write("\r%d/%d done, %d failed%s" % (
                number, len(jobs), failed, "\n" if number == len(jobs) else ""))
    return 1 if failed else 0


def read_arg_lines(name):
    """-> [(line number, line)] of the non-blank lines, strictly UTF-8."""
    try:
        if name == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as arg_file:
                data = arg_file.read()
        # Lines end at "\n" (and "\r\n") only: splitlines() would also split
        # at U+2028, NEL and form feeds, which JSON strings may hold raw.
        lines = [line[:-1] if line.endswith("\r") else line
                 for line in data.decode("utf-8").split("\n")]
    except OSError as error:
        raise UsageError("cannot read %s: %s" % (name, error)) from None
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UsageError("%s is not UTF-8 (line %d: %s)" % (
            "stdin" if name == "-" else name, line, error.reason)) from None
    return [(number, line) for number, line in enumerate(lines, 1) if line.strip()]


def command_metrics(client, args):
    print_json(client.metrics(), pretty=True)
    return 0


def command_status(client, args):
    if not args["--watch"]:
        sys.stdout.write(status_table(client))
        return 0
    interval = cli_number(args, "--interval", float, 0.05)
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    try:
        watch_status(client, interval, clear, stop)
    except KeyboardInterrupt:
        pass
    return 0


def watch_status(client, interval, clear, stop):
    """Print the table every interval seconds until stop is set."""
    while not stop.is_set():
        try:
            table = status_table(client)
        except DeputyError as error:
            if client._fatal is not None:
                raise               # a refused secret or certificate: watching is futile
            table = "%s\n" % error
        sys.stdout.write("%s%s  (every %g s, Ctrl-C to stop)\n%s" % (
            clear, time.strftime("%H:%M:%S"), interval, table))
        if not clear:
            sys.stdout.write("\n")
        sys.stdout.flush()
        stop.wait(interval)


STATUS_COLUMNS = ("queued", "running", "workers", "idle")


def status_table(client):
    """A gearadmin --status like table: one row per type; with several
    servers a row per server and type, then the totals."""
    metrics = client.metrics()
    rows = []
    if "servers" in metrics:
        for label, server_metrics in metrics["servers"].items():
            if server_metrics is None:
                rows.append((label, "(no answer)") + ("",) * len(STATUS_COLUMNS))
            else:
                rows.extend((label,) + row for row in type_rows(server_metrics))
        rows.extend(("all",) + row for row in type_rows(metrics))
        header = ("SERVER", "TYPE") + tuple(c.upper() for c in STATUS_COLUMNS)
    else:
        rows = type_rows(metrics)
        header = ("TYPE",) + tuple(c.upper() for c in STATUS_COLUMNS)
    return format_table(header, rows)


def type_rows(metrics):
    types = metrics.get("types") or {}
    return [(shown_name(name),) + tuple(str(types[name].get(column, ""))
                                        for column in STATUS_COLUMNS)
            for name in sorted(types)]


def shown_name(name):
    """A type name as the terminal may show it: any client names types, and
    a line feed would forge a row, an escape sequence drive the terminal."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in name)


def format_table(header, rows):
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    text_columns = len(header) - len(STATUS_COLUMNS)
    lines = []
    for row in [header] + rows:
        cells = [str(cell).ljust(width) if i < text_columns else str(cell).rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def command_work(client, args):
    capacity = cli_number(args, "--capacity", int, 1, check=check_capacity)
    client.can_do({cli_type(args): command_handler(args["COMMAND"])}, capacity=capacity)
    gevent.signal_handler(signal.SIGTERM, client.close)
    try:
        client.work()
    except KeyboardInterrupt:
        pass
    return 0


class CommandFailed(JobFailed):
    """The worker's command exited non-zero."""


def command_handler(argv):
    """A handler that runs argv with the arg as JSON on stdin."""
    def run_command_for_job(arg):
        try:
            process = gevent.subprocess.Popen(
                argv, stdin=gevent.subprocess.PIPE, stdout=gevent.subprocess.PIPE,
                stderr=gevent.subprocess.PIPE)
        except OSError as error:
            raise CommandFailed("cannot run %s: %s" % (argv[0], error)) from None
        try:
            out, err = process.communicate(dumps(arg) + b"\n")
        except BaseException:
            process.kill()
            process.wait()
            raise
        if process.returncode != 0:
            raise CommandFailed(last_line(err) or exit_description(process.returncode))
        return command_result(out)
    return run_command_for_job


def command_result(out):
    """The command's stdout: strict JSON, parsed exactly (an integer beyond
    64 bits stays one, and then fails the job rather than becoming a
    float), or else the text as a string."""
    try:
        return json.loads(out, parse_constant=refuse_constant)
    except ValueError:
        return out.decode("utf-8", "replace").rstrip("\r\n")


def refuse_constant(name):
    raise ValueError("%s is not JSON" % name)


def last_line(data):
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def exit_description(returncode):
    if returncode < 0:
        return "command killed by signal %d" % -returncode
    return "command exited with status %d" % returncode


if __name__ == "__main__":
    sys.exit(main())
