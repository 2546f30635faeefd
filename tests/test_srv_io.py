"""The connection's framing and writing, in process: lines split across
reads, output given to the kernel in bounded pieces, partial sends, and big
payloads sent without a copy."""
import random
import socket

import gevent
import gevent.event
import gevent.socket
import pytest

from deputy_server import (
    BIG_PIECE, BIG_READ, WRITE_CHUNK, WRITE_PIECES, AuthTimeout, Connection, Peer, Server,
    parse_do, unsent_part)


@pytest.fixture
def pair():
    """A Connection on one end of a socket pair, and the other end."""
    ours, theirs = gevent.socket.socketpair()
    conn = Connection(Server(port=0), ours, ("test", 0))
    yield conn, theirs
    ours.close()
    theirs.close()


class RawSpy:
    """Stands in for a connection's raw socket, whose methods cannot be
    replaced: each test swaps the ones it watches."""

    def __init__(self, real):
        self.send, self.sendmsg, self.recv = real.send, real.sendmsg, real.recv


class LoopSpy:
    """Stands in for a connection's event loop: records the callbacks it
    is asked to run."""

    def __init__(self):
        self.callbacks = []

    def run_callback(self, *args):
        self.callbacks.append(args)


def read_exactly(sock, size, timeout=10):
    got = []
    with gevent.Timeout(timeout):
        while size > 0:
            chunk = sock.recv(min(size, 1 << 20))
            assert chunk, "closed early"
            got.append(chunk)
            size -= len(chunk)
    return b"".join(got)


# -- reading: lines across reads ----------------------------------------------

def feed(conn, chunks):
    lines = []
    for chunk in chunks:
        got = conn.complete_lines(chunk)
        assert got is not None
        lines.extend(got)
    return lines


@pytest.mark.parametrize("line_size", [10, 1000, BIG_READ + 5, 70000])
def test_lines_cut_anywhere_come_out_whole_and_in_order(pair, line_size):
    conn, _ = pair
    rng = random.Random(line_size)
    want = [bytes([65 + n % 26]) * rng.randint(1, line_size) for n in range(60)]
    stream = b"".join(text + b"\n" for text in want)
    chunks, at = [], 0
    while at < len(stream):
        size = rng.choice([1, 7, 100, BIG_READ, 3 * line_size])
        chunks.append(stream[at:at + size])
        at += size
    assert feed(conn, chunks) == want
    assert conn.partial == [] and conn.partial_len == 0


def test_an_unfinished_line_over_max_line_ends_the_connection(pair):
    conn, _ = pair
    conn.set_max_line(1000)
    assert conn.complete_lines(b"x" * 600) == []
    assert conn.complete_lines(b"x" * 600) is None
    assert conn.closing
    assert b"line too long (limit 1000 bytes)" in b"".join(conn.out)


# -- writing -------------------------------------------------------------------

def test_a_big_backlog_is_taken_in_bounded_pieces_in_order(pair):
    conn, _ = pair
    pieces = [bytes([65 + n % 26]) * 1000 for n in range(1000)] + [b"y"] * 2000
    conn.out, conn.out_bytes = list(pieces), sum(map(len, pieces))
    taken = []
    while conn.out:
        before = len(conn.out)
        chunk, size = conn.next_chunk()
        data = b"".join(chunk) if type(chunk) is list else chunk
        assert size == len(data)
        assert (type(chunk) is list) == (size >= BIG_PIECE)   # joined unless big in all
        assert before - len(conn.out) <= WRITE_PIECES
        assert size < WRITE_CHUNK + 1000
        conn.out_bytes -= size
        taken.append(data)
    assert b"".join(taken) == b"".join(pieces)


def test_a_lone_piece_is_taken_as_it_is(pair):
    conn, _ = pair
    conn.send(b"x" * (BIG_PIECE * 2))
    piece = conn.out[0]
    chunk, size = conn.next_chunk()
    assert chunk is piece and size == len(piece) and conn.out == []


@pytest.mark.parametrize("sent", [0, 1, 999, 1000, 1001, 2500, 3000])
def test_the_unsent_part_of_a_partial_send_is_exact(sent):
    pieces = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    assert b"".join(unsent_part(pieces, sent)) == b"".join(pieces)[sent:]


@pytest.mark.parametrize("seed", range(12))
def test_partial_and_refused_sends_lose_and_repeat_nothing(seed):
    """flush() against a kernel that takes any part of what it is given, or
    nothing (EAGAIN), with small, big and memoryview pieces: what arrives
    is exactly what was sent, in order, and the byte count ends at 0 (the
    writer greenlet finishes what flush() could not)."""
    rng = random.Random(seed)
    ours, theirs = gevent.socket.socketpair()
    conn = Connection(Server(port=0), ours, ("test", 0))
    conn.raw = RawSpy(conn.raw)
    real_send = conn.raw.send

    def stingy_send(data):
        if rng.random() < 0.2:
            raise BlockingIOError
        return real_send(memoryview(data)[:rng.randint(0, len(data))])

    def stingy_sendmsg(pieces):
        return stingy_send(b"".join(pieces))

    conn.raw.send, conn.raw.sendmsg = stingy_send, stingy_sendmsg
    sent = []
    try:
        for n in range(rng.randint(1, 40)):
            kind = rng.random()
            if kind < 0.3:
                piece = memoryview(b"m" * rng.randint(6, 3 * BIG_PIECE))[rng.randint(0, 5):]
            elif kind < 0.5:
                piece = bytes([65 + n % 26]) * rng.randint(BIG_PIECE, 3 * BIG_PIECE)
            else:
                piece = b"s%d," % n * rng.randint(1, 50)
            sent.append(bytes(piece))
            conn.send(piece)
            if rng.random() < 0.3:
                conn.flush()
                assert conn.out_bytes == sum(map(len, conn.out))
        conn.flush()
        want = b"".join(sent)
        assert read_exactly(theirs, len(want)) == want
        with gevent.Timeout(5):
            while conn.out or conn.writer_owns_socket:
                gevent.sleep(0.01)
        assert conn.out_bytes == 0
    finally:
        ours.close()
        theirs.close()


def test_big_payloads_go_to_the_kernel_without_a_copy(pair):
    conn, _ = pair
    given = []
    conn.raw = RawSpy(conn.raw)
    conn.raw.sendmsg = lambda pieces: given.append(pieces) or sum(map(len, pieces))
    payload = b'"' + b"x" * BIG_PIECE + b'"'
    conn.send_many((b'{"cmd":"did","id":1,"res":', payload, b"}\r\n"))
    conn.flush()
    assert len(given) == 1 and any(piece is payload for piece in given[0])
    assert conn.out == [] and conn.out_bytes == 0


def test_small_pieces_are_joined_into_one_send(pair):
    conn, theirs = pair
    calls = []
    conn.raw = RawSpy(conn.raw)
    raw_send = conn.raw.send
    conn.raw.send = lambda data: calls.append(len(data)) or raw_send(data)
    for n in range(50):
        conn.send(b'{"cmd":"queued","id":%d}\r\n' % n)
    conn.flush()
    assert len(calls) == 1
    assert read_exactly(theirs, calls[0]).count(b"\n") == 50


def test_the_replies_to_a_batch_go_out_in_one_send_at_its_end(pair):
    """No flush callback of their own: a worker's next job leaves in the
    same turn of the loop as the answer that freed it."""
    conn, theirs = pair
    sends = []
    conn.raw = RawSpy(conn.raw)
    raw_send = conn.raw.send
    conn.raw.send = lambda data: sends.append(len(data)) or raw_send(data)
    conn.loop = LoopSpy()
    theirs.sendall(b"".join(b'{"cmd":"do","id":%d,"type":"t","bg":true}\r\n' % n
                            for n in range(20)))
    gevent.sleep(0.01)
    conn.on_readable()
    assert len(sends) == 1 and conn.loop.callbacks == []
    replies = read_exactly(theirs, sends[0])
    assert replies == b"".join(b'{"cmd":"queued","id":%d}\r\n' % n for n in range(20))


class Link:
    """A submitter's end, as the broker sees it: what it was sent."""

    def __init__(self):
        self.sent = []

    def send(self, data):
        self.sent.append(data)


def submit(broker, submitter, id, type="t"):
    line = b'{"cmd":"do","id":%d,"type":"%s","arg":%d}' % (id, type.encode(), id)
    broker.submit(submitter, parse_do({"cmd": "do", "id": id, "type": type, "arg": id}, line))


def idle_worker(conn, capacity):
    """Make conn an idle worker of type "t" whose loop records the flushes
    asked for; -> a submitter on the same broker."""
    submitter = conn.broker.connect(Peer(Link()))
    conn.broker.can_do(conn, ["t"], capacity)
    conn.loop = LoopSpy()
    return submitter


def test_the_job_that_fills_an_idle_workers_last_slot_leaves_at_once(pair):
    """Handed out from another connection's batch, a worker's `do` goes to
    the kernel then and there, not in a callback after the rest of that
    batch (by when, with 10,000 workers, the connection was cold again)."""
    conn, theirs = pair
    submitter = idle_worker(conn, 1)
    submit(conn.broker, submitter, 7)
    assert len(conn.held) == 1 and conn.out == [] and conn.loop.callbacks == []
    want = b'{"cmd":"do","id":1,"type":"t","arg":7}\r\n'
    assert read_exactly(theirs, len(want)) == want


def test_a_job_for_a_worker_with_room_left_waits_for_the_end_of_the_turn(pair):
    """Its next jobs may follow in the same turn: they go in one send."""
    conn, theirs = pair
    submitter = idle_worker(conn, 2)
    submit(conn.broker, submitter, 1)
    assert len(conn.out) == 1 and len(conn.loop.callbacks) == 1
    submit(conn.broker, submitter, 2)       # its last slot, but a flush is due
    assert len(conn.out) == 2 and len(conn.loop.callbacks) == 1
    conn.flush()
    want = (b'{"cmd":"do","id":1,"type":"t","arg":1}\r\n{"cmd":"do","id":2,"type":"t","arg":2}'
            b'\r\n')
    assert read_exactly(theirs, len(want)) == want


def test_the_job_that_fills_a_workers_last_slot_waits_for_a_flush_that_is_due(pair):
    """Already due to flush (its own batch, or a message queued this turn),
    the worker's `do` goes with the rest, in one send."""
    conn, theirs = pair
    submitter = idle_worker(conn, 1)
    conn.send(b'{"cmd":"error","error":"x"}\r\n')
    submit(conn.broker, submitter, 1)
    assert len(conn.out) == 2 and len(conn.loop.callbacks) == 1
    conn.flush()
    want = b'{"cmd":"error","error":"x"}\r\n{"cmd":"do","id":1,"type":"t","arg":1}\r\n'
    assert read_exactly(theirs, len(want)) == want


def test_a_last_slot_job_the_kernel_takes_part_of_arrives_whole_before_what_follows(pair):
    """send_now's straight send, taken in part: the rest goes to the writer
    greenlet, and a message queued after it arrives after it."""
    conn, theirs = pair
    submitter = idle_worker(conn, 1)
    conn.raw = RawSpy(conn.raw)
    real_send = conn.raw.send
    conn.raw.send = lambda data: real_send(memoryview(data)[:5])
    submit(conn.broker, submitter, 7)
    assert conn.writer_owns_socket and conn.out_bytes == sum(map(len, conn.out)) > 0
    conn.raw.send = real_send
    conn.send(b'{"cmd":"error","error":"x"}\r\n')
    want = b'{"cmd":"do","id":1,"type":"t","arg":7}\r\n{"cmd":"error","error":"x"}\r\n'
    assert read_exactly(theirs, len(want)) == want
    with gevent.Timeout(5):
        while conn.writer_owns_socket:
            gevent.sleep(0.01)
    assert conn.out == [] and conn.out_bytes == 0


def test_a_last_slot_job_the_kernel_refuses_waits_for_the_writer(pair):
    conn, theirs = pair
    submitter = idle_worker(conn, 1)
    conn.raw = RawSpy(conn.raw)

    def full(data):
        raise BlockingIOError
    conn.raw.send = full
    submit(conn.broker, submitter, 7)
    want = b'{"cmd":"do","id":1,"type":"t","arg":7}\r\n'
    assert conn.out == [want] and conn.out_bytes == len(want) and conn.writer_owns_socket
    assert read_exactly(theirs, len(want)) == want      # the writer sends it with sendall


def test_a_last_slot_job_for_a_worker_gone_for_writing_ends_the_connection(pair):
    conn, theirs = pair
    submitter = idle_worker(conn, 1)
    conn.raw = RawSpy(conn.raw)

    def reset(data):
        raise ConnectionResetError
    conn.raw.send = reset
    submit(conn.broker, submitter, 7)
    assert conn.closing and conn.out == [] and conn.out_bytes == 0


def test_a_last_slot_job_goes_after_what_the_writer_still_has(pair):
    conn, theirs = pair
    submitter = idle_worker(conn, 1)
    conn.out.append(b"earlier\r\n")
    conn.out_bytes = len(b"earlier\r\n")
    conn.writer_owns_socket = True          # as if a partial send was being finished
    submit(conn.broker, submitter, 7)
    assert conn.out == [b"earlier\r\n", b'{"cmd":"do","id":1,"type":"t","arg":7}\r\n']
    conn.hand_to_writer()
    want = b'earlier\r\n{"cmd":"do","id":1,"type":"t","arg":7}\r\n'
    assert read_exactly(theirs, len(want)) == want


def test_nothing_is_sent_to_a_connection_found_broken(pair):
    """broken() leaves the writer owning the socket with nothing queued:
    neither flush() nor send_now's straight send may touch the socket."""
    conn, theirs = pair
    conn.raw = RawSpy(conn.raw)
    calls = []
    conn.raw.send = conn.raw.sendmsg = lambda data: calls.append(data) or len(data)
    conn.broken()
    conn.send_now(b'{"cmd":"do","id":1,"type":"t","arg":7}\r\n')
    conn.flush()
    assert calls == []


def test_a_backlog_bigger_than_the_socket_buffer_arrives_whole_and_in_order(pair):
    """Partial sends, the writer greenlet, sendmsg and joined sends together:
    every byte arrives once, in order."""
    conn, theirs = pair
    rng = random.Random(7)
    pieces = []
    for n in range(300):
        size = rng.choice([20, 300, 5000, BIG_PIECE + 1, 100000])
        pieces.append(bytes([65 + n % 26]) * size)
    total = sum(map(len, pieces))
    for piece in pieces:
        conn.send(piece)
    conn.high_water = total + 1             # this test is not about pausing
    reader = gevent.spawn(read_exactly, theirs, total, 30)
    gevent.sleep(0)                         # the flush callback runs
    assert reader.get(timeout=30) == b"".join(pieces)
    assert conn.out == [] and conn.out_bytes == 0


def test_a_peer_gone_for_writing_ends_the_connection(pair):
    conn, theirs = pair
    theirs.close()
    conn.send(b"x" * 1000)
    with gevent.Timeout(5):
        while not conn.closing:
            gevent.sleep(0.01)
    assert conn.out == []


def test_one_send_never_takes_more_buffers_than_the_kernel_allows():
    assert WRITE_PIECES <= 1024         # IOV_MAX on Linux: sendmsg fails beyond it


def test_a_connection_keeps_its_one_output_list(pair):
    """A fresh list per flush outlived the flush and, with 10,000 workers,
    kept the cyclic GC busy; the list is reused."""
    conn, theirs = pair
    out = conn.out
    for n in range(3):
        conn.send(b'{"cmd":"queued","id":%d}\r\n' % n)
        conn.flush()
        assert conn.out is out and out == []
    assert read_exactly(theirs, 3 * len(b'{"cmd":"queued","id":0}\r\n')).count(b"\n") == 3


def test_the_server_program_collects_young_objects_less_often(monkeypatch):
    import gc
    import deputy_server
    monkeypatch.setattr(deputy_server.Server, "serve_forever", lambda self: 0)
    saved = gc.get_threshold()
    try:
        assert deputy_server.main(["-p", "0"], environ={}) == 0
        assert gc.get_threshold() == (deputy_server.GC_YOUNG_THRESHOLD,) + saved[1:]
    finally:
        gc.set_threshold(*saved)


def test_a_connection_refused_before_auth_stops_its_auth_deadline():
    """A wrong secret ends the connection: its deadline must not fire too
    and send a second error before the close."""
    ours, theirs = gevent.socket.socketpair()
    deadline = gevent.Timeout.start_new(30, AuthTimeout)
    try:
        conn = Connection(Server(port=0, secret="right"), ours, ("test", 0), deadline)
        conn.handle_lines([b'{"cmd":"auth","secret":"wrong"}'])
        assert conn.closing and not deadline.pending
        assert b"authentication failed" in b"".join(conn.out)
    finally:
        deadline.close()
        ours.close()
        theirs.close()


def test_lines_kept_from_a_paused_batch_are_dropped_once_the_connection_closes(pair):
    """A resume that comes after the connection closed (its writer drained)
    must not handle the rest of the batch for a connection being torn down."""
    conn, _ = pair
    conn.watcher = conn.loop.io(conn.sock.fileno(), 1)
    conn.done_reading = gevent.event.Event()
    conn.pending = [b'{"cmd":"do","id":1,"type":"t"}']
    conn.close()
    conn.resume_reading_in_hub()
    assert conn.broker.counters.jobs_added == 0


def test_an_unended_line_sent_a_byte_at_a_time_is_kept_in_one_piece(pair):
    """A slow sender's bytes are merged, not kept as thousands of bytes
    objects (75 times the line's size); big pieces stay as they came."""
    conn, _ = pair
    line = b'{"cmd":"do","id":1,"type":"t","arg":"' + b"x" * 3000 + b'"}'
    for byte in line[:-1]:
        assert conn.complete_lines(bytes([byte])) == []
    assert len(conn.partial) == 1 and conn.partial_len == len(line) - 1
    big = b"y" * BIG_PIECE
    assert conn.complete_lines(big) == [] and conn.partial[-1] is big
    assert conn.complete_lines(b"}\n") == [line[:-1] + big + b"}"]
    assert conn.partial == [] and conn.partial_len == 0


def test_a_big_batch_is_handled_over_several_turns_in_order(pair, monkeypatch):
    """One connection's batch must not keep the others waiting: past its
    turn's time the rest waits for its next turn, after the loop has polled
    the other sockets."""
    import deputy_server
    monkeypatch.setattr(deputy_server, "TURN_SECONDS", 0)
    conn, theirs = pair
    theirs.sendall(b"".join(b'{"cmd":"do","id":%d,"type":"t","bg":true}\r\n' % n
                            for n in range(100)))
    gevent.sleep(0.01)
    conn.watcher = conn.loop.io(conn.sock.fileno(), 1)
    conn.done_reading = gevent.event.Event()
    conn.on_readable()
    assert conn.pending and conn.turn.active            # the rest: in a later turn
    assert conn.broker.counters.jobs_added < 100
    want = b"".join(b'{"cmd":"queued","id":%d}\r\n' % n for n in range(100))
    assert read_exactly(theirs, len(want)) == want
    assert conn.pending is None and conn.broker.counters.jobs_added == 100
    conn.stop_reading_in_hub()


def test_lines_kept_while_paused_go_on_in_a_turn_of_their_own_after_resume(pair):
    """resume() runs inside a flush: a connection that keeps asking for big
    replies and reading them would else never let the loop go."""
    conn, theirs = pair
    conn.watcher = conn.loop.io(conn.sock.fileno(), 1)
    conn.done_reading = gevent.event.Event()
    conn.pause()
    conn.pending = [b'{"cmd":"do","id":1,"type":"t","bg":true}']
    conn.resume()
    assert conn.pending is not None and conn.broker.counters.jobs_added == 0
    assert read_exactly(theirs, 25) == b'{"cmd":"queued","id":1}\r\n'
    assert conn.pending is None
    conn.stop_reading_in_hub()


def test_the_tls_read_loop_yields_between_turns_of_a_big_batch(pair, monkeypatch):
    """read_loop (TLS) gets the rest of a batch back at the end of a turn
    and yields before going on, instead of handling it all at once."""
    import deputy_server
    monkeypatch.setattr(deputy_server, "TURN_SECONDS", 0)
    conn, theirs = pair
    yields = []
    monkeypatch.setattr(Connection, "yield_to_others",
                        lambda self: yields.append(self.broker.counters.jobs_added))
    turn = deputy_server.TURN_CHECK
    lines = [b'{"cmd":"do","id":%d,"type":"t","bg":true}' % n for n in range(turn * 3 + 4)]
    theirs.sendall(b"".join(line + b"\n" for line in lines))
    theirs.shutdown(socket.SHUT_WR)
    conn.read_loop()
    assert yields[:3] == [turn, turn * 2, turn * 3]
    assert conn.broker.counters.jobs_added == len(lines)
