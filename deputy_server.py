#!/usr/bin/env python3
"""Deputy: a small, fast job server for Python shops that run gevent.

A *client* submits jobs (a type and a JSON argument) and gets each result
back; a *worker* is a client that said which job types it can do. The
server hands every job to a free worker and routes the result back to the
connection that submitted it. Queues live in memory only.

Run it::

    deputy-server                  # 127.0.0.1:11746
    python deputy_server.py -p 4730 -s /run/deputy.sock -v

The wire protocol (JSON lines over TCP or a UNIX socket) is described in
README.rst, section "The protocol", and in the project's SPEC. This file is
the whole server: copy it onto a box that has gevent, orjson and docopt-ng
and run it (with pysimdjson too, if it can: big payloads cost less).

Sections, top to bottom: protocol (framing, parsing, encoding), jobs and
the broker (queues, worker slots, dispatch), connections (read loop,
coalescing writer, backpressure), HTTP metrics and status page, the server
(listeners, signals), command line.
"""

import errno
import gc
import heapq
import hmac
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import struct
import sys
import time
from collections import OrderedDict, deque

try:                    # POSIX; elsewhere the drain cannot see the kernel's send queue
    import fcntl
    import termios
except ImportError:
    fcntl = termios = None

import gevent
import gevent.event
import gevent.server
import gevent.socket
import orjson

try:                    # optional: checks big lines 3x faster than orjson parses them
    import simdjson
except ImportError:
    simdjson = None

__version__ = "0.1.0"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11746
DEFAULT_MAX_LINE = 1024 * 1024           # bytes in one message line
DEFAULT_MAX_ATTEMPTS = 5                 # worker losses before a job fails
DEFAULT_METRICS_INTERVAL = 5.0           # seconds between -v metrics lines
DEFAULT_HIGH_WATER = 4 * 1024 * 1024     # unsent bytes before a connection is paused
DEFAULT_DRAIN_TIMEOUT = 30.0             # seconds SIGTERM waits for running jobs
# Seconds a new connection has to finish its TLS handshake and, with a
# secret, to authenticate; then it is closed (on --http: the longest wait
# for a request's next bytes). A stranger who connects and says nothing
# would otherwise hold a descriptor (and on TLS or HTTP a greenlet) for
# ever. As MySQL's connect_timeout; 0: no limit.
DEFAULT_AUTH_TIMEOUT = 10.0
# Job types one connection may do. Handing a worker its next job looks at
# each of its types: with 100,000 a job cost 13 ms, and a batch of its
# answers kept everyone else waiting.
DEFAULT_MAX_TYPES = 10000
# One read: many pipelined lines at once. Not more: glibc gives a bigger
# buffer an mmap and munmap of its own on every read (256 KiB reads of a
# 60-byte line measured 34 µs, 128 KiB reads 7 µs).
RECV_SIZE = 128 * 1024
YIELD_AFTER_LINES = 64                  # a TLS batch this big yields to others
# Seconds of lines one connection handles in one turn of the event loop
# (the clock is read every TURN_CHECK lines); the rest wait for its next
# turn. One read of 128 KiB can hold 130,000 blank lines, which took 170 ms,
# and a did of a worker that can do 100,000 types costs 5 ms: everyone else
# waited that long.
TURN_SECONDS = 0.005
TURN_CHECK = 32                         # lines handled between two readings of the clock
WRITE_CHUNK = 256 * 1024                # most bytes given to one send
WRITE_PIECES = 512                      # most pieces given to one send (IOV_MAX is 1024)
BIG_PIECE = 32 * 1024                   # payloads this big are sent as they are, not copied
SMALL_PIECE = 4096                      # pieces of an unended line smaller than this are merged
COMPACT_AFTER = 1024                    # dead entries a job queue keeps before compacting
SET_ASIDE_PER_TURN = 2000               # a paused connection's queued jobs set aside per turn
HAND_OUT_PER_TURN = 1000                # jobs one worker is given at once (a huge capacity)
KEEP_UNUSED_TYPES = 10000               # types with no job and no worker still listed
KEEP_UNUSED_TYPE_BYTES = 16 * 1024 * 1024   # ... and at most this much of their names
FEW_TYPES = 16                          # a worker of more types: scan only those with jobs
LEAVE_PER_TURN = 5000                   # a departing connection's jobs dropped per turn
CLOSE_FLUSH_TIMEOUT = 5.0                # seconds to flush a goodbye before closing
# The cyclic GC's youngest generation: collect after this many new objects,
# not Python's 700. A client's batch creates a job and a write callback per
# line; at 700 they were collected, promoted, and then paid for in full
# collections of every connection's objects (15 % of the CPU with 10,000
# workers, pauses of 175 ms). The hot path makes no reference cycles, so
# this only delays collecting the few that closed connections leave.
GC_YOUNG_THRESHOLD = 50000

log = logging.getLogger("deputy")


###############################################################################
# Protocol: framing, parsing and validating messages, encoding replies.
# Nothing here knows about sockets or the broker.
###############################################################################

CRLF = b"\r\n"
BIG_READ = 16 * 1024        # reads at least this long are split with find()
NO_ID = object()            # an error about a message that had no id
LARGEST_EXACT = 2.0 ** 63   # orjson turns integers beyond 64 bits into floats
MAX_PAYLOAD_DEPTH = 254     # orjson cannot encode deeper nesting

loads = orjson.loads
dumps = orjson.dumps
monotonic = time.monotonic
JSONDecodeError = orjson.JSONDecodeError
JSONEncodeError = orjson.JSONEncodeError


class AuthTimeout(Exception):
    """Raised in a connection's greenlet that took longer than
    --auth-timeout to finish its TLS handshake or to authenticate."""


class ProtocolError(Exception):
    """A refused message; becomes an `error` reply carrying the id if any."""

    def __init__(self, text, id=NO_ID):
        Exception.__init__(self, text)
        self.text = text
        self.id = id


def encode(message):
    return dumps(message) + CRLF


def encode_error(text, id=NO_ID):
    if type(id) is int:         # %d: exact beyond orjson's 64 bits too
        return b'{"cmd":"error","error":%b,"id":%d}\r\n' % (dumps(text), id)
    if id is not NO_ID:
        try:
            return encode({"cmd": "error", "error": text, "id": id})
        except (JSONEncodeError, TypeError):
            pass            # an id we cannot echo (too deep, a lone surrogate)
    return encode({"cmd": "error", "error": text})


def reply_prefix(sub_id):
    """The start of a submitter's `did`, up to its id."""
    if type(sub_id) is int:
        return b'{"cmd":"did","id":%d' % sub_id
    return b'{"cmd":"did","id":' + dumps(sub_id)


def encode_cancel(wid):
    return b'{"cmd":"cancel","id":%d}\r\n' % wid


def split_lines(data, start=0, end=None):
    """-> (complete lines from data[start:] without their LF, the unfinished
    rest); end: where the first LF after start is, if the caller found it.
    bytes.split scans byte by byte; for big lines find() (memchr) is ~100x
    faster. A big unfinished rest is a view of data, not a copy: it is
    copied once, when the line is joined."""
    if len(data) < BIG_READ and not start:
        lines = data.split(b"\n")
        return lines, lines.pop()
    lines = []
    find = data.find
    if end is None:
        end = find(b"\n", start)
    while end >= 0:
        lines.append(data[start:end])
        start = end + 1
        end = find(b"\n", start)
    if len(data) - start >= BIG_PIECE:
        return lines, memoryview(data)[start:]
    return lines, data[start:]


def line_is_blank(line):
    """Only JSON's white space (form feed and vertical tab are not)."""
    return not line.strip(b" \t\r")


def decode_line(line):
    """One line -> (cmd, message dict). Raises ProtocolError."""
    try:
        msg = loads(line)
    except JSONDecodeError as exc:
        raise ProtocolError(why_invalid(line, exc))
    if type(msg) is not dict:
        raise ProtocolError("a message must be a JSON object")
    cmd = msg.get("cmd")
    if type(cmd) is not str:
        raise ProtocolError('a message needs a string "cmd"', msg.get("id", NO_ID))
    return cmd, msg


def why_invalid(line, exc):
    """The error text of a line orjson refused. Bad UTF-8 is said so, with
    where it is: orjson's own text speaks of surrogates whatever the byte."""
    try:
        bytes(line).decode("utf-8")
    except UnicodeDecodeError as bad:
        return "invalid UTF-8 at byte offset %d of the line" % bad.start
    return "invalid JSON or a number Deputy cannot carry exactly: %s" % exc


ECHO_DIGITS = 40            # the longest integer id an error echoes: int() of huge literals is slow
LEADING_ID = re.compile(rb'\s*\{[^\[\]{}]*?"id"\s*:\s*("(?:[^"\\]|\\.){0,1000}"|-?[0-9]{1,%d})\s*[,}]'
                        % ECHO_DIGITS)
SALVAGE_LIMIT = 64 * 1024       # longest line salvage_id parses whole: its parser is slow


UNECHOABLE = object()       # a number salvage_id cannot echo as it was sent


def _small_int(text):
    return int(text) if len(text.lstrip("-")) <= ECHO_DIGITS else UNECHOABLE


def _finite_float(text):
    number = float(text)
    return number if math.isfinite(number) else UNECHOABLE


# The standard library's parser, for salvage_id: it keeps integers beyond
# 64 bits exact (orjson reads them as floats) and, with raw_decode, reads
# the first value of a line that has trailing garbage or a second value.
SALVAGE_DECODER = json.JSONDecoder(parse_int=_small_int, parse_float=_finite_float,
                                   parse_constant=lambda text: UNECHOABLE)


def salvage_id(line):
    """The id a refused line had, exactly as sent, when orjson could not
    give it: the line is invalid (trailing garbage, NaN, a bad literal or
    escape, cut short), or the id is an integer beyond 64 bits (orjson
    reads a float). First where clients put it, before any nesting, found
    by a regex; else, in a line of at most SALVAGE_LIMIT bytes, by walking
    the object's members up to "id" (id_among_members). Only on the error
    path."""
    found = LEADING_ID.match(line)
    if found:
        try:
            return json.loads(found.group(1))     # exact beyond 64 bits too
        except ValueError:
            return NO_ID                            # a string id that is not UTF-8
    if len(line) > SALVAGE_LIMIT:
        return NO_ID
    text = bytes(line).decode("utf-8", "surrogateescape")   # the id may still be fine
    id = id_among_members(text)
    return NO_ID if id is UNECHOABLE else id       # (one nested deeper is dropped by
                                                    # encode_error, which cannot encode it)


SKIP_SPACE = re.compile(r"[ \t\r\n]*")
JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)     # unrolled: no backtracking
JSON_SCALAR = re.compile(r"[^\s,:\[\]{}\"]+")      # a number or literal, valid or not
STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
SALVAGE_DEPTH = 1024        # deeper than any parser reads: walked no further


def id_among_members(text):
    """The value of the top-level object's first "id" member, read by the
    standard library's parser; NO_ID when the members before it, or the
    id itself, cannot be read. What comes after the id is not looked at,
    and the values before it are skipped, not checked: so an error
    anywhere else in the line (a bad literal, a bad escape, a trailing
    comma, the line cut short) still gets the id back."""
    pos = SKIP_SPACE.match(text).end()
    if not text.startswith("{", pos):
        return NO_ID
    pos += 1
    while True:
        key = JSON_STRING.match(text, SKIP_SPACE.match(text, pos).end())
        if key is None:
            return NO_ID
        pos = SKIP_SPACE.match(text, key.end()).end()
        if not text.startswith(":", pos):
            return NO_ID
        start = SKIP_SPACE.match(text, pos + 1).end()
        end = json_value_end(text, start)
        if end is None:
            return NO_ID
        if json_key_is_id(key.group()):
            try:
                return SALVAGE_DECODER.decode(text[start:end])
            except (ValueError, RecursionError):
                return NO_ID
        pos = SKIP_SPACE.match(text, end).end()
        if not text.startswith(",", pos):
            return NO_ID
        pos += 1


def json_key_is_id(key):
    if key == '"id"':
        return True
    try:
        return "\\" in key and json.loads(key) == "id"       # spelt with escapes
    except ValueError:
        return False


def json_value_end(text, start):
    """Where the value starting at start ends, skipped without checking it
    beyond strings and brackets; None when it does not end."""
    first = text[start:start + 1]
    if first == '"':
        found = JSON_STRING.match(text, start)
        return found.end() if found else None
    if first not in ("[", "{"):
        found = JSON_SCALAR.match(text, start)
        return found.end() if found else None
    depth = 0
    for token in STRING_OR_BRACKET.finditer(text, start):
        bracket = token.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > SALVAGE_DEPTH:
                return None
        elif bracket in ("]", "}"):
            depth -= 1
            if depth == 0:
                return token.end()
    return None


def suspicious_float(number):
    """orjson turns integers beyond 64 bits into big integral floats, and
    non-zero literals too small for a double into 0.0."""
    return number == 0.0 or (number.is_integer() and abs(number) >= LARGEST_EXACT)


def may_hold_inexact_number(value):
    """True when value holds a float that may not be the number that was sent."""
    kind = type(value)
    if kind is str or kind is int or value is None or kind is bool:
        return False
    if kind is float:
        return suspicious_float(value)
    stack = [value]
    while stack:
        container = stack.pop()
        items = container.values() if type(container) is dict else container
        for item in items:
            kind = type(item)
            if kind is float:
                if suspicious_float(item):
                    return True
            elif kind is dict or kind is list:
                stack.append(item)
    return False


# Only these literals can be what orjson reads inexactly: an integer of 19
# digits or more (beyond 64 bits), and a number too small for a double (a
# 3-digit negative exponent, or 200 zeros after the point before a 2-digit
# one). A line without any (nearly all) needs no second parse.
MAYBE_INEXACT = re.compile(rb"\d{19}|[eE]-\d{3}|\.0{200}")


class FloatLiteral(str):
    """A float as it was written: json's parse_float, called from C."""


def has_inexact_number(line, field):
    """The slow, sure check of line's field (for a line MAYBE_INEXACT
    matches): the standard library parser keeps big integers and, with
    parse_float, each float's literal. (Only that field: a number in
    another one, say an unknown field, is not passed on.)"""
    try:
        msg = json.loads(line, parse_float=FloatLiteral)
    except RecursionError:      # nested deeper than this parser goes: not sure, so refuse
        return True
    except ValueError:
        return False
    stack = [msg.get(field)] if type(msg) is dict else []
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is int:
            if not -(2 ** 63) <= value < 2 ** 64:
                return True
        elif kind is FloatLiteral:
            if float(value) == 0.0 and value.lower().partition("e")[0].strip("-+0.") != "":
                return True         # underflow: a non-zero number became 0
        elif kind is dict:
            stack.extend(value.values())
        elif kind is list:
            stack.extend(value)
    return False


SCALARS = (str, int, bool, type(None))     # orjson carries these exactly, always


def encode_payload(msg, field, line, default=None):
    """The JSON bytes of msg[field], exactly as received, or ProtocolError."""
    value = msg.get(field, default)
    kind = type(value)
    if kind is SentString:
        return value.json
    if kind is str:
        if len(value) < BIG_PIECE:
            return dumps(value)
        return string_as_sent(line, field) or dumps(value)
    if kind is int:             # cheaper than orjson, which allocates 4 KiB a call
        return b"%d" % value
    if kind in SCALARS:
        return dumps(value)
    if (MAYBE_INEXACT.search(line) and may_hold_inexact_number(value)
            and has_inexact_number(line, field)):
        raise ProtocolError("%s holds a number Deputy cannot carry exactly (an integer "
                            "beyond 64 bits, or too small for a double)" % field,
                            msg.get("id", NO_ID))
    try:
        return dumps(value)
    except JSONEncodeError:
        raise ProtocolError("%s is nested deeper than %d levels" % (field, MAX_PAYLOAD_DEPTH),
                            msg.get("id", NO_ID))


def trailing_string(line):
    """-> (where the string that ends the message starts, the end of the
    line without its CR) when line ends in "<key>":"..."} and the string
    holds no quote nor ends in a backslash; else None. For valid JSON:
    inside a string every quote is escaped, so a quote after a `:` is a
    delimiter, and with no quote after it but the one before the `}`, the
    two enclose one string; that `}`, the line's last byte, closes the
    message, so the key is top-level and this is its last value (the one
    a parser keeps). Finding it costs one memrchr."""
    end = len(line) - (line[-1] == 13)      # without the CR of CR LF
    if line[end - 1] != 125 or line[end - 2] != 34 or line[end - 3] == 92:
        return None                         # not `"}` at the end, or an escaped quote
    start = line.rfind(b'"', 0, end - 2)
    if start < 1 or line[start - 1] != 58:  # not `:"`: an inner quote
        return None
    return start, end


PAYLOAD_KEYS = ((b',"arg":', "arg"), (b',"res":', "res"), (b',"data":', "data"))


def payload_as_sent(line):
    """-> (field, start, end) when line ends in a big string payload as
    clients send it, ,"arg":"..."} (or "res", "data"; see trailing_string),
    line[start:end - 1] being the string's JSON text; else None. None too
    when the string is under half the line: a view of it keeps the whole
    line alive, and output is counted by what it shows (a paused reader's
    backlog must not hold more than the count says)."""
    found = trailing_string(line)
    if found is None:
        return None
    start, end = found
    if 2 * (end - start) < len(line):
        return None
    for key, field in PAYLOAD_KEYS:
        if line.endswith(key, 0, start):
            return field, start, end
    return None


def string_as_sent(line, field):
    """The JSON text of msg[field], a big string, as it was sent: a view of
    line when payload_as_sent finds it, else None. Re-encoding a 64 KiB
    string costs a scan and a copy of it on each side of a job. line is
    valid JSON (a parser just read it)."""
    found = payload_as_sent(line)
    if found is None or found[0] != field:
        return None
    return memoryview(line)[found[1]:found[2] - 1]


class SentString:
    """A big string payload as it was sent (its JSON text, a view of its
    line), in place of the str a parser would have made: see loads_big."""

    __slots__ = ("json",)

    def __init__(self, json):
        self.json = json


SIMDJSON_LARGEST = 4 * 1024 * 1024      # its parser keeps ~3.3x the largest line's size
SIMDJSON_PARSER = simdjson.Parser() if simdjson else None


def loads_big(line):
    """loads() for a line of BIG_PIECE bytes or more. Such a line usually
    ends in a big string payload, ,"arg":"..."} (or "res", "data"), and
    orjson spends most of its time on making that string a Python object
    that is only passed on. simdjson checks the whole line 3x faster and
    makes nothing; orjson then parses the rest, the string cut out, and the
    field's value is a SentString. What simdjson refuses, and any other
    shape, orjson parses whole: what is refused, and why, stays orjson's
    (the two refuse the same strings: tests/test_srv_fuzz.py compares)."""
    found = payload_as_sent(line) if SIMDJSON_PARSER and len(line) <= SIMDJSON_LARGEST else None
    if found is None or not simdjson_accepts(line):
        return loads(line)
    field, start, end = found
    msg = loads(line[:start] + b'""}')     # a flaw before the cut: the error it has in line
    if type(msg) is dict:
        msg[field] = SentString(memoryview(line)[start:end - 1])
    return msg


def simdjson_accepts(line):
    try:
        SIMDJSON_PARSER.parse(line)     # the document it makes is dropped at once
        return True
    except Exception:       # ValueError, and RuntimeError for what it cannot represent
        return False


def field_id(msg):
    """A job id: a string or an integer (booleans are not integers)."""
    if "id" not in msg:
        raise ProtocolError('"id" is missing')
    value = msg["id"]
    kind = type(value)
    if kind is not str and kind is not int:
        raise ProtocolError('"id" must be a string or an integer of at most 64 bits', value)
    return value


def field_wid(msg):
    """A worker-side id: the integer the server chose."""
    value = field_id(msg)
    if type(value) is not int:
        raise ProtocolError("no such job held by this connection", value)
    return value


def field_type(msg, id=NO_ID):
    value = msg.get("type")
    if type(value) is not str or not value:
        raise ProtocolError('"type" must be a non-empty string', id)
    return value


def field_types(msg):
    value = msg.get("types")
    if type(value) is not list or not all(type(t) is str and t for t in value):
        raise ProtocolError('"types" must be a list of non-empty strings')
    return value


def field_positive_int(msg, field, default):
    value = msg.get(field, default)
    if type(value) is not int or value < 1:
        raise ProtocolError('"%s" must be an integer >= 1' % field)
    return value


def field_seconds(msg, field, id):
    """ttr and timeout: a positive number, or None when absent."""
    value = msg.get(field)
    if value is None and field not in msg:
        return None
    kind = type(value)
    if (kind is not int and kind is not float) or not value > 0:
        raise ProtocolError('"%s" must be a positive number of seconds' % field, id)
    return value


def field_optional(msg, field, kind, default, id):
    value = msg.get(field, default)
    if type(value) is not kind:
        raise ProtocolError('"%s" must be %s' % (field, kind.__name__), id)
    return value


def parse_do(msg, line):
    """A `do` message -> the Job it asks for, not yet submitted: its `kind`
    is the type's name until the broker resolves it (as beanstalkd's
    protocol code makes the job from a `put`, with no go-between: one
    object fewer per job)."""
    id = msg.get("id")
    if type(id) is not int and type(id) is not str:
        id = field_id(msg)              # raises: missing, or not an id
    job_type = msg.get("type")
    if type(job_type) is not str or not job_type:
        field_type(msg, id)             # raises
    arg = msg.get("arg")
    if type(arg) is str and len(arg) < BIG_PIECE:     # the usual arg, without a call
        arg_tail = dumps(arg) + b"}\r\n"
    else:
        arg_tail = do_tail(encode_payload(msg, "arg", line))
    job = Job(id, job_type, arg_tail)
    if len(msg) == 3 + ("arg" in msg):     # cmd, id, type[, arg]: no options
        return job
    job.priority = field_optional(msg, "priority", int, 0, id)
    job.bg = 1 if field_optional(msg, "bg", bool, False, id) else 0
    job.unique = msg.get("unique")
    if type(job.unique) is not str and "unique" in msg:
        raise ProtocolError('"unique" must be a string', id)
    job.ttr = field_seconds(msg, "ttr", id)
    job.timeout = field_seconds(msg, "timeout", id)
    return job


def do_tail(arg_json):
    """What follows "arg": in a worker's `do`. Concatenating also copies
    orjson's output into a right-sized object: orjson.dumps returns bytes
    that keep a 4 KiB buffer each, and keeping its big outputs queued made
    the 64 KiB bench's peak RSS 45 -> 60-76 MiB. A big string as sent (a
    view of its line) is kept as it is: the line is its own right-sized
    object, and most of it is the string; its `}` is sent after it."""
    return arg_json + b"}\r\n" if type(arg_json) is bytes else arg_json


def parse_did(msg, line):
    """-> (wid, res_json, None) or (wid, None, err)."""
    wid = msg.get("id")
    if type(wid) is not int:
        wid = field_wid(msg)
    has_res = "res" in msg
    if "err" in msg:
        if has_res:
            raise ProtocolError('"did" takes "res" or "err", not both', wid)
        err = msg["err"]
        if type(err) is not str:
            raise ProtocolError('"err" must be a string', wid)
        return wid, None, err
    if not has_res:
        raise ProtocolError('"did" needs "res" or "err"', wid)
    res = msg["res"]
    if type(res) is str and len(res) < BIG_PIECE:     # the usual res, without a call
        return wid, dumps(res), None
    return wid, encode_payload(msg, "res", line), None


###############################################################################
# Jobs and the broker: per-type queues, worker slots, dispatch, requeue,
# metrics. The broker talks to connections only through Peer.link (its
# send, send_now, send_many and close), and is told of backpressure through
# Broker.pause and Broker.resume, so tests can drive it with fakes. (A
# Connection is a Peer whose link is itself.)
###############################################################################

QUEUED, RUNNING, FINISHED = 0, 1, 2


class Job:
    """One unit of work. `owner` gets the result under `owner_id` (None for
    a background job); `joined` are further (peer, id) submitters coalesced
    onto it by `unique`. Made by parse_do; the broker sets seq, kind and
    owner when it takes the job in."""

    __slots__ = ("seq", "kind", "arg_tail", "priority", "owner", "owner_id", "joined", "bg",
                 "unique", "ttr", "timeout", "state", "worker", "wid", "attempts", "ttr_timer",
                 "bg_deadlines", "held_back")

    def __init__(self, id, kind, arg_tail):
        self.seq = 0
        self.kind = kind
        self.arg_tail = arg_tail        # the worker's `do` after "arg": (do_tail)
        self.priority = 0
        self.owner = None
        self.owner_id = id
        self.joined = None
        self.bg = 0                     # background submissions keeping it alive
        self.bg_deadlines = None        # their timeout timers, if any
        self.held_back = None           # queued, but set aside for these paused submitters
        self.unique = None
        self.ttr = None
        self.timeout = None             # the submission's: starts its deadline
        self.state = QUEUED
        self.worker = None
        self.wid = 0
        self.attempts = 0
        self.ttr_timer = None

    def submitters(self):
        """(peer, id) of everyone waiting for this job's result."""
        found = [] if self.owner is None else [(self.owner, self.owner_id)]
        if self.joined:
            found.extend(self.joined)
        return found

    def copy_for(self, peer, sub_id):
        """A job of peer's own, in this one's place in line: the same work,
        joined by nobody (Broker.split_off)."""
        own = Job(sub_id, self.kind, b"")
        own.arg_tail = self.arg_tail        # shared: bytes, or a view of a line
        own.seq, own.priority, own.ttr, own.owner = self.seq, self.priority, self.ttr, peer
        return own

    def wanted(self):
        """Does anyone still want this job done?"""
        return self.owner is not None or bool(self.joined) or self.bg > 0


class JobQueue:
    """Jobs of one type waiting for a worker: FIFO within a priority, higher
    priority first. A deque per priority and a heap of the priorities, so
    push and pop stay O(1) (O(log p) for a new priority); dead entries
    (cancelled, abandoned) are skipped lazily and compacted now and then."""

    __slots__ = ("levels", "by_priority", "dead", "top")

    def __init__(self):
        self.levels = []          # heap of negated priorities; may hold stale ones
        self.by_priority = {}     # priority -> deque of jobs, never empty
        self.dead = 0
        self.top = None           # the highest priority's deque; None: look it up

    def new_level(self, priority):
        jobs = self.by_priority[priority] = deque()
        heapq.heappush(self.levels, -priority)
        self.top = None
        return jobs

    # (A level's deque is never empty, so `or` only makes a missing one.)

    def push(self, job):
        (self.by_priority.get(job.priority) or self.new_level(job.priority)).append(job)

    def push_front(self, job):
        (self.by_priority.get(job.priority) or self.new_level(job.priority)).appendleft(job)

    def head(self):
        """The next live job, or None."""
        jobs = self.top             # every job but the first goes this way
        if jobs:
            job = jobs[0]
            if job.state == QUEUED:
                return job
        return self.find_head()

    def find_head(self):
        """head() the long way: drops dead entries and empty levels found on
        the way, and remembers the deque the head is in."""
        levels, by_priority = self.levels, self.by_priority
        while levels:
            jobs = by_priority.get(-levels[0])
            if jobs is None:            # a stale level
                heapq.heappop(levels)
                continue
            while jobs:
                job = jobs[0]
                if job.state == QUEUED:
                    self.top = jobs
                    return job
                jobs.popleft()
                self.dead -= 1
            del by_priority[-levels[0]]
            heapq.heappop(levels)
        self.top = None
        return None

    def pop_head(self):
        """Remove the job head() returned."""
        jobs = self.top
        jobs.popleft()
        if not jobs:
            del self.by_priority[-self.levels[0]]
            heapq.heappop(self.levels)
            self.top = None

    def forget_one(self, live):
        """A queued job died in place; compact when the dead outnumber the live."""
        self.dead += 1
        if self.dead > COMPACT_AFTER and self.dead > live:
            for priority, jobs in list(self.by_priority.items()):
                kept = deque(job for job in jobs if job.state == QUEUED)
                if kept:
                    self.by_priority[priority] = kept
                else:
                    del self.by_priority[priority]
            self.levels = [-priority for priority in self.by_priority]
            heapq.heapify(self.levels)
            self.dead = 0
            self.top = None


class JobType:
    """A job type: its queue, the workers that can do it, and the workers
    among them with a free slot, longest-waiting first."""

    __slots__ = ("name", "do_prefix", "queue", "queued", "running", "workers", "idle", "done",
                 "failed", "later")

    def __init__(self, name):
        self.name = name
        # Everything of a worker's `do` line that follows the wid.
        self.do_prefix = b',"type":' + dumps(name) + b',"arg":'
        self.queue = JobQueue()
        self.queued = 0
        self.running = 0
        self.workers = 0
        self.idle = OrderedDict()   # Peer -> None; O(1) pop of the longest waiting
        self.done = 0
        self.failed = 0
        self.later = None           # a timer: the rest of a long set-aside, next turn

    def stats(self):
        return {"queued": self.queued, "running": self.running, "workers": self.workers,
                "idle": len(self.idle), "done": self.done, "failed": self.failed}


class Peer:
    """The broker's view of one connection: what it can do, the jobs it holds
    as a worker, and the jobs it submitted and waits for. (The server's
    Connection is a Peer itself; the broker's tests use bare ones.)"""

    # What every job reads of its worker comes first, in as few cache lines
    # as possible: with 10,000 workers, each job goes to a cold one.
    __slots__ = ("link", "held", "capacity", "kind_list", "paused", "closed", "later", "jobs",
                 "kinds", "got_results", "deadlines", "held_back", "authed", "name")

    def __init__(self, link, name=""):
        # The connection: link.send(bytes), link.send_now(bytes, when nothing
        # else is expected this turn: sent at once unless a flush is due)
        # and link.send_many(pieces of one message) never block;
        # link.close() ends it. (Called through link, not kept as bound
        # methods: fewer objects to touch per job.)
        self.link = link
        self.name = name
        self.kinds = {}             # JobType -> None (ordered: can_do order)
        self.kind_list = ()         # the same, to walk: one object, where a dict is two
        self.capacity = 1
        self.held = {}              # wid -> Job this worker is doing
        self.jobs = {}              # submitter id -> Job not yet answered
        self.paused = False         # output over the high-water mark
        self.held_back = {}         # its queued jobs set aside while paused (ordered)
        self.deadlines = None       # submitter id -> timeout timer, when used
        self.closed = False
        self.authed = False
        self.later = None           # a timer: more jobs for it next turn (worker_ready)
        self.got_results = False    # a drain waits for its output to be delivered


class Counters:
    """The server-wide figures of `metrics`, but for the jobs queued,
    running, done and failed: those are kept per type only, and summed
    when asked for (Broker.job_totals), rather than counted twice per job."""

    def __init__(self):
        self.up_since = int(time.time() * 1000)
        self.connections = 0
        self.connections_open = 0
        self.workers = 0
        self.jobs_added = 0
        self.jobs_dispatched = 0
        self.jobs_reassigned = 0
        self.jobs_abandoned = 0
        self.jobs_coalesced = 0
        self.jobs_timed_out = 0
        self.jobs_cancelled = 0
        self.jobs_released = 0
        self.jobs_background = 0


def counted(n, noun):
    """ "1 job", "2 jobs": for the log and the failure texts."""
    return "%d %s%s" % (n, noun, "" if n == 1 else "s")


def lost_worker_failure(attempts):
    """The err of a job whose every attempt was lost with its worker."""
    return "job failed: its worker was lost %s" % (
        "once" if attempts == 1 else "%d times" % attempts)


def ttr_failure(attempts):
    """The err of a job whose last lost attempt ran past its ttr."""
    return "job failed: %s lost, the last by running past its ttr" % counted(attempts, "attempt")


class Broker:
    """Matches jobs with worker slots. Single-threaded (one gevent hub), so
    no locks: every method runs to completion."""

    def __init__(self, max_attempts=DEFAULT_MAX_ATTEMPTS, default_ttr=None, loop=None,
                 max_types=DEFAULT_MAX_TYPES):
        self.max_attempts = max_attempts
        self.max_types = max_types
        self.default_ttr = default_ttr
        self.loop = loop or gevent.get_hub().loop
        self.kinds = {}             # type name -> JobType, oldest first
        self.new_kinds = self.new_kind_bytes = 0    # made since forget_unused_kinds
        self.forgotten = {"jobs_done": 0, "jobs_failed": 0}     # of the types forgotten
        self.unique = {}            # (type name, key) -> Job
        self.counters = Counters()
        self.next_seq = 0
        self.next_wid = 0
        self.draining = False
        self.busy_kinds = []        # draining: the types that still had jobs running
        self.drained = gevent.event.Event()

    # -- connections ---------------------------------------------------------

    def connect(self, peer):
        self.counters.connections += 1
        self.counters.connections_open += 1
        return peer

    def disconnect(self, peer):
        """A connection closed: give back what it held, drop what it asked for."""
        for _ in self.leave(peer):
            pass

    def leave(self, peer):
        """disconnect() in steps: a generator that pauses every
        LEAVE_PER_TURN queued jobs, so that the connection's greenlet can
        let the others have their turn (dropping a million queued jobs took
        0.8 s). Meanwhile the peer counts as paused, so none of its queued
        jobs is handed out (SPEC 2.6)."""
        if peer.closed:
            return
        peer.closed = True
        peer.paused = True
        if peer.later is not None:
            peer.later.close()
            peer.later = None
        c = self.counters
        c.connections_open -= 1
        self.cant_do(peer, [kind.name for kind in peer.kinds])
        # Its running jobs at once, so that no result reaches it between the
        # steps (each is abandoned); cancelling a running unique job frees
        # a worker, which its queued jobs cannot go to: it is paused. Its
        # own submissions before what it held, so that a job it both
        # submitted and held is not handed out again.
        running = [sub_id for sub_id, job in peer.jobs.items() if job.state == RUNNING]
        for sub_id in running:
            self.detach_if_waiting(peer, sub_id)
        self.requeue_lost(peer)
        for count, sub_id in enumerate(list(peer.jobs), 1):
            if not count % LEAVE_PER_TURN:
                yield
            self.detach_if_waiting(peer, sub_id)

    def detach_if_waiting(self, peer, sub_id):
        """Looked up again: a detach can split off a job of its own for
        another of peer's ids (two ids joined to one job); and between
        leave()'s steps a job may have finished."""
        job = peer.jobs.get(sub_id)
        if job is not None:
            self.detach(peer, sub_id, job, cancel_running=False)

    def kind(self, name):
        kind = self.kinds.get(name)
        if kind is None:
            self.new_kinds += 1
            self.new_kind_bytes += len(name)
            if self.new_kinds > KEEP_UNUSED_TYPES or self.new_kind_bytes > KEEP_UNUSED_TYPE_BYTES:
                self.forget_unused_kinds()
            kind = self.kinds[name] = JobType(name)
        return kind

    def forget_unused_kinds(self):
        """Types are kept once seen (metrics lists them, with their counts),
        but not without bound: of the types nothing is queued, running or
        able to do, only the newest KEEP_UNUSED_TYPES (KEEP_UNUSED_TYPE_BYTES
        of names) are kept. Their done and failed counts stay in the totals.
        Runs once per KEEP_UNUSED_TYPES new types (or bytes of their names)."""
        self.new_kinds = self.new_kind_bytes = 0
        unused = [kind for kind in self.kinds.values()
                  if not (kind.queued or kind.running or kind.workers or kind.later)]
        kept_bytes = 0
        keep = 0
        for kind in reversed(unused):       # the newest first
            kept_bytes += len(kind.name)
            if keep == KEEP_UNUSED_TYPES or kept_bytes > KEEP_UNUSED_TYPE_BYTES:
                break
            keep += 1
        forgotten = self.forgotten
        for kind in unused[:len(unused) - keep]:
            forgotten["jobs_done"] += kind.done
            forgotten["jobs_failed"] += kind.failed
            del self.kinds[kind.name]

    # -- workers -------------------------------------------------------------

    def can_do(self, peer, names, capacity=None):
        new = [name for name in dict.fromkeys(names) if self.kinds.get(name) not in peer.kinds]
        if len(peer.kinds) + len(new) > self.max_types:
            raise ProtocolError("can_do: one connection can do at most %d types (--max-types)"
                                % self.max_types)
        if capacity is not None:
            peer.capacity = capacity
        if names and not peer.kinds:
            self.counters.workers += 1
        for name in names:
            kind = self.kind(name)
            if kind not in peer.kinds:
                peer.kinds[kind] = None
                kind.workers += 1
        peer.kind_list = tuple(peer.kinds)
        self.worker_ready(peer)

    def cant_do(self, peer, names):
        had_kinds = bool(peer.kinds)
        for name in names:
            kind = self.kinds.get(name)
            if kind is not None and kind in peer.kinds:
                del peer.kinds[kind]
                kind.workers -= 1
                kind.idle.pop(peer, None)
        peer.kind_list = tuple(peer.kinds)
        if had_kinds and not peer.kinds:
            self.counters.workers -= 1

    def worker_ready(self, peer):
        """peer may have free slots: fill them from its queues, oldest
        (highest priority) job first across its types, then park it. At
        most HAND_OUT_PER_TURN jobs at once: a worker with a huge capacity
        gets the rest in later turns, after everyone else's."""
        held, capacity = peer.held, peer.capacity
        given = 0
        if len(peer.kind_list) > FEW_TYPES:
            given = self.hand_out_over_many_types(peer)
        else:
            while len(held) < capacity and not self.draining and not peer.paused:
                kinds = peer.kind_list
                if len(kinds) == 1:     # the usual worker: best_job_for's comparing is
                    kind = kinds[0]     # for several (~900 instructions a job less)
                    job = self.dispatchable_head(kind) if kind.queued else None
                else:
                    job = self.best_job_for(kinds)
                if job is None:
                    break
                job.kind.queue.pop_head()
                self.assign(job, peer)
                given += 1
                if given == HAND_OUT_PER_TURN:
                    self.in_next_turn(peer, self.ready_again)
                    break
        if len(held) < capacity and not peer.paused and not peer.closed:     # a free slot
            for kind in peer.kind_list:
                if peer not in kind.idle:
                    kind.idle[peer] = None
                elif given:         # it just got work: to the back of the line
                    kind.idle.move_to_end(peer)
        else:                       # full, e.g. after its capacity was lowered
            for kind in peer.kind_list:
                kind.idle.pop(peer, None)

    def hand_out_over_many_types(self, peer):
        """worker_ready's hand-out for a worker of many types: the head job
        of each type goes into a heap once, so a job costs O(log types),
        not a look at every type (a can_do of 10,000 types, each with jobs
        queued, stalled everyone for 5 s a turn). -> how many it gave."""
        held = peer.held
        limit = min(peer.capacity, len(held) + HAND_OUT_PER_TURN)
        heads = []
        if len(held) < limit:
            for kind in peer.kinds:
                self.push_head(heads, kind)
        given = 0
        while heads and len(held) < limit and not self.draining and not peer.paused:
            job = heapq.heappop(heads)[-1]
            job.kind.queue.pop_head()
            self.assign(job, peer)
            given += 1
            self.push_head(heads, job.kind)
        if heads and len(held) == limit < peer.capacity:
            self.in_next_turn(peer, self.ready_again)
        return given

    def push_head(self, heads, kind):
        """kind's next job, if any, onto the heap of heads: highest priority,
        then oldest, first (as best_job_for orders them)."""
        if kind.queued:
            job = self.dispatchable_head(kind)
            if job is not None:
                heapq.heappush(heads, (-job.priority, job.seq, id(job), job))

    def ready_again(self, peer):
        if not peer.closed:
            self.worker_ready(peer)

    def best_job_for(self, kinds):
        best = None
        for kind in kinds:
            if not kind.queued:
                continue
            job = self.dispatchable_head(kind)
            if job is not None and (best is None or job.priority > best.priority or
                                    (job.priority == best.priority and job.seq < best.seq)):
                best = job
        return best

    def dispatchable_head(self, kind):
        """The queue's next job that no paused submitter waits for (SPEC 5: a
        connection past its high-water mark takes no more results): a job
        only paused submitters wait for is set aside until one of them
        drains; one that others wait for too goes ahead without them."""
        queue = kind.queue
        budget = SET_ASIDE_PER_TURN
        while True:
            job = queue.head()
            if job is None:
                return None
            owner = job.owner
            if not job.joined and (owner is None or not owner.paused):
                return job          # the usual case: one submitter that reads, or bg
            if self.without_paused_submitters(job):
                return job
            budget -= 1
            if not budget:          # a paused connection's long run of jobs: go on next turn
                self.in_next_turn(kind, self.kick)
                return None

    def in_next_turn(self, owner, callback):
        """callback(owner) in the loop's next turn, after everyone else's,
        once however often asked: a peer's or a job type's long run of work
        goes on there (owner.later holds the timer meanwhile)."""
        if owner.later is None:
            owner.later = self.start_timer(0, self.next_turn_came, owner, callback)

    def next_turn_came(self, owner, callback):
        owner.later.close()
        owner.later = None
        callback(owner)

    def without_paused_submitters(self, job):
        """job, at the head of its queue, has a submitter that is paused. If
        nobody else waits for it, set it aside for that one (False). Else it
        goes ahead (True), and each paused submitter gets a run of its own,
        set aside in the same way: so a paused connection never piles up the
        results of jobs that others made run, however many it joined."""
        if not job.joined and not job.bg:      # only its owner waits (a long run, often)
            job.kind.queue.pop_head()
            self.set_aside(job, {job.owner: None})
            return False
        waiting = job.submitters()
        paused = [entry for entry in waiting if entry[0].paused]
        if len(paused) == len(waiting) and not job.bg:
            job.kind.queue.pop_head()
            # Under each of them: the first to drain brings it back.
            self.set_aside(job, dict.fromkeys(peer for peer, _ in paused))
            return False
        for peer, sub_id in paused:
            self.split_off(job, peer, sub_id)
        return True

    def set_aside(self, job, peers):
        """Keep a queued job out of its queue until one of peers (a dict's
        keys), all paused, drains."""
        job.held_back = peers
        for peer in peers:
            peer.held_back[job] = None

    def split_off(self, job, peer, sub_id):
        """peer stops waiting for job under sub_id and waits for a job of its
        own instead, set aside until it drains."""
        if job.owner is peer and job.owner_id == sub_id:
            job.owner = None
        else:
            del job.joined[(peer, sub_id)]
        own = peer.jobs[sub_id] = job.copy_for(peer, sub_id)
        job.kind.queued += 1
        self.set_aside(own, {peer: None})

    def put_back(self, job):
        """A set-aside job returns to the front of its queue, to be looked at
        again: whoever of its submitters is still paused is split off then."""
        for peer in job.held_back:
            peer.held_back.pop(job, None)
        job.held_back = None
        job.kind.queue.push_front(job)

    def assign(self, job, peer, last_slot=False):
        """Hand job to peer: a new wid for every hand-out, so a late answer
        for an earlier hand-out can never finish this one. last_slot: it
        fills the idle worker's last free slot, so its `do` goes out at
        once (see Connection.send_now)."""
        kind = job.kind
        kind.queued -= 1
        kind.running += 1
        self.counters.jobs_dispatched += 1
        self.next_wid += 1
        wid = job.wid = self.next_wid
        job.state = RUNNING
        job.worker = peer
        peer.held[wid] = job
        if job.ttr is not None:
            job.ttr_timer = self.start_timer(job.ttr, self.ttr_expired, job, wid)
        if len(job.arg_tail) < BIG_PIECE:
            line = b'{"cmd":"do","id":%d%b%b' % (wid, kind.do_prefix, job.arg_tail)
            if last_slot:
                peer.link.send_now(line)
            else:
                peer.link.send(line)
        elif type(job.arg_tail) is memoryview:      # a big string, as it was sent
            peer.link.send_many((b'{"cmd":"do","id":%d%b' % (wid, kind.do_prefix), job.arg_tail,
                                 b"}\r\n"))
        else:                       # a big payload goes out as it is, not copied again
            peer.link.send_many((b'{"cmd":"do","id":%d%b' % (wid, kind.do_prefix), job.arg_tail))

    def assign_idle(self, job, peer):
        """assign() to a worker from an idle list: full, it leaves the
        lists; else it goes to the back of them."""
        last_slot = len(peer.held) + 1 >= peer.capacity
        self.assign(job, peer, last_slot)
        if last_slot:
            for other in peer.kind_list:
                other.idle.pop(peer, None)
        else:
            for other in peer.kind_list:
                if peer in other.idle:
                    other.idle.move_to_end(peer)

    def kick(self, kind):
        """Give kind's queued jobs to its idle workers, HAND_OUT_PER_TURN at
        most before the others have a turn (a worker of huge capacity)."""
        idle = kind.idle
        budget = HAND_OUT_PER_TURN
        while idle and kind.queued and not self.draining:
            job = self.dispatchable_head(kind)
            if job is None:
                return
            kind.queue.pop_head()
            self.assign_idle(job, next(iter(idle)))
            budget -= 1
            if not budget:
                return self.in_next_turn(kind, self.kick)

    # -- submitters ----------------------------------------------------------

    def submit(self, peer, job):
        """A `do`, parsed into job: queue it, coalesce it onto an unfinished
        job with its unique key, or hand it straight to a worker."""
        sub_id = job.owner_id
        if self.draining:
            raise ProtocolError("draining", sub_id)
        if sub_id in peer.jobs:
            raise ProtocolError("duplicate id: a job with this id is unfinished", sub_id)
        kind = self.kinds.get(job.kind) or self.kind(job.kind)
        c = self.counters
        c.jobs_added += 1
        if job.unique is not None:
            existing = self.unique.get((kind.name, job.unique))
            if existing is not None:
                return self.join(existing, peer, job)
            self.unique[(kind.name, job.unique)] = job
        job.kind = kind
        if job.ttr is None:
            job.ttr = self.default_ttr
        self.next_seq += 1
        job.seq = self.next_seq
        if job.bg:
            c.jobs_background += 1
            peer.link.send(b'{"cmd":"queued","id":%s}\r\n' % dumps(sub_id))
            if job.timeout is not None:
                self.start_bg_deadline(job, job.timeout)
        else:
            job.owner = peer
            peer.jobs[sub_id] = job
            if job.timeout is not None:
                self.start_deadline(peer, sub_id, job.timeout)
        kind.queued += 1
        idle = kind.idle
        if idle and not peer.paused and not kind.queue.by_priority:
            self.assign_idle(job, next(iter(idle)))     # the common case: no queue
        else:
            kind.queue.push(job)
            if idle:
                self.kick(kind)

    def join(self, job, peer, sub):
        """Coalesce a submission (sub, a job not taken in) onto an unfinished
        job with the same unique key."""
        self.counters.jobs_coalesced += 1
        if sub.bg:
            job.bg += 1
            self.counters.jobs_background += 1
            peer.link.send(b'{"cmd":"queued","id":%s}\r\n' % dumps(sub.owner_id))
            if sub.timeout is not None:
                self.start_bg_deadline(job, sub.timeout)
            return self.unhold(job)
        if job.joined is None:
            job.joined = {}     # (peer, id) -> None: ordered, and one leaves in O(1)
        job.joined[(peer, sub.owner_id)] = None
        peer.jobs[sub.owner_id] = job
        if sub.timeout is not None:
            self.start_deadline(peer, sub.owner_id, sub.timeout)
        self.unhold(job)

    def unhold(self, job):
        """Others wait for a set-aside job now: it may go ahead again."""
        if job.held_back is not None:
            self.put_back(job)
            self.kick(job.kind)

    def cancel(self, peer, sub_id):
        job = peer.jobs.get(sub_id)
        if job is None:
            raise ProtocolError("no unfinished job with this id", sub_id)
        self.counters.jobs_cancelled += 1
        self.detach(peer, sub_id, job, cancel_running=True)
        peer.link.send(b'{"cmd":"did","id":%s,"err":"cancelled"}\r\n' % dumps(sub_id))

    def detach(self, peer, sub_id, job, cancel_running):
        """peer stops waiting for job under sub_id (it cancelled, timed out or
        left). The job itself ends only when nobody else waits for it."""
        del peer.jobs[sub_id]
        self.stop_deadline(peer, sub_id)
        was_set_aside = job.held_back is not None and peer in job.held_back
        if was_set_aside:               # back in line, for whoever else waits for it
            self.put_back(job)
        if job.owner is peer and job.owner_id == sub_id:
            job.owner = None
        elif job.joined:
            job.joined.pop((peer, sub_id), None)
        if job.wanted():
            if was_set_aside:           # it may go ahead now, for the others
                self.kick(job.kind)
            return
        if not cancel_running:
            self.counters.jobs_abandoned += 1
        # A plain job whose submitter left runs on and its result is dropped
        # (SPEC 2.6, the seed's rule); a unique job is cancelled at its
        # worker once no submitter is left, however they went (SPEC 7).
        self.end_unwanted(job, cancel_running or job.unique is not None)

    def end_unwanted(self, job, cancel_running):
        """Nobody waits for job any more: drop it if queued; if running, cancel
        it at its worker, or let it run on and drop its result."""
        if job.state == QUEUED:
            self.drop_queued(job)
        elif job.state == RUNNING and cancel_running:
            self.take_back(job)
            self.forget(job)
            job.state = FINISHED
            worker = job.worker
            worker.link.send(encode_cancel(job.wid))
            self.worker_ready(worker)
        # A running job nobody waits for any more runs on; its result is dropped.

    def drop_queued(self, job):
        job.state = FINISHED
        kind = job.kind
        kind.queued -= 1
        kind.queue.forget_one(kind.queued)      # its entry stays, dead, in the queue
        self.forget(job)

    def forget(self, job):
        """job is over: it no longer takes joiners, its deadlines are moot."""
        if job.bg_deadlines:
            for timer in job.bg_deadlines:
                timer.close()
            job.bg_deadlines = None
        if job.unique is not None and self.unique.get((job.kind.name, job.unique)) is job:
            del self.unique[(job.kind.name, job.unique)]

    def resume_submitter(self, peer):
        """Its output drained: the jobs set aside for it (and perhaps for
        other paused submitters too) go back to the front, newest first so
        that they keep their order."""
        held_back, peer.held_back = peer.held_back, {}
        kinds = {}
        for job in reversed(held_back):
            self.put_back(job)
            kinds[job.kind] = None
        for kind in kinds:
            self.kick(kind)

    # -- results -------------------------------------------------------------

    def take_back(self, job):
        """The worker no longer holds job (done, lost, cancelled, released)."""
        del job.worker.held[job.wid]
        job.kind.running -= 1
        if job.ttr_timer is not None:
            job.ttr_timer.close()
            job.ttr_timer = None
        if self.draining:
            self.check_drained()

    def held_job(self, peer, wid):
        job = peer.held.get(wid)
        if job is None:
            raise ProtocolError("no such job held by this connection", wid)
        return job

    def did(self, peer, wid, res_json, err):
        """A worker finished (res_json) or failed (err) the job it holds as wid."""
        job = peer.held.get(wid)
        if job is None:
            raise ProtocolError("no such job held by this connection", wid)
        self.take_back(job)
        job.state = FINISHED
        if err is None:
            job.kind.done += 1
            self.deliver(job, b',"res":', res_json)
        else:
            self.fail(job, err)
        self.worker_ready(peer)

    def fail(self, job, err):
        job.state = FINISHED
        job.kind.failed += 1
        self.deliver(job, b',"err":', dumps(err))

    def deliver(self, job, field, value_json):
        """Send every waiting submitter its `did`, under its own id."""
        if job.unique is not None or job.bg_deadlines:     # else forget() has nothing to do
            self.forget(job)
        owner = job.owner
        if owner is not None:
            sub_id = job.owner_id
            del owner.jobs[sub_id]          # answered(), inlined: once per job
            owner.got_results = True
            if owner.deadlines:
                self.stop_deadline(owner, sub_id)
            if len(value_json) >= BIG_PIECE:    # a big payload goes out as it is, not copied
                owner.link.send_many((reply_prefix(sub_id) + field, value_json, b"}\r\n"))
            elif type(sub_id) is int:
                owner.link.send(b'{"cmd":"did","id":%d%b%b}\r\n' % (sub_id, field, value_json))
            else:
                owner.link.send(b'{"cmd":"did","id":%b%b%b}\r\n' % (dumps(sub_id), field, value_json))
        if job.joined:      # one value for every joined submitter, not a copy each
            for peer, sub_id in job.joined:
                self.answered(peer, sub_id)
                peer.got_results = True
                peer.link.send_many((reply_prefix(sub_id) + field, value_json, b"}\r\n"))

    def answered(self, peer, sub_id):
        del peer.jobs[sub_id]
        if peer.deadlines:
            self.stop_deadline(peer, sub_id)

    def progress(self, peer, wid, data_json):
        job = self.held_job(peer, wid)
        for sub_peer, sub_id in job.submitters():
            if sub_peer.paused:         # advisory: dropped rather than piled up
                continue
            sub_peer.link.send(b"".join((b'{"cmd":"progress","id":', dumps(sub_id), b',"data":',
                                    data_json, b"}\r\n")))

    def release(self, peer, wid):
        """A worker gives a job back undone: not a lost attempt."""
        job = self.held_job(peer, wid)
        self.take_back(job)
        self.counters.jobs_released += 1
        if not job.wanted():            # its submitters left: drop, don't redo
            job.state = FINISHED
            self.forget(job)
            return self.worker_ready(peer)
        self.requeue_front(job)
        for kind in peer.kinds:     # others first: it just said it has no room
            if peer in kind.idle:
                kind.idle.move_to_end(peer)
        self.kick(job.kind)
        self.worker_ready(peer)

    def requeue_front(self, job):
        job.state = QUEUED
        job.worker = None
        job.kind.queued += 1
        job.kind.queue.push_front(job)

    def requeue_lost(self, peer):
        """peer is gone: each job it held goes back to the front of its queue
        (in the order they were handed out), or fails after max_attempts."""
        jobs = list(peer.held.values())
        kinds = set()
        for job in reversed(jobs):
            self.take_back(job)
            if self.lost_attempt(job):
                kinds.add(job.kind)
        for kind in kinds:
            self.kick(kind)

    def lost_attempt(self, job, failure=lost_worker_failure):
        """Count a lost hand-out; requeue the job (True) or fail it with
        failure(attempts), which says how the last attempt was lost."""
        if not job.wanted():        # nobody waits for it: no point redoing it
            job.state = FINISHED
            self.forget(job)
            return False
        job.attempts += 1
        if job.attempts >= self.max_attempts:
            self.fail(job, failure(job.attempts))
            return False
        self.counters.jobs_reassigned += 1
        self.requeue_front(job)
        return True

    # -- timers --------------------------------------------------------------

    def start_timer(self, seconds, callback, *args):
        """A timer that fires `seconds` from now: the loop's clock is read
        afresh (as gevent.Timeout does), else the timer would count from
        the start of this loop turn, which a busy turn makes long ago."""
        timer = self.loop.timer(seconds)
        timer.start(callback, *args, update=True)
        return timer

    def ttr_expired(self, job, wid):
        """The worker kept the job past its ttr: take it back (SPEC 7)."""
        worker = job.worker
        if job.state != RUNNING or job.wid != wid or worker is None:
            return
        self.take_back(job)
        worker.link.send(encode_cancel(wid))
        if self.lost_attempt(job, ttr_failure):
            self.kick(job.kind)
        self.worker_ready(worker)

    def start_deadline(self, peer, sub_id, seconds):
        if peer.deadlines is None:
            peer.deadlines = {}
        peer.deadlines[sub_id] = self.start_timer(seconds, self.deadline_passed, peer, sub_id)

    def stop_deadline(self, peer, sub_id):
        if peer.deadlines:
            timer = peer.deadlines.pop(sub_id, None)
            if timer is not None:
                timer.close()

    def start_bg_deadline(self, job, seconds):
        if job.bg_deadlines is None:
            job.bg_deadlines = []
        job.bg_deadlines.append(self.start_timer(seconds, self.bg_deadline_passed, job))

    def bg_deadline_passed(self, job):
        """A background submission's timeout: it stops keeping the job alive;
        no `did` is sent (nobody waits for one)."""
        if job.state == FINISHED:
            return
        job.bg -= 1
        self.counters.jobs_timed_out += 1
        if not job.wanted():
            self.end_unwanted(job, cancel_running=True)

    def deadline_passed(self, peer, sub_id):
        peer.deadlines.pop(sub_id, None)
        job = peer.jobs.get(sub_id)
        if job is None or peer.closed:
            return
        self.counters.jobs_timed_out += 1
        self.detach(peer, sub_id, job, cancel_running=True)
        peer.link.send(b'{"cmd":"did","id":%s,"err":"timeout"}\r\n' % dumps(sub_id))

    # -- backpressure --------------------------------------------------------

    def pause(self, peer):
        """peer's unsent output is over the high-water mark: no new jobs for
        it as a worker, none of its queued jobs handed out as a submitter."""
        peer.paused = True
        for kind in peer.kinds:
            kind.idle.pop(peer, None)

    def resume(self, peer):
        if peer.closed:     # stays paused: a departing peer's jobs must not go out (leave())
            return
        peer.paused = False
        self.resume_submitter(peer)
        self.worker_ready(peer)

    # -- draining and metrics ------------------------------------------------

    def start_draining(self):
        """SIGTERM: no new jobs, none handed out; wait for the running ones."""
        self.draining = True
        # Nothing is handed out from now on, so these only get fewer: each
        # finished job costs check_drained O(1), however many types exist.
        self.busy_kinds = [kind for kind in self.kinds.values() if kind.running]
        self.check_drained()

    def check_drained(self):
        busy = self.busy_kinds
        while busy and not busy[-1].running:
            busy.pop()
        if self.draining and not busy:
            self.drained.set()

    def job_totals(self):
        """Jobs done, failed, queued and running, over every type."""
        totals = dict(self.forgotten, jobs_queued=0, jobs_running=0)
        for kind in self.kinds.values():
            totals["jobs_done"] += kind.done
            totals["jobs_failed"] += kind.failed
            totals["jobs_queued"] += kind.queued
            totals["jobs_running"] += kind.running
        return totals

    def metrics(self):
        figures = dict(vars(self.counters))
        figures.update(self.job_totals())
        figures["types"] = {name: kind.stats() for name, kind in self.kinds.items()}
        return figures


###############################################################################
# Connections: one greenlet per socket owns it; an event-loop callback reads
# and handles its lines (TLS: the greenlet reads). What the broker sends is
# written once per turn of the event loop, in one send.
# Past the high-water mark of unsent output the connection is paused
# (SPEC 5).
###############################################################################

def unsent_part(pieces, sent):
    """What is left of pieces once the first `sent` bytes went out."""
    for index, piece in enumerate(pieces):
        if sent < len(piece):
            return [piece[sent:]] + pieces[index + 1:]
        sent -= len(piece)
    return []


# Linux: the bytes a TCP socket sent that its peer has not acknowledged yet.
TIOCOUTQ = getattr(termios, "TIOCOUTQ", None)


def unacknowledged(sock):
    """What the kernel still holds of what sock sent over TCP (0 where the
    system cannot tell). Exiting with a peer's input unread resets the
    connection, and the reset drops these bytes: a result handed to the
    kernel is not yet delivered."""
    if TIOCOUTQ is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def format_address(address):
    if isinstance(address, tuple) and len(address) >= 2:
        return "%s:%s" % address[:2]
    return str(address or "unix")


class LogThrottle:
    """At most `burst` lines per `window` seconds of the messages one
    connection can cause (a refused line, a failed auth or TLS handshake):
    a client reconnecting in a loop must not fill the disk with them. What
    was held back is counted in the first line of the next window."""

    def __init__(self, burst=20, window=10.0):
        self.burst, self.window = burst, window
        self.window_ends = float("-inf")
        self.logged = self.held_back = 0

    def log(self, level, text, *args):
        now = monotonic()
        if now >= self.window_ends:
            if self.held_back:
                log.log(level, "(%d more such messages in %.0f s were not logged)",
                        self.held_back, self.window)
            self.window_ends, self.logged, self.held_back = now + self.window, 0, 0
        if self.logged < self.burst:
            self.logged += 1
            log.log(level, text, *args)
        else:
            self.held_back += 1


AUTH_LINE = 64 * 1024       # the longest line before authentication (or 6 x the secret)


def auth_line_limit(server):
    """Until a connection authenticates, only `auth` is read: a line needs
    room for the secret (JSON escapes make a character up to 6 bytes), not
    --max-line, so that strangers cannot make the server hold 1 MiB each."""
    return min(server.max_line, max(AUTH_LINE, 6 * len(server.secret) + 100))


class Connection(Peer):
    """One client socket, from accept to close. It is its own Peer: one
    object per connection rather than two, for the CPU cache's sake (see
    __slots__).

    Writes: send() only appends to a list. Once per turn of the event loop a
    hub callback hands everything queued to the kernel in one non-blocking
    send, without a greenlet switch (the replies to a batch the connection
    read itself go out at the end of that batch, the same way); only when
    the kernel's buffer is full
    does the writer greenlet take over and wait for the socket (TLS sockets
    always use the writer greenlet)."""

    # Slots keep a connection's state in one compact object: with 10,000
    # workers, each job touches a connection that is cold in the CPU cache.
    # What a job's hand-out and answer read comes first, after Peer's (the
    # socket itself is reached through raw: a bound method of it kept in
    # a slot would be one more cold object).
    __slots__ = ("out", "out_bytes", "flush_scheduled", "writer_owns_socket", "raw", "loop",
                 "high_water", "partial", "handlers", "long_line", "closing", "broker",
                 "max_line", "partial_len", "pending", "watcher", "server", "sock", "done_reading",
                 "writer", "wake_writer", "may_read", "logged_error", "turn", "auth_deadline")

    def __init__(self, server, sock, address, auth_deadline=None):
        Peer.__init__(self, self, format_address(address))
        self.server = server
        self.broker = server.broker
        self.sock = sock
        self.set_max_line(server.max_line if server.secret is None else auth_line_limit(server))
        self.high_water = server.high_water
        self.out = []               # bytes not yet given to the kernel
        self.out_bytes = 0          # their total
        self.flush_scheduled = False
        self.writer_owns_socket = False
        raw = getattr(sock, "_sock", None)
        plain = isinstance(raw, socket.SocketType) and not hasattr(sock, "getpeercert")  # no TLS
        self.raw = raw if plain else None
        self.loop = gevent.get_hub().loop
        self.watcher = None         # reads in the hub: see read_in_hub
        self.turn = None            # a timer: the pending lines' next turn
        self.done_reading = None
        self.pending = None         # lines read but not handled: paused mid-batch
        self.partial = []           # pieces of a line not yet ended
        self.partial_len = 0
        self.writer = None          # a greenlet, started the first time it is needed
        self.wake_writer = gevent.event.Event()
        self.may_read = gevent.event.Event()
        self.may_read.set()
        self.closing = False        # set by a fatal error: flush, then close
        self.logged_error = False
        self.auth_deadline = auth_deadline      # a gevent.Timeout until it authenticates
        self.broker.connect(self)
        self.handlers = BEFORE_AUTH
        if server.secret is None:
            self.authenticated()

    def authenticated(self):
        self.stop_auth_deadline()
        self.authed = True
        self.handlers = COMMANDS
        self.set_max_line(self.server.max_line)

    def set_max_line(self, max_line):
        self.max_line = max_line
        # handle_lines looks closer at lines this long: too long, or big
        self.long_line = min(BIG_PIECE, max_line + 1)

    # -- the broker's interface ----------------------------------------------

    def send(self, data):
        """Queue bytes for the socket; never blocks."""
        self.out.append(data)
        self.out_bytes += len(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.run_callback(self.flush)
        if self.out_bytes > self.high_water and not self.paused:
            self.pause()

    def send_now(self, data):
        """send(), when nothing else is likely to follow in this turn (a
        worker given the job that fills its last slot): to the kernel at
        once, unless a flush is due anyway. With 10,000 workers a
        flush in a callback of its own found the connection cold again,
        after the rest of the submitter's batch. With nothing queued it
        skips the output list altogether (2,500 fewer instructions a job
        in bench/instructions.py, 79,800 -> 77,300)."""
        if self.out_bytes or self.flush_scheduled or self.writer_owns_socket or self.raw is None:
            self.out.append(data)           # goes with the rest, in order
            self.out_bytes += len(data)
            if not self.flush_scheduled:
                self.flush()
        else:
            self.send_first(data)
        if self.out_bytes > self.high_water and not self.paused:
            self.pause()

    def send_first(self, data):
        """Nothing is queued and no writer waits: data to the kernel
        straight away; what it does not take goes to the writer greenlet,
        as flush()'s would."""
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return self.broken()
        if sent < len(data):
            self.out.append(data[sent:])
            self.out_bytes += len(data) - sent
            self.hand_to_writer()

    def send_many(self, pieces):
        """Queue a message given in pieces (shared bytes are not copied)."""
        for piece in pieces:
            self.send(piece)

    def close(self):
        self.closing = True
        # It ends anyway: an auth deadline firing meanwhile would add a
        # second error (a wrong secret's, then the deadline's)
        self.stop_auth_deadline()
        self.may_read.set()
        if self.watcher is not None:
            self.finish_reading()

    def pause(self):
        self.may_read.clear()
        if self.watcher is not None:
            self.watcher.stop()
        self.broker.pause(self)

    def resume(self):
        self.may_read.set()
        self.broker.resume(self)
        if self.watcher is not None:
            # In a turn of its own: resume() runs inside a flush, and a
            # connection that keeps asking for big replies (metrics with
            # 10,000 types) and reading them would else never let go.
            self.next_turn()

    # -- reading -------------------------------------------------------------

    def serve(self):
        """The connection's greenlet: reads until the peer leaves, then
        tidies up. On a plain socket the reads happen in the hub (see
        read_in_hub); the greenlet only waits for the end."""
        try:
            if self.raw is not None:
                self.read_in_hub()
            else:
                self.read_loop()
        except OSError:
            pass                    # reset by peer: the same as a close
        except AuthTimeout:
            self.too_late_to_authenticate()
        except Exception:
            log.exception("%s: internal error, closing the connection", self.name)
        finally:
            self.stop_auth_deadline()       # first: leave_the_broker sleeps
            self.stop_reading_in_hub()
            self.leave_the_broker()
            if self.closing:
                self.flush_before_close()
            if self.writer is not None:
                self.writer.kill()
            self.sock.close()

    def stop_auth_deadline(self):
        deadline, self.auth_deadline = self.auth_deadline, None
        if deadline is not None:
            deadline.close()

    def too_late_to_authenticate(self):
        self.server.log_throttle.log(logging.INFO, "%s: no auth within %g s, closing",
                                     self.name, self.server.auth_timeout)
        self.send(encode_error("no auth within %g s (--auth-timeout)" % self.server.auth_timeout))
        self.closing = True

    # A plain socket is read by a callback of the event loop, not by this
    # greenlet: a worker answering one job at a time would otherwise cost two
    # greenlet switches (into the reader and back out) per job, and switching
    # among 10,000 greenlet stacks is what made 10,000 idle workers cost more
    # per job than 32 (bench/run.py: 75 -> 64 µs a job; one-at-a-time p50
    # 229 -> 198 µs). The callback does what the read loop below does, one
    # recv per readiness, and never blocks: when backpressure pauses the
    # connection mid-batch it keeps the unread lines and stops watching the
    # socket until resume().

    def leave_the_broker(self):
        """broker.disconnect(), letting the other connections have their
        turns between its steps; all at once if this greenlet is killed
        meanwhile (the server stopping)."""
        leaving = self.broker.leave(self)
        try:
            for _ in leaving:
                gevent.sleep(0.0001)    # a timer: the loop polls the sockets first
        finally:
            for _ in leaving:
                pass

    def read_in_hub(self):
        self.done_reading = gevent.event.Event()
        self.watcher = self.loop.io(self.sock.fileno(), 1)
        self.watcher.start(self.on_readable)
        self.done_reading.wait()

    def stop_reading_in_hub(self):
        """Before the socket closes: libev must not watch a closed fd."""
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()
        turn, self.turn = self.turn, None
        if turn is not None:
            turn.close()

    def on_readable(self):
        try:
            data = self.raw.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            return self.finish_reading()     # reset by peer: the same as a close
        # The replies to this batch go out in one send at its end, without
        # a callback of their own: a worker answering one job at a time
        # gets its next job in the same turn of the loop, for one
        # scheduled callback fewer per job.
        self.flush_scheduled = True
        try:
            lines = self.complete_lines(data) if data else None
            if lines is None:
                return self.finish_reading()
            rest = self.handle_lines(lines)         # continue_lines(), inlined: once per read
            if rest is not None and not self.closing:
                self.keep_for_later(rest)
        except Exception:
            log.exception("%s: internal error, closing the connection", self.name)
            self.finish_reading()
        finally:
            self.flush()

    def continue_lines(self, lines):
        rest = self.handle_lines(lines)
        if rest is not None and not self.closing:
            self.keep_for_later(rest)

    def keep_for_later(self, lines):
        """Lines not handled yet: paused (they wait for resume()), or at the
        end of this connection's turn (they go on in the next turn, after
        the other connections')."""
        self.pending = lines
        self.watcher.stop()
        if not self.paused:
            self.next_turn()

    def next_turn(self):
        """Go on with the pending lines after the other connections' turns:
        a timer of no delay fires after the loop has polled the sockets
        (a callback would run before: gevent runs 50 in a row)."""
        if self.turn is None:
            self.turn = self.loop.timer(0)
        self.turn.start(self.resume_reading_in_hub)

    def finish_reading(self):
        self.stop_reading_in_hub()
        self.done_reading.set()

    def resume_reading_in_hub(self):
        """After a pause, or at the connection's next turn: the lines kept
        from the batch first. Not once reading has finished (closed, or the
        peer left): the lines of a connection being torn down are not
        handled."""
        if self.paused or self.watcher is None:
            return
        lines, self.pending = self.pending, None
        if lines:
            self.flush_scheduled = True     # the replies go out at the end, as on_readable's
            try:
                self.continue_lines(lines)
            finally:
                self.flush()
        if self.pending is None and self.watcher is not None:
            self.watcher.start(self.on_readable)

    def complete_lines(self, data):
        """The whole lines that data completes, with what came before it;
        None when a line outgrows max_line (the connection ends)."""
        if not self.partial and data[-1:] == b"\n" and len(data) < BIG_READ:
            lines = data.split(b"\n")      # whole lines only: the usual small read
            lines.pop()
            return lines
        end = data.find(b"\n")
        if end < 0:
            self.keep_partial(data)
            if self.partial_len > self.max_line + 1:
                self.line_too_long()
                return None
            return []
        if self.partial:        # join the line it ends, not all of data; one copy
            self.partial.append(memoryview(data)[:end])
            first = b"".join(self.partial)
            self.partial.clear()
            lines, tail = split_lines(data, end + 1)
            lines.insert(0, first)
        else:                   # (not scanning the first line again)
            lines, tail = split_lines(data, 0, end)
        self.partial_len = 0
        if tail:
            self.keep_partial(tail)
            # The server's limit, not the connection's: before auth the
            # lines before it may hold the auth that lifts the lower one.
            if self.partial_len > self.server.max_line + 1:
                self.line_too_long()
                return None
        return lines

    def keep_partial(self, piece):
        """Keep a piece of a line not yet ended. Small pieces (a slow
        sender's few bytes at a time) go into one bytearray: kept as bytes
        objects of their own, a line sent a byte at a time cost 75 times
        its size. Big ones are kept as they are, to be copied only once."""
        partial = self.partial
        if len(piece) >= SMALL_PIECE:
            partial.append(piece)
        elif partial and type(partial[-1]) is bytearray:
            partial[-1] += piece
        else:
            partial.append(bytearray(piece))
        self.partial_len += len(piece)

    def read_loop(self):
        """TLS: a greenlet that reads, as gevent's examples do."""
        recv = self.sock.recv
        while not self.closing:
            if not self.may_read.is_set():
                self.may_read.wait()
                continue
            data = recv(RECV_SIZE)
            lines = self.complete_lines(data) if data else None
            if lines is None:
                return
            batch = len(lines)
            while lines is not None and not self.closing:
                lines = self.handle_lines(lines)
                if lines is not None:
                    if self.paused:
                        self.may_read.wait()
                    else:                   # its turn is over
                        self.yield_to_others()
            if batch >= YIELD_AFTER_LINES:
                self.yield_to_others()

    def yield_to_others(self):
        """(TLS) recv returns at once while data keeps coming, and
        gevent.sleep(0) does not poll for I/O; a short timer makes the loop
        poll, so every other ready connection has its turn first. (Waiting
        for the socket would stall on bytes TLS already decrypted.)"""
        gevent.sleep(0.0001)

    def handle_lines(self, lines):
        """Handles lines in order. Returns None when done, or the lines not
        yet handled: the replies paused this connection (the caller waits
        for resume, then goes on with them), or its turn is over (see
        handle_lines_in_turns)."""
        if len(lines) > TURN_CHECK:
            return self.handle_lines_in_turns(lines)
        handlers = self.handlers
        long_line = self.long_line
        for index, line in enumerate(lines):
            decode = loads
            if len(line) >= long_line:      # rare: a big line, or one too long
                max_line = self.max_line
                if len(line) > max_line and len(line) - line.endswith(b"\r") > max_line:
                    return self.line_too_long()
                if len(line) >= BIG_PIECE:
                    decode = loads_big
            try:
                try:
                    msg = decode(line)
                except JSONDecodeError:
                    if line_is_blank(line):
                        continue
                    raise
                cmd = msg["cmd"]
                handlers[cmd](self, msg, line)
            except ProtocolError as exc:       # (raised by a handler: msg is this line's)
                self.refuse(exc, line, msg)
            except Exception:
                self.refuse(self.explain(line), line)
            if self.closing:
                return None
            if self.paused:        # replies to this very batch filled the buffer
                return lines[index + 1:]
            if self.handlers is not handlers:   # auth swapped them, and the line limit
                handlers, long_line = self.handlers, self.long_line
        return None

    def handle_lines_in_turns(self, lines):
        """A big batch: past TURN_SECONDS the rest waits for this
        connection's next turn (read_in_hub: a timer; TLS: read_loop
        yields). The clock is read once per TURN_CHECK lines."""
        turn_ends = monotonic() + TURN_SECONDS
        for start in range(0, len(lines), TURN_CHECK):
            end = start + TURN_CHECK
            rest = self.handle_lines(lines[start:end])
            if rest is not None:
                return rest + lines[end:] if not self.closing else None
            if self.closing:
                return None
            if end < len(lines) and monotonic() > turn_ends:
                return lines[end:]
        return None

    def explain(self, line):
        """Why a line failed the fast path, as a ProtocolError."""
        try:
            cmd, msg = decode_line(line)
        except ProtocolError as exc:
            return exc
        if cmd not in self.handlers:
            if not self.authed:
                return ProtocolError("authentication required: send auth first")
            return ProtocolError("unknown cmd %r" % cmd[:100], msg.get("id", NO_ID))
        log.exception("%s: internal error on a %s message", self.name, cmd)
        return ProtocolError("internal error on a %s message" % cmd, msg.get("id", NO_ID))

    def refuse(self, exc, line, msg=None):
        """Answer a refused line with an error carrying its id, if it had
        one (SPEC 1), whatever the command and whatever was wrong with it.
        msg: the line as orjson read it, when it could."""
        id = exc.id
        if id is NO_ID and msg is not None:
            id = msg.get("id", NO_ID)
        if (id is NO_ID and msg is None) or type(id) is float:  # unread, or orjson's
            id = salvage_id(line)                               # float for a big integer
        self.send(encode_error(exc.text, id))
        if not self.logged_error:
            self.logged_error = True
            self.server.log_throttle.log(
                logging.INFO, "%s: refused a message: %s (further errors on this connection "
                "are not logged)", self.name, exc.text)
        if not self.authed:
            self.close()

    def line_too_long(self):
        self.send(encode_error("line too long (limit %d bytes)" % self.max_line))
        self.server.log_throttle.log(logging.INFO, "%s: line too long, closing", self.name)
        self.close()

    # -- commands ------------------------------------------------------------

    def on_do(self, msg, line):
        self.broker.submit(self, parse_do(msg, line))

    def on_did(self, msg, line):
        wid, res_json, err = parse_did(msg, line)
        self.broker.did(self, wid, res_json, err)

    def on_can_do(self, msg, line):
        types = field_types(msg)
        capacity = field_positive_int(msg, "capacity", None) if "capacity" in msg else None
        self.broker.can_do(self, types, capacity)

    def on_cant_do(self, msg, line):
        self.broker.cant_do(self, field_types(msg))

    def on_metrics(self, msg, line):
        self.send(encode({"cmd": "metrics", "metrics": self.server.metrics()}))

    def on_cancel(self, msg, line):
        self.broker.cancel(self, field_id(msg))

    def on_progress(self, msg, line):
        wid = field_wid(msg)
        self.broker.held_job(self, wid)
        if "data" not in msg:
            raise ProtocolError('"data" is missing', wid)
        self.broker.progress(self, wid, encode_payload(msg, "data", line))

    def on_release(self, msg, line):
        self.broker.release(self, field_wid(msg))

    def on_auth(self, msg, line):
        secret = msg.get("secret")
        expected = self.server.secret
        if type(secret) is not str:
            self.fail_auth('"secret" must be a string')
        if expected is not None and not hmac.compare_digest(
                secret.encode("utf-8", "surrogatepass"), expected.encode()):
            self.server.log_throttle.log(logging.WARNING, "%s: authentication failed", self.name)
            self.logged_error = True        # that line is this connection's one (refuse())
            self.fail_auth("authentication failed")
        if not self.authed:
            self.authenticated()
        self.send(b'{"cmd":"auth","ok":true}\r\n')

    def fail_auth(self, text):
        """Raises. With a secret, a wrong one ends the connection (SPEC 8),
        even one that gave the right one before."""
        if self.server.secret is not None:
            self.close()
        raise ProtocolError(text)

    # -- writing -------------------------------------------------------------

    def flush(self):
        """Runs in the hub once per loop turn: everything queued, one send."""
        self.flush_scheduled = False
        out = self.out
        if not out or self.writer_owns_socket:
            return
        if self.raw is None:
            return self.hand_to_writer()
        while out:
            if len(out) == 1:       # the usual case: one message since the last flush
                chunk, size = out.pop(), self.out_bytes
            else:
                chunk, size = self.next_chunk()
            try:
                if type(chunk) is list:
                    sent = self.raw.sendmsg(chunk)
                else:
                    sent = self.raw.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError:
                return self.broken()
            self.out_bytes -= sent
            if sent < size:
                out[:0] = unsent_part(chunk if type(chunk) is list else [chunk], sent)
                return self.hand_to_writer()
        if self.paused and self.out_bytes <= self.high_water // 2:
            self.resume()

    def next_chunk(self):
        """-> (what one send takes from the front of the output, its size):
        up to WRITE_CHUNK bytes, so a big backlog is never handled whole.
        Small pieces come joined into one bytes object, which is cheaper
        than sendmsg's list of buffers; with a big one among them, they
        come as a list for sendmsg, so a big payload is never copied.

        The connection keeps its one output list: a fresh list per flush
        would outlive the flush, and with 10,000 workers those lists kept
        the cyclic GC busy (15 % of the server's CPU, pauses of 175 ms)."""
        out = self.out
        if len(out) == 1:           # the usual case: one message since the last flush
            return out.pop(), self.out_bytes
        if self.out_bytes <= WRITE_CHUNK and len(out) <= WRITE_PIECES:
            pieces, size = out[:], self.out_bytes
            out.clear()
        else:
            size = count = 0
            for piece in out:
                count += 1
                size += len(piece)
                if size >= WRITE_CHUNK or count == WRITE_PIECES:
                    break
            pieces = out[:count]
            del out[:count]
        return (b"".join(pieces) if size < BIG_PIECE else pieces), size

    def hand_to_writer(self):
        self.writer_owns_socket = True
        self.wake_writer.set()
        if self.writer is None:
            self.writer = gevent.spawn(self.write_loop)

    def write_loop(self):
        """Sends what flush() could not, waiting for the socket to drain."""
        wait, clear = self.wake_writer.wait, self.wake_writer.clear
        sendall = self.sock.sendall
        try:
            while True:
                wait()
                clear()
                while self.out:
                    chunk, size = self.next_chunk()
                    sendall(b"".join(chunk) if type(chunk) is list else chunk)
                    self.out_bytes -= size
                    if self.paused and self.out_bytes <= self.high_water // 2:
                        self.resume()
                self.writer_owns_socket = False
        except OSError:
            self.broken()

    def broken(self):
        """The peer is gone for writing: drop its output, end the connection."""
        self.out = []
        self.out_bytes = 0
        self.writer_owns_socket = True      # nothing more to send
        self.close()
        self.sock.close()                   # wakes the reader if it waits in recv

    def flush_before_close(self):
        with gevent.Timeout(CLOSE_FLUSH_TIMEOUT, False):
            while (self.out or self.writer_owns_socket) and not self.sock.closed:
                gevent.sleep(0.005)


# What each command does, by name: shared by all connections (a dict of bound
# methods per connection would cost 10,000 workers a kilobyte each).
COMMANDS = {
    "do": Connection.on_do, "did": Connection.on_did, "can_do": Connection.on_can_do,
    "cant_do": Connection.on_cant_do, "metrics": Connection.on_metrics,
    "cancel": Connection.on_cancel, "progress": Connection.on_progress,
    "release": Connection.on_release, "auth": Connection.on_auth,
}
BEFORE_AUTH = {"auth": Connection.on_auth}


###############################################################################
# HTTP: Prometheus metrics, a health check and a self-updating status page,
# served by gevent's WSGI server in the same process (SPEC 8).
###############################################################################

COUNTER_HELP = {
    "connections": "Connections accepted since start.",
    "jobs_added": "Jobs submitted.",
    "jobs_dispatched": "Jobs handed to a worker (each hand-out counts).",
    "jobs_done": "Jobs finished with a result.",
    "jobs_failed": "Jobs finished with an error.",
    "jobs_reassigned": "Jobs handed out again after their worker was lost or ran out of time.",
    "jobs_abandoned": "Jobs dropped because their submitter left.",
    "jobs_coalesced": "Submissions joined to an unfinished job with the same unique key.",
    "jobs_timed_out": "Submissions that reached their timeout.",
    "jobs_cancelled": "Submissions cancelled by their submitter.",
    "jobs_released": "Jobs given back undone by a worker.",
    "jobs_background": "Background submissions.",
}
GAUGE_HELP = {
    "connections_open": "Open connections.",
    "workers": "Open connections that can do at least one job type.",
    "jobs_queued": "Jobs waiting for a worker.",
    "jobs_running": "Jobs held by workers.",
}
TYPE_HELP = {
    "queued": ("gauge", "Jobs of this type waiting for a worker."),
    "running": ("gauge", "Jobs of this type held by workers."),
    "workers": ("gauge", "Connections that can do this type."),
    "idle": ("gauge", "Connections that can do this type and have a free slot (and no backed-up output)."),
    "done": ("counter", "Jobs of this type finished with a result."),
    "failed": ("counter", "Jobs of this type finished with an error."),
}


def prometheus_label(value):
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(metrics):
    """The metrics in the Prometheus text exposition format, version 0.0.4."""
    out = ["# HELP deputy_up_since_seconds When the server started (Unix time).",
           "# TYPE deputy_up_since_seconds gauge",
           "deputy_up_since_seconds %.3f" % (metrics["up_since"] / 1000.0)]
    for name, text in COUNTER_HELP.items():
        out += ["# HELP deputy_%s_total %s" % (name, text), "# TYPE deputy_%s_total counter" % name,
                "deputy_%s_total %d" % (name, metrics[name])]
    for name, text in GAUGE_HELP.items():
        out += ["# HELP deputy_%s %s" % (name, text), "# TYPE deputy_%s gauge" % name,
                "deputy_%s %d" % (name, metrics[name])]
    for field, (kind, text) in TYPE_HELP.items():
        series = "deputy_type_%s%s" % (field, "_total" if kind == "counter" else "")
        out += ["# HELP %s %s" % (series, text), "# TYPE %s %s" % (series, kind)]
        for type_name, stats in sorted(metrics["types"].items()):
            out.append('%s{type="%s"} %d' % (series, prometheus_label(type_name), stats[field]))
    return "\n".join(out) + "\n"


def process_text(start_time):
    """The standard process_* series of Prometheus clients, so that the
    usual dashboards and alerts (rate(process_cpu_seconds_total) near 1:
    the server is out of CPU) work unchanged. Memory and file descriptors
    where /proc tells them (Linux)."""
    times = os.times()
    series = [("cpu_seconds_total", "counter", "User and system CPU time spent.",
               "%.3f" % (times.user + times.system)),
              ("start_time_seconds", "gauge", "When the process started (Unix time).",
               "%.3f" % start_time)]
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        series.append(("resident_memory_bytes", "gauge", "Resident memory size.", "%d" % rss))
        series.append(("open_fds", "gauge", "Open file descriptors.",
                       "%d" % len(os.listdir("/proc/self/fd"))))
    except (OSError, ValueError, IndexError):
        pass
    out = []
    for name, kind, text, value in series:
        out += ["# HELP process_%s %s" % (name, text), "# TYPE process_%s %s" % (name, kind),
                "process_%s %s" % (name, value)]
    return "\n".join(out) + "\n"


STATUS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Deputy status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
.sub { color: #666; margin-bottom: 1.2em; }
table { border-collapse: collapse; min-width: 40em; }
th, td { padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
#totals span { margin-right: 1.5em; }
.stale { color: #b00; }
</style></head>
<body>
<h1>Deputy</h1>
<div class="sub">version <span id="version"></span>, up since <span id="up"></span>
 &middot; <span id="state">loading&hellip;</span></div>
<div id="totals"></div>
<table><thead><tr><th>type</th><th>queued</th><th>running</th><th>workers</th><th>idle</th>
<th>done</th><th>failed</th><th>jobs/s</th></tr></thead><tbody id="rows"></tbody></table>
<script>
"use strict";
var last = null;
function cell(row, text) { var td = document.createElement("td"); td.textContent = text; row.appendChild(td); }
function render(m, rates) {
  document.getElementById("up").textContent = new Date(m.up_since).toLocaleString();
  var totals = ["connections_open", "workers", "jobs_queued", "jobs_running", "jobs_done", "jobs_failed"];
  var t = document.getElementById("totals"); t.textContent = "";
  totals.forEach(function (k) { var s = document.createElement("span"); s.id = "total-" + k;
    s.textContent = k.replace("_", " ") + ": " + m[k]; t.appendChild(s); });
  var tbody = document.getElementById("rows"); tbody.textContent = "";
  Object.keys(m.types).sort().forEach(function (name) {
    var s = m.types[name], row = document.createElement("tr"); row.dataset.type = name;
    cell(row, name); ["queued", "running", "workers", "idle", "done", "failed"].forEach(function (k) { cell(row, s[k]); });
    cell(row, rates[name] === undefined ? "-" : rates[name].toFixed(1));
    tbody.appendChild(row);
  });
}
function poll() {
  fetch("status.json", {cache: "no-store"}).then(function (r) { return r.json(); }).then(function (d) {
    var now = performance.now(), rates = {};
    if (last) {
      var dt = (now - last.at) / 1000;
      Object.keys(d.metrics.types).forEach(function (name) {
        var before = last.m.types[name], s = d.metrics.types[name];
        var finished = s.done + s.failed - (before ? before.done + before.failed : 0);
        rates[name] = dt > 0 ? finished / dt : 0;
      });
    }
    last = {at: now, m: d.metrics};
    document.getElementById("version").textContent = d.version;
    var st = document.getElementById("state"); st.textContent = d.draining ? "draining" : "live";
    st.className = "";
    render(d.metrics, rates);
  }).catch(function () { var st = document.getElementById("state");
    st.textContent = "server unreachable"; st.className = "stale"; });
}
poll(); setInterval(poll, 1000);
</script></body></html>
"""


class HttpApp:
    """The WSGI application behind --http."""

    def __init__(self, server):
        self.server = server

    def __call__(self, environ, start_response):
        body = self.respond(environ, start_response)
        if environ.get("REQUEST_METHOD") == "HEAD":
            return []           # the headers a GET has, its Content-Length too, no body
        return body

    def respond(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return self.reply(start_response, "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n")
        if path == "/metrics":
            metrics = self.server.metrics()
            body = (prometheus_text(metrics) + process_text(metrics["up_since"] / 1000.0)).encode()
            return self.reply(start_response, "200 OK", "text/plain; version=0.0.4; charset=utf-8",
                              body)
        if path == "/health":
            if self.server.broker.draining:
                return self.reply(start_response, "503 Service Unavailable", "text/plain",
                                  b"draining\n")
            return self.reply(start_response, "200 OK", "text/plain", b"ok\n")
        if path == "/status.json":
            body = dumps({"version": __version__, "draining": self.server.broker.draining,
                          "metrics": self.server.metrics()})
            return self.reply(start_response, "200 OK", "application/json", body)
        if path == "/":
            return self.reply(start_response, "200 OK", "text/html; charset=utf-8",
                              STATUS_PAGE.encode())
        return self.reply(start_response, "404 Not Found", "text/plain", b"not found\n")

    @staticmethod
    def reply(start_response, status, content_type, body):
        start_response(status, [("Content-Type", content_type),
                                ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [body]


class ThrottledErrorLog:
    """gevent's WSGI server writes a line per malformed request (with the
    request's bytes) to its error log: through the throttle, at INFO, as
    the other messages that clients cause."""

    def __init__(self, throttle):
        self.throttle = throttle

    def write(self, text):
        text = text.rstrip()
        if text:
            self.throttle.log(logging.INFO, "http: %s", text[:200])

    def flush(self):
        pass


def bad_request_reason(exc, raw_requestline):
    """gevent's reason for refusing a request, without the request's bytes
    it quotes: a job client pointed at --http sends its auth line there,
    and the secret must never reach the log."""
    if raw_requestline.lstrip()[:1] == b"{":
        return "a JSON line, not an HTTP request (a job client on the --http port?)"
    return "%s (the request line is not logged)" % re.split(r"[:;]", str(exc), maxsplit=1)[0]


def http_server_class(idle_timeout):
    """gevent's WSGI server (imported only with --http), accepting as the
    job listeners do when out of file descriptors; and its request handler,
    for which a request with too many (or too long) headers is a bad
    request like any other (gevent prints a traceback for the standard
    library's HTTPException, and for a timeout), and which closes a
    connection that sends nothing for idle_timeout seconds (0: never), as
    the job port does before auth: gevent would wait for a request for ever."""
    from http.client import HTTPException
    from gevent.pywsgi import WSGIHandler, WSGIServer

    class HttpHandler(WSGIHandler):
        def handle(self):
            if idle_timeout:
                # Every read: waiting for a request line ends quietly,
                # in the headers as a bad request (read_request).
                self.socket.settimeout(idle_timeout)
            super().handle()

        def read_request(self, raw_requestline):
            try:
                return super().read_request(raw_requestline)
            except HTTPException as exc:
                raise ValueError(str(exc)) from None
            except socket.timeout:
                raise ValueError("no complete request within %g s (--auth-timeout)"
                                 % idle_timeout) from None
            except ValueError as exc:
                raise ValueError(bad_request_reason(exc, raw_requestline)) from None

    class HttpServer(AcceptsOutOfFds, WSGIServer):
        handler_class = HttpHandler
    return HttpServer


###############################################################################
# The server: listeners (TCP, UNIX, HTTP), signals, the metrics printer.
###############################################################################

class StartupError(Exception):
    """A problem that stops the server from starting; one line for the user."""


class OutOfFdsWarning:
    """Out of file descriptors: one warning every 10 s for all of a
    server's listeners (the job port and --http run out at once), with the
    accepts refused since the last."""

    def __init__(self):
        self.logged = float("-inf")     # (monotonic() may be under 10 s)
        self.refusals = 0

    def refused(self, error):
        self.refusals += 1
        now = monotonic()
        if now - self.logged >= 10:
            log.warning("cannot accept connections: %s (%d times); retrying",
                        error.strerror or error, self.refusals)
            self.logged, self.refusals = now, 0


class AcceptsOutOfFds:
    """For a gevent StreamServer: out of file descriptors, it says so
    through fd_warning (gevent prints a traceback a second) and stops
    accepting for a while, up to 1 s; the connections it has go on, and
    the ones waiting in the backlog are accepted once some close."""

    OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fd_pause = self.min_delay
        self.fd_warning = OutOfFdsWarning()     # the Server gives all its listeners one

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as error:
            if error.errno not in self.OUT_OF_FDS:
                raise
            self.out_of_fds(error)
            return None
        self.fd_pause = self.min_delay
        return accepted

    def out_of_fds(self, error):
        self.fd_warning.refused(error)
        self.stop_accepting()
        self._timer = self.loop.timer(self.fd_pause)
        self._timer.start(self._start_accepting_if_started)
        self.fd_pause = min(self.max_delay, self.fd_pause * 2)


class Listener(AcceptsOutOfFds, gevent.server.StreamServer):
    """Where jobs come in (TCP, TLS or a UNIX socket)."""


class Server:
    """Owns the broker and the listeners. No module-level state, so tests
    can run several servers in one process."""

    def __init__(self, host=DEFAULT_HOST, port=DEFAULT_PORT, unix_path=None,
                 max_line=DEFAULT_MAX_LINE, max_attempts=DEFAULT_MAX_ATTEMPTS,
                 high_water=DEFAULT_HIGH_WATER, default_ttr=None, secret=None,
                 tls_context=None, http_address=None, drain_timeout=DEFAULT_DRAIN_TIMEOUT,
                 metrics_interval=None, max_types=DEFAULT_MAX_TYPES,
                 auth_timeout=DEFAULT_AUTH_TIMEOUT):
        self.host, self.port, self.unix_path = host, port, unix_path
        self.max_line = max_line
        self.high_water = high_water
        self.secret = secret
        self.tls_context = tls_context
        self.http_address = http_address
        self.drain_timeout = drain_timeout
        self.auth_timeout = auth_timeout
        self.metrics_interval = metrics_interval
        self.broker = Broker(max_attempts=max_attempts, default_ttr=default_ttr,
                             max_types=max_types)
        self.listeners = []         # those that take jobs: closed by a drain
        self.http = None            # stays up during a drain: /health says so
        self.connections = set()
        self.log_throttle = LogThrottle()   # what connections make the server log
        self.fd_warning = OutOfFdsWarning()     # shared by its listeners
        self.unix_inode = None
        self.stopped = gevent.event.Event()
        self.exit_code = 0

    def metrics(self):
        return self.broker.metrics()

    def handle(self, sock, address):
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = self.start_auth_deadline() if self.secret is not None else None
        try:
            self.serve_connection(sock, address, deadline)
        finally:
            if deadline is not None:    # (a timeout left running would fire in a dead greenlet)
                deadline.close()

    def serve_connection(self, sock, address, auth_deadline=None):
        conn = Connection(self, sock, address, auth_deadline)
        self.connections.add(conn)
        try:
            conn.serve()
        finally:
            self.connections.discard(conn)

    def handle_tls(self, sock, address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = self.start_auth_deadline()
        try:
            tls_sock = self.handshake(sock, address)
            if tls_sock is None:
                return
            if self.secret is None and deadline is not None:    # nothing more to wait for
                deadline.close()
                deadline = None
            try:
                self.serve_connection(tls_sock, address, deadline)
            finally:
                tls_sock.close()
        finally:
            if deadline is not None:
                deadline.close()

    def handshake(self, sock, address):
        """-> the TLS socket, or None. The handshake runs in the connection's
        own greenlet; a failed one (plain text, an untrusted client, one too
        slow) is logged once, not a traceback."""
        try:
            return self.tls_context.wrap_socket(sock, server_side=True)
        except (OSError, AuthTimeout) as exc:      # ssl.SSLError is an OSError
            if type(exc) is AuthTimeout:
                exc = "not done within %g s (--auth-timeout)" % self.auth_timeout
            self.log_throttle.log(logging.INFO, "%s: TLS handshake failed: %s",
                                  format_address(address), exc)
            sock.close()
            return None

    def start_auth_deadline(self):
        """A timeout that raises AuthTimeout in this connection's greenlet
        unless closed first (by Connection.authenticated); None with no
        --auth-timeout."""
        if not self.auth_timeout:
            return None
        return gevent.Timeout.start_new(self.auth_timeout, AuthTimeout)

    # -- starting ------------------------------------------------------------

    def start(self):
        """TCP last: once it accepts, every other listener is up too."""
        if self.unix_path:
            self.listen(Listener(self.unix_listener(), self.handle), self.unix_path)
        if self.http_address:
            http_server = http_server_class(idle_timeout=self.auth_timeout)
            self.http = http_server(self.http_address, HttpApp(self), log=None,
                                    error_log=ThrottledErrorLog(self.log_throttle))
            self.listen(self.http, "http://%s:%d" % self.http_address)
            self.listeners.remove(self.http)
        handle = self.handle_tls if self.tls_context else self.handle
        tcp = Listener((self.host, self.port), handle, backlog=1024)
        self.listen(tcp, "%s:%d" % (self.host, self.port))
        self.port = tcp.server_port
        if self.metrics_interval:
            gevent.spawn(self.print_metrics_forever)
        where = [str(listener.address) for listener in self.listeners]
        if self.http is not None:       # with its port, which --http 0 leaves to the system
            host = self.http_address[0]
            where.append("http://%s:%d" % ("[%s]" % host if ":" in host else host,
                                           self.http.server_port))
        log.info("deputy %s listening on %s", __version__, ", ".join(where))

    def listen(self, listener, where):
        listener.fd_warning = self.fd_warning
        try:
            listener.start()
        except OSError as exc:
            self.close_listeners()
            self.close_http()
            raise StartupError("cannot listen on %s: %s" % (where, exc.strerror or exc))
        self.listeners.append(listener)

    def unix_listener(self):
        path = self.unix_path
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise StartupError("cannot listen on %s: %s" % (path, exc.strerror or exc))
        self.unix_inode = os.stat(path).st_ino
        sock.setblocking(False)
        return sock

    def print_metrics_forever(self):
        while True:
            gevent.sleep(self.metrics_interval)
            sys.stderr.write(dumps(self.metrics()).decode() + "\n")
            sys.stderr.flush()

    # -- stopping ------------------------------------------------------------

    def install_signal_handlers(self):
        gevent.signal_handler(signal.SIGINT, self.stop)
        gevent.signal_handler(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self):
        if self.broker.draining:
            return self.stop()      # a second SIGTERM: at once
        gevent.spawn(self.drain)

    def drain(self):
        """Close the listeners, refuse new jobs, let running ones finish and
        their results reach the submitters, all within the drain timeout."""
        deadline = monotonic() + self.drain_timeout
        running = self.broker.job_totals()["jobs_running"]
        log.info("draining: %s running", counted(running, "job"))
        self.close_listeners()
        self.broker.start_draining()
        if running and not self.broker.drained.wait(self.drain_timeout):
            log.warning("drain timeout: %s still running",
                        counted(self.broker.job_totals()["jobs_running"], "job"))
        unsent = self.flush_connections(deadline - monotonic())
        if unsent:
            log.warning("drain timeout: output still unsent to %s", counted(unsent, "connection"))
        self.stop()

    def flush_connections(self, timeout):
        """Wait up to timeout for the output of every connection that was
        sent results to reach its peer (a result still in the server's
        output, or in the kernel's, is not delivered yet: a slow submitter's
        last one is sent whole, not cut off); -> how many connections still
        have output unsent. Only those: replies to a connection that never
        got a result (metrics it asks for and does not read) hold nothing up."""
        gevent.sleep(0.01)          # the flush callbacks scheduled just now
        deadline = monotonic() + timeout
        while True:
            unsent = sum(1 for conn in self.connections
                         if conn.got_results and not conn.sock.closed
                         and (conn.out or conn.writer_owns_socket or unacknowledged(conn.sock)))
            if not unsent or monotonic() >= deadline:
                return unsent
            gevent.sleep(0.01)

    def stop(self):
        self.stopped.set()

    def close_listeners(self):
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        self.remove_unix_socket()

    def remove_unix_socket(self):
        """Remove our socket file, never one a newer server put there."""
        if self.unix_inode is None:
            return
        try:
            if os.stat(self.unix_path).st_ino == self.unix_inode:
                os.unlink(self.unix_path)
        except OSError:
            pass
        self.unix_inode = None

    def serve_forever(self):
        self.start()
        self.install_signal_handlers()
        try:
            self.stopped.wait()
        finally:
            self.close_listeners()
            self.close_http()
        return self.exit_code

    def close_http(self):
        if self.http is not None:
            self.http.close()
            self.http = None


def remove_stale_socket(path):
    """A socket file left by a dead server is replaced; a live one is not."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError("cannot use %s: %s" % (path, exc.strerror))
    if not stat.S_ISSOCK(mode):
        raise StartupError("%s exists and is not a socket; not replacing it" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)             # nobody listens: stale
        return
    except OSError as exc:          # a timeout: a busy server, not a dead one
        raise StartupError("cannot tell whether a server listens on %s (%s); not replacing it"
                           % (path, exc))
    finally:
        probe.close()
    raise StartupError("another server is listening on %s" % path)


###############################################################################
# Command line.
###############################################################################

USAGE = """Deputy job server.

Usage:
  deputy-server [options]

Options:
  -h <ip>                   Listen on IP address [default: 127.0.0.1]
  -p <port>                 Listen on port [default: 11746]
  -s <path>                 Also listen on a UNIX socket.
  -v                        Print metrics to stderr periodically.
  --metrics-interval <sec>  Seconds between -v metrics lines [default: 5]
  --max-line <bytes>        Longest message line accepted [default: 1048576]
  --max-attempts <n>        Worker losses after which a job fails [default: 5]
  --max-types <n>           Job types one connection may do [default: 10000]
  --high-water <bytes>      Unsent output that pauses a connection [default: 4194304]
  --ttr <sec>               Default time to run once a job is handed out
                            (default: unlimited).
  --secret <text>           Connections must first send this secret (also from
                            the environment variable DEPUTY_SECRET).
  --secret-file <path>      Read the secret from this file.
  --tls-cert <file>         Speak TLS on TCP with this certificate (PEM).
  --tls-key <file>          The private key of --tls-cert (PEM, unencrypted).
  --http <[ip:]port>        Serve /metrics, /health and a status page over HTTP
                            (ip defaults to 127.0.0.1).
  --drain-timeout <sec>     How long SIGTERM waits for running jobs [default: 30]
  --auth-timeout <sec>      Time a connection has for its TLS handshake and
                            auth; on --http, for each read. 0: no limit
                            [default: 10]
  --log-level <level>       debug, info, warning or error [default: info]
  --help                    Show this help.
  --version                 Show the version.
"""


class UsageError(Exception):
    """A bad option value; one line for the user."""


def plain_number(kind, text):
    """kind(text) for the digits a user types: Python's int() and float()
    also take other scripts' digits ("٣" is 3) and underscores."""
    if not text.isascii() or "_" in text:
        raise ValueError(text)
    return kind(text)


def parse_number(args, option, kind, low):
    text = args[option]
    try:
        value = plain_number(kind, text)
    except (TypeError, ValueError):
        value = None
    if value is None or value != value or value < low or value == float("inf"):
        raise UsageError("%s must be a %s >= %s, not %r" % (
            option, "whole number" if kind is int else "number", low, text))
    return value


def parse_http_address(text):
    """[IP:]PORT; an IPv6 address as in a URL ([::1]:9746) or bare (::1:9746)."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = plain_number(int, port)
    except ValueError:
        raise UsageError("--http must be [IP:]PORT, not %r" % text)
    if not 0 <= port <= 65535:
        raise UsageError("--http port must be 0-65535, not %d" % port)
    if ":" in host and not is_ipv6(host):   # "::1" read as host ":" and port 1
        raise UsageError("--http must be [IP:]PORT, not %r (an IPv6 address with its port: "
                         "[::1]:9746)" % text)
    return (host or DEFAULT_HOST, port)


def is_ipv6(text):
    try:
        socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return False
    return True


def read_secret(args, environ):
    if args["--secret"] is not None and args["--secret-file"] is not None:
        raise UsageError("give --secret or --secret-file, not both")
    if args["--secret-file"] is not None:
        try:
            with open(args["--secret-file"], encoding="utf-8") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError("cannot read --secret-file: %s" % getattr(exc, "strerror", exc))
    elif args["--secret"] is not None:
        secret = args["--secret"]
    else:
        secret = environ.get("DEPUTY_SECRET")     # set but empty is a mistake, not "no secret"
    if secret is not None and not secret:
        raise UsageError("the secret is empty")
    if secret is not None and not is_utf8(secret):
        raise UsageError("the secret is not valid UTF-8: no client could send it")
    return secret


def is_utf8(text):
    """False for a str made of undecodable bytes (argv and the environment
    keep them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def tls_context(args):
    cert, key = args["--tls-cert"], args["--tls-key"]
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    import ssl
    import gevent.ssl
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)   # gevent's: handshakes yield
    def encrypted_key():        # else OpenSSL asks for the passphrase on the terminal
        raise UsageError("cannot load the TLS certificate: the key %s is encrypted; give one "
                         "without a passphrase" % key)
    try:
        context.load_cert_chain(cert, key, password=encrypted_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError("cannot load the TLS certificate: %s" % (getattr(exc, "strerror", None)
                                                                  or exc))
    return context


def refuse_empty_values(args):
    """An option given an empty value is a mistake (a variable that was not
    set), never "the default": `-h ""` would mean every interface."""
    for option, value in args.items():
        if value == "":
            raise UsageError("%s needs a value, not an empty one" % option)


def server_from_args(args, environ):
    refuse_empty_values(args)
    level = args["--log-level"].upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UsageError("--log-level must be debug, info, warning or error")
    logging.basicConfig(level=level, format="%(asctime)s deputy %(levelname)s %(message)s")
    interval = parse_number(args, "--metrics-interval", float, 0.001)
    port = parse_number(args, "-p", int, 0)
    if port > 65535:
        raise UsageError("-p must be a port number 0-65535, not %d" % port)
    return Server(
        host=args["-h"], port=port, unix_path=args["-s"],
        max_line=parse_number(args, "--max-line", int, 1),
        max_attempts=parse_number(args, "--max-attempts", int, 1),
        max_types=parse_number(args, "--max-types", int, 1),
        high_water=parse_number(args, "--high-water", int, 1),
        default_ttr=parse_number(args, "--ttr", float, 1e-9) if args["--ttr"] else None,
        secret=read_secret(args, environ),
        tls_context=tls_context(args),
        http_address=parse_http_address(args["--http"]) if args["--http"] else None,
        drain_timeout=parse_number(args, "--drain-timeout", float, 0),
        auth_timeout=parse_number(args, "--auth-timeout", float, 0),
        metrics_interval=interval if args["-v"] else None)


def main(argv=None, environ=os.environ):
    from docopt import DocoptExit, docopt
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv:
        print(USAGE.strip())
        return 0
    if "--version" in argv:
        print("deputy-server %s" % __version__)
        return 0
    try:
        args = docopt(USAGE, argv, default_help=False)
        server = server_from_args(args, environ)
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        return server.serve_forever()
    except DocoptExit:
        return fail("bad command line %r (see deputy-server --help)" % " ".join(without_secret(argv)))
    except (UsageError, StartupError) as exc:
        return fail(str(exc))


def without_secret(argv):
    """argv to echo in an error, with the value of --secret masked, also
    when it is spelt as any prefix (docopt takes a unique one, and echoes
    an ambiguous one like --se): a secret is never printed (SPEC 8), even
    in a bad command line."""
    shown, hide_next = [], False
    for arg in argv:
        name = arg.partition("=")[0]
        if hide_next:
            arg, hide_next = "***", False
        elif len(name) > 2 and "--secret-file".startswith(name):
            if "=" in arg:
                arg = name + "=***"
            else:
                hide_next = True
        shown.append(arg)
    return shown


def fail(text):
    sys.stderr.write("deputy-server: %s\n" % text)
    return 2


if __name__ == "__main__":
    sys.exit(main())
