"""SPEC 8: TLS on the TCP listener, and --http: Prometheus /metrics,
/health and the self-updating status page (in a real headless Chromium)."""
import os
import re
import shutil
import socket
import ssl
import time
import urllib.request

import orjson
import pytest

from conftest import RawConn, free_port
from rawhelpers import served_past_the_fd_limit

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file, ca_file = (str(folder / n) for n in ("cert.pem", "key.pem", "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    return cert_file, key_file, ca_file


class TlsConn(RawConn):
    def __init__(self, port, context, server_hostname="localhost"):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = context.wrap_socket(raw, server_hostname=server_hostname)
        self.timeout = 5
        self.buf = b""


def roundtrip(submitter, worker):
    worker.send({"cmd": "can_do", "types": ["tls"]})
    submitter.send({"cmd": "do", "id": "a", "type": "tls", "arg": {"x": "é"}})
    job = worker.expect("do")
    worker.send({"cmd": "did", "id": job["id"], "res": job["arg"]})
    submitter.expect("did", id="a", res={"x": "é"})


def test_tls_listener_serves_jobs_to_verified_clients(start_server, tls_files):
    cert, key, ca = tls_files
    srv = start_server("--tls-cert", cert, "--tls-key", key)
    context = ssl.create_default_context(cafile=ca)
    roundtrip(TlsConn(srv.port, context), TlsConn(srv.port, context))


def test_tls_client_refuses_an_unknown_certificate(start_server, tls_files):
    cert, key, _ = tls_files
    srv = start_server("--tls-cert", cert, "--tls-key", key)
    with pytest.raises(ssl.SSLCertVerificationError):
        TlsConn(srv.port, ssl.create_default_context())


def test_plain_text_on_a_tls_listener_gets_nothing_and_harms_nothing(start_server, tls_files):
    cert, key, ca = tls_files
    srv = start_server("--tls-cert", cert, "--tls-key", key)
    plain = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    plain.sendall(b'{"cmd":"metrics"}\r\n')
    try:
        reply = plain.recv(65536)
    except (ConnectionResetError, socket.timeout):
        reply = b""
    assert b'"metrics"' not in reply
    plain.close()
    context = ssl.create_default_context(cafile=ca)
    roundtrip(TlsConn(srv.port, context), TlsConn(srv.port, context))


def test_a_tls_handshake_not_done_within_auth_timeout_is_closed(start_server, tls_files):
    """A connection that never starts (or finishes) its handshake would park
    a greenlet forever; without a secret, one that finished it stays."""
    cert, key, ca = tls_files
    srv = start_server("--tls-cert", cert, "--tls-key", key, "--auth-timeout", "0.5")
    context = ssl.create_default_context(cafile=ca)
    done = TlsConn(srv.port, context)
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        assert silent.recv(65536) == b""          # closed by the server, not a timeout here
    except ConnectionResetError:
        pass
    silent.close()
    time.sleep(0.2)
    roundtrip(done, TlsConn(srv.port, context))     # past the deadline, still served
    assert "TLS handshake failed: not done within 0.5 s (--auth-timeout)" in srv.stderr()


def test_tls_with_a_secret_must_also_authenticate_within_auth_timeout(start_server, tls_files):
    cert, key, ca = tls_files
    srv = start_server("--tls-cert", cert, "--tls-key", key, "--secret", "pw",
                       "--auth-timeout", "0.5")
    c = TlsConn(srv.port, ssl.create_default_context(cafile=ca))
    msg = c.expect("error")
    assert msg["error"] == "no auth within 0.5 s (--auth-timeout)"
    assert c.is_closed(3)


def test_tls_needs_both_files_and_readable_ones(start_server, tls_files, tmp_path):
    import subprocess
    import sys
    from conftest import SERVER
    cert, key, _ = tls_files
    for args in (["--tls-cert", cert], ["--tls-cert", cert, "--tls-key", str(tmp_path / "none")]):
        proc = subprocess.run([sys.executable, SERVER, "-p", str(free_port())] + args,
                              capture_output=True, timeout=20)
        assert proc.returncode != 0
        lines = proc.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr.decode(), lines


def test_an_encrypted_tls_key_is_one_clear_line_not_a_passphrase_prompt(tls_files, tmp_path):
    """OpenSSL would ask on the terminal (and block there), or print its
    prompt to a closed one before failing."""
    import subprocess
    import sys
    from cryptography.hazmat.primitives import serialization
    from conftest import SERVER
    cert, key, _ = tls_files
    with open(key, "rb") as plain:
        private = serialization.load_pem_private_key(plain.read(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    proc = subprocess.run([sys.executable, SERVER, "-p", str(free_port()), "--tls-cert", cert,
                           "--tls-key", str(encrypted)], capture_output=True, timeout=20,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "is encrypted; give one without a passphrase" in lines[0], lines


# -- HTTP ----------------------------------------------------------------------

def http_get(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as reply:
        return reply.status, reply.headers.get("Content-Type"), reply.read().decode()


@pytest.fixture
def http_server(start_server):
    http_port = free_port()
    srv = start_server("--http", str(http_port))
    srv.http_port = http_port
    return srv


def test_http_connections_that_send_nothing_for_auth_timeout_are_closed(start_server):
    """gevent waits for a request for ever: a stranger opening connections to
    --http and saying nothing would hold a descriptor and a greenlet each.
    Requests that keep coming within the limit are served, on one
    keep-alive connection too."""
    port = free_port()
    srv = start_server("--http", str(port), "--auth-timeout", "0.5")
    started = time.monotonic()          # (before the server accepts them)
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    halfway = socket.create_connection(("127.0.0.1", port), timeout=5)
    halfway.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")      # and never the blank line
    kept = socket.create_connection(("127.0.0.1", port), timeout=5)
    for _ in range(3):
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"\r\n\r\nok\n"):      # headers and body may come apart
            chunk = kept.recv(65536)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
    assert silent.recv(65536) == b""
    answer = b""
    while True:                                 # a 400, then the close
        chunk = halfway.recv(65536)
        if not chunk:
            break
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert time.monotonic() - started >= 0.45
    assert http_get(port, "/health")[0] == 200
    for sock in (silent, halfway, kept):
        sock.close()
    assert "no complete request within 0.5 s (--auth-timeout)" in srv.stderr()
    assert "Traceback" not in srv.stderr()


def test_http_listens_on_loopback_only_when_given_a_port_alone(http_server):
    """SPEC 8: --http PORT is 127.0.0.1:PORT. Bound to 0.0.0.0 it would
    answer on 127.0.0.2 too."""
    assert http_get(http_server.http_port, "/health")[0] == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", http_server.http_port), timeout=1).close()


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("form", ["[::1]:%d", "::1:%d"])
def test_http_takes_an_ipv6_address_with_or_without_brackets(start_server, form):
    """[::1]:PORT is how a URL writes it; both forms listen on ::1."""
    http_port = free_port()
    start_server("--http", form % http_port)
    with urllib.request.urlopen("http://[::1]:%d/health" % http_port, timeout=5) as reply:
        assert reply.status == 200


def run_jobs(srv, type_name, count, result="ok"):
    worker, client = srv.connect(), srv.connect()
    worker.send({"cmd": "can_do", "types": [type_name]})
    worker.metrics()
    for i in range(count):
        client.send({"cmd": "do", "id": i, "type": type_name, "arg": i})
        job = worker.expect("do")
        worker.send({"cmd": "did", "id": job["id"], "res": result})
        client.expect("did", id=i)
    return worker, client


def test_prometheus_metrics_parse_and_carry_per_type_labels(http_server):
    from prometheus_client.parser import text_string_to_metric_families
    worker, client = run_jobs(http_server, 'we"ird\\type', 3)
    client.send({"cmd": "do", "id": "q", "type": "queued-only", "arg": None})
    client.metrics()
    status, content_type, body = http_get(http_server.http_port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("deputy_jobs_done_total", ())] == 3
    assert samples[("deputy_jobs_queued", ())] == 1
    assert samples[("deputy_workers", ())] == 1
    assert samples[("deputy_type_done_total", (("type", 'we"ird\\type'),))] == 3
    assert samples[("deputy_type_queued", (("type", "queued-only"),))] == 1
    assert samples[("deputy_type_idle", (("type", 'we"ird\\type'),))] == 1


def prometheus_samples(http_port):
    from prometheus_client.parser import text_string_to_metric_families
    body = http_get(http_port, "/metrics")[2]
    return {sample.name: sample.value for family in text_string_to_metric_families(body)
            for sample in family.samples if not sample.labels}


def test_prometheus_metrics_carry_the_standard_process_series(http_server):
    """process_cpu_seconds_total and friends, as every Prometheus client
    exports them: README's "rate(process_cpu_seconds_total) near 1"."""
    def open_fds():
        return len(os.listdir("/proc/%d/fd" % http_server.proc.pid))

    before = prometheus_samples(http_server.http_port)
    # The CPU clock ticks every 10 ms: a fast machine runs 200 jobs within
    # one tick, so the server works until it ticks (5 s at most).
    deadline = time.monotonic() + 5
    while True:
        run_jobs(http_server, "p", 200)
        fds_before = open_fds()
        after = prometheus_samples(http_server.http_port)
        fds_after = open_fds()
        if after["process_cpu_seconds_total"] > before["process_cpu_seconds_total"]:
            break
        assert time.monotonic() < deadline, "process_cpu_seconds_total never grew"
    assert before["process_cpu_seconds_total"] > 0
    with open("/proc/%d/status" % http_server.proc.pid) as f:
        rss_kib = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
    assert 0.5 < after["process_resident_memory_bytes"] / (rss_kib * 1024) < 2
    # Earlier tests' connections may still be closing: the count at the
    # scrape lies between the two looks, plus the scrape's own socket and
    # the directory the server lists its fds from.
    low, high = min(fds_before, fds_after), max(fds_before, fds_after) + 2
    assert low <= after["process_open_fds"] <= high, (fds_before, fds_after)
    assert abs(after["process_start_time_seconds"] - time.time()) < 60


def test_the_startup_line_says_the_http_port_the_system_chose(start_server):
    srv = start_server("--http", "0")
    deadline = time.monotonic() + 5     # (written right after the job port opens)
    while not re.search("listening on", srv.stderr()) and time.monotonic() < deadline:
        time.sleep(0.02)
    found = re.search(r"listening on .*http://127\.0\.0\.1:(\d+)", srv.stderr())
    assert found, srv.stderr()
    assert http_get(int(found.group(1)), "/health")[0] == 200


def test_health_and_unknown_paths(http_server):
    assert http_get(http_server.http_port, "/health")[:1] == (200,)
    with pytest.raises(urllib.error.HTTPError) as missing:
        http_get(http_server.http_port, "/nope")
    assert missing.value.code == 404


def test_malformed_http_requests_are_answered_and_their_log_lines_throttled(http_server):
    """gevent logs a line per bad request, with its bytes: through the
    server's throttle, so a loop of them cannot fill the log; the server
    goes on serving HTTP and jobs."""
    for n in range(60):
        with socket.create_connection(("127.0.0.1", http_server.http_port), timeout=5) as s:
            s.sendall(b"GET /%d HTTP/1.1 and junk\r\n\r\n" % n)
            s.settimeout(5)
            assert s.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", http_server.http_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150))
                  + b"\r\n")
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 400")      # too many headers
    assert http_get(http_server.http_port, "/health")[0] == 200
    logged = http_server.stderr()
    assert 1 <= logged.count("Invalid HTTP method") <= 20, logged[-2000:]
    assert "and junk" not in logged         # (the request's bytes are never logged)
    assert "Traceback" not in logged
    run_jobs(http_server, "after-bad-http", 1)


def test_http_out_of_file_descriptors_says_so_once_and_recovers(http_server):
    """As the job listener: one warning, not a traceback a second, and the
    waiting requests are served once connections close."""
    err = served_past_the_fd_limit(http_server, http_server.http_port,
                                   b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200")
    assert "Traceback" not in err
    assert err.count("cannot accept connections: Too many open files") == 1, err


def test_both_listeners_out_of_file_descriptors_say_so_once(http_server):
    """The job port and --http run out together: one warning for the
    server (README: one every 10 s), not one per listener; then both serve
    again."""
    import resource
    resource.prlimit(http_server.proc.pid, resource.RLIMIT_NOFILE, (48, 48))
    held = [socket.create_connection(("127.0.0.1", port), timeout=10)
            for port in (http_server.port, http_server.http_port) for _ in range(40)]
    try:
        time.sleep(1.5)             # both listeners fail to accept meanwhile
    finally:
        for sock in held:
            sock.close()
    assert http_get(http_server.http_port, "/health")[0] == 200
    run_jobs(http_server, "fds", 1)
    err = http_server.stderr()
    assert err.count("cannot accept connections: Too many open files") == 1, err


def test_status_page_is_self_contained(http_server):
    status, content_type, body = http_get(http_server.http_port, "/")
    assert status == 200 and content_type.startswith("text/html")
    lowered = body.lower()
    for outside in ("src=\"http", "href=\"http", "@import", "src='http", "//cdn"):
        assert outside not in lowered
    data = orjson.loads(http_get(http_server.http_port, "/status.json")[2])
    assert set(data["metrics"]) >= {"jobs_done", "types"}


def test_secret_is_never_in_metrics_or_http(start_server):
    http_port = free_port()
    srv = start_server("--http", str(http_port), "--secret", "s3cr3t-value")
    conn = srv.connect()
    conn.send({"cmd": "auth", "secret": "s3cr3t-value"})
    conn.expect("auth", ok=True)
    assert "s3cr3t-value" not in orjson.dumps(conn.metrics()).decode()
    for path in ("/metrics", "/", "/status.json", "/health"):
        assert "s3cr3t-value" not in http_get(http_port, path)[2]


@pytest.mark.parametrize("line", [
    b'{"cmd":"auth","secret":"s3cr3t-value"}\r\n',          # a job client on the wrong port
    b'GET /s3cr3t-value HTTP/1.1 x\r\n\r\n',              # gevent quotes the line
    b'POST s3cr3t-value\r\n\r\n',
    b'GET / HTTP/s3cr3t-value\r\n\r\n',
], ids=["json", "five-words", "two-words", "bad-version"])
def test_a_malformed_http_request_is_logged_without_its_bytes(start_server, line):
    """SPEC 8: the secret is never logged. gevent's line for a bad request
    quotes the request; the server logs gevent's reason only."""
    http_port = free_port()
    srv = start_server("--http", str(http_port), "--secret", "s3cr3t-value")
    with socket.create_connection(("127.0.0.1", http_port), timeout=5) as s:
        s.sendall(line)
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert http_get(http_port, "/health")[0] == 200      # (after the bad one's log line)
    logged = srv.stderr()
    assert "request line is not logged" in logged or "not an HTTP request" in logged, logged
    assert "s3cr3t" not in logged, logged


def test_other_methods_than_get_and_head_get_405(http_server):
    request = urllib.request.Request("http://127.0.0.1:%d/health" % http_server.http_port,
                                     data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405 and refused.value.read() == b"GET or HEAD only\n"


def test_head_answers_the_headers_of_get_without_a_body(http_server):
    """On one keep-alive connection: a body after a HEAD answer would be
    read as the start of the next answer."""
    with socket.create_connection(("127.0.0.1", http_server.http_port), timeout=5) as s:
        s.settimeout(5)
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while got.count(b"HTTP/1.1 200") < 2 or not got.endswith(b"ok\n"):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    head, get = got.split(b"HTTP/1.1 200")[1:]
    assert b"Content-Length: 3\r\n" in head and head.endswith(b"\r\n\r\n")
    assert get.endswith(b"\r\n\r\nok\n")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and "
                    "chromium-driver (.ci/run installs them)")
def test_status_page_updates_itself_in_a_real_browser(http_server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--user-data-dir=%s" % (tmp_path / "profile")):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.set_page_load_timeout(20)
        browser.get("http://127.0.0.1:%d/" % http_server.http_port)

        def cell(type_name, column):
            # One script call: the page rebuilds its rows every second.
            return browser.execute_script(
                "var row = document.querySelector('tr[data-type=\"' + arguments[0] + '\"]');"
                "return row ? row.cells[arguments[1]].textContent : null;", type_name, column)

        def wait_for(predicate, what, timeout=10):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                value = predicate()
                if value:
                    return value
                time.sleep(0.1)
            raise AssertionError("the page never showed " + what)

        wait_for(lambda: browser.find_element(By.ID, "state").text == "live", "live")
        assert cell("browser", 0) is None
        # Jobs run while the page stays open: it shows them without a reload.
        worker, client = run_jobs(http_server, "browser", 5)
        wait_for(lambda: cell("browser", 5) == "5", "5 jobs done")
        assert cell("browser", 3) == "1"            # one worker
        client.send({"cmd": "do", "id": "w", "type": "browser", "arg": None})
        worker.expect("do")
        wait_for(lambda: cell("browser", 2) == "1", "a running job")
        rate = wait_for(lambda: cell("browser", 7) not in (None, "-") and cell("browser", 7),
                        "a jobs/s figure")
        assert float(rate) >= 0
        browser.save_screenshot(str(tmp_path / "status.png"))
        assert os.path.getsize(tmp_path / "status.png") > 1000
    finally:
        browser.quit()


def test_health_says_draining_while_a_sigterm_drain_waits(http_server):
    import signal
    worker, client = http_server.connect(), http_server.connect()
    worker.send({"cmd": "can_do", "types": ["slow"]})
    client.send({"cmd": "do", "id": 1, "type": "slow", "arg": None})
    job = worker.expect("do")
    http_server.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:
        try:
            http_get(http_server.http_port, "/health")
        except urllib.error.HTTPError as refused:
            assert refused.code == 503 and refused.read() == b"draining\n"
            break
        assert time.monotonic() < deadline, "/health never said draining"
        time.sleep(0.05)
    # The job listener is closed, the HTTP one is not.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", http_server.port), timeout=2).close()
    worker.send({"cmd": "did", "id": job["id"], "res": "late but delivered"})
    client.expect("did", id=1, res="late but delivered")
    assert http_server.wait(10) == 0


def test_tls_connection_pipelining_thousands_of_jobs_gets_every_result(start_server, tls_files):
    """TLS connections (which read through the writer greenlet and the TLS
    path of the read loop) pipeline thousands of jobs both ways."""
    cert, key, ca = tls_files
    srv = start_server("--tls-cert", cert, "--tls-key", key)
    context = ssl.create_default_context(cafile=ca)
    worker, client = TlsConn(srv.port, context), TlsConn(srv.port, context)
    worker.send({"cmd": "can_do", "types": ["tls"], "capacity": 5000})
    worker.send({"cmd": "metrics"})
    worker.expect("metrics")
    n = 3000
    client.send(*({"cmd": "do", "id": i, "type": "tls", "arg": i} for i in range(n)))
    jobs = worker.recv_n(n, timeout=20)
    worker.send(*({"cmd": "did", "id": job["id"], "res": job["arg"]} for job in jobs))
    results = client.recv_n(n, timeout=20)
    assert sorted(msg["id"] for msg in results) == list(range(n))
    assert all(msg["res"] == msg["id"] for msg in results)
