"""deputy_client's framing and line writing, in process: splitting what a
read returns into lines, a worker's `did` lines, and a send that the
kernel takes only in part; a job the server took back before it started.
Plus one big result through a real server."""
import orjson
import pytest

from test_client_helpers import WAIT, clients, job_type, shared_server  # noqa: F401
from deputy_client import complete_lines, did_line, send_all


def test_a_read_of_whole_lines_gives_them_all():
    parts = []
    assert complete_lines(parts, b'{"a":1}\r\n{"b":2}\r\n') == [b'{"a":1}\r', b'{"b":2}\r']
    assert parts == []


@pytest.mark.parametrize("cut", [1, 5, 9, 10, 15])
def test_a_line_cut_across_reads_is_joined(cut):
    data = b'{"a":1}\r\n{"b":22}\r\n'
    parts = []
    lines = list(complete_lines(parts, data[:cut])) + list(complete_lines(parts, data[cut:]))
    assert lines == [b'{"a":1}\r', b'{"b":22}\r'] and parts == []


def test_a_long_line_over_many_reads_is_joined_once_at_its_end():
    parts = []
    for _ in range(10):
        assert complete_lines(parts, b"x" * 1000) == ()
    assert len(parts) == 10
    assert complete_lines(parts, b"y\nz") == [b"x" * 10000 + b"y"]
    assert parts == [b"z"]


@pytest.mark.parametrize("value", ["text", 0, -2 ** 63, 2 ** 64 - 1, None, [1, {"k": "null"}],
                                   1.5, {"deep": [[["null"]]]}])
def test_a_did_line_is_the_json_of_its_message(value):
    for field in (b"res", b"err"):
        line = did_line(7, field, value)
        assert line.endswith(b"\r\n") and line.count(b"\n") == 1
        assert orjson.loads(line) == {"cmd": "did", "id": 7, field.decode(): value}


def test_a_did_line_for_an_id_that_is_not_an_integer_is_still_json():
    line = did_line("w-1", b"res", "ok")
    assert orjson.loads(line) == {"cmd": "did", "id": "w-1", "res": "ok"}


@pytest.mark.parametrize("value", [float("nan"), [float("inf")], 2 ** 64, {"a": -2 ** 63 - 1}, {1, 2}])
def test_a_did_line_refuses_what_json_cannot_carry_exactly(value):
    with pytest.raises(TypeError):
        did_line(7, b"res", value)


class SlowSocket:
    """A socket whose kernel buffer takes at most `room` bytes per send."""

    def __init__(self, room):
        self.room = room
        self.received = bytearray()
        self.calls = 0

    def send(self, data):
        self.calls += 1
        taken = bytes(data[:self.room])
        self.received += taken
        return len(taken)

    def sendall(self, data):
        while len(data):
            data = data[self.send(data):]


@pytest.mark.parametrize("room", [1, 7, 4096, 10 ** 6])
def test_send_all_delivers_every_byte_in_order_when_sends_fall_short(room):
    data = bytes(range(256)) * 40
    sock = SlowSocket(room)
    send_all(sock, data)
    assert bytes(sock.received) == data
    if room >= len(data):
        assert sock.calls == 1      # the usual case: one plain send


def test_a_result_bigger_than_the_socket_buffers_arrives_whole(shared_server, clients):
    worker = clients(shared_server.address)
    submitter = clients(shared_server.address)
    t = job_type()
    worker.can_do({t: lambda size: "r" * size}, capacity=4)
    jobs = [submitter.do(t, 700000) for _ in range(4)]
    for job in jobs:
        assert job.get(WAIT) == "r" * 700000


class FakeClient:
    """What a Worker reads of its client."""
    max_line = 1 << 20
    closed = False
    connections = []


class FakeConnection:
    label = "fake"

    def __init__(self):
        self.held, self.sent, self.throttled = {}, [], False

    def send(self, line):
        self.sent.append(orjson.loads(line))


def test_a_job_taken_back_before_its_slot_started_never_runs():
    """The server's cancel can arrive in the same read as its do: the job
    is held, waiting for the loop to give it a slot, and must not run."""
    import gevent
    from deputy_client import Worker

    ran = []
    worker = Worker(FakeClient(), shared=False)
    worker.handlers = {"echo": lambda arg: ran.append(arg) or arg}
    worker.capacity = 4
    conn = FakeConnection()
    for wid in (1, 2, 3):
        worker.take(conn, {"cmd": "do", "id": wid, "type": "echo", "arg": "a%d" % wid})
    worker.cancel(conn, 2)
    gevent.sleep(0)         # the loop's turn: the dispatch runs
    assert ran == ["a1", "a3"]
    assert conn.sent == [{"cmd": "did", "id": 1, "res": "a1"}, {"cmd": "did", "id": 3, "res": "a3"}]
    assert (worker.held, worker.running, len(worker.ready)) == (0, 0, 0)
