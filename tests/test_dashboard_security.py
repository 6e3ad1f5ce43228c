"""dashboard.py as an attacker sees it (issue 13): only regular files inside LOGDIR, only the Host
it is bound to, a bounded read of each status file, and JSON for every error."""

import http.client
import json
import os
import socket
import threading
import time

import pytest

import dashboard  # the repository root is on sys.path (conftest.py)

GOOD = {"run_id": "smoke", "state": "training", "step": 3}


@pytest.fixture
def logdir(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "smoke.status.json").write_text(json.dumps(GOOD))
    (tmp_path / "secret.status.json").write_text('{"secret": "leaked"}')
    return logs


@pytest.fixture
def server(logdir):
    srv = dashboard.make_server(logdir, 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02})
    thread.daemon = True
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(srv, path, host=None, method="GET"):
    """(status, headers, body); host replaces the Host header http.client would send."""
    conn = http.client.HTTPConnection(*srv.server_address, timeout=10)
    try:
        if host is None:
            conn.request(method, path)
        else:
            conn.putrequest(method, path, skip_host=True)
            conn.putheader("Host", host)
            conn.endheaders()
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def raw(srv, request):
    """Send raw bytes; returns (status, headers text, body) of the answer."""
    with socket.create_connection(srv.server_address, timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body


def error_of(headers, body):
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)["error"]


# --- files ------------------------------------------------------------------------------------


def test_a_symlink_out_of_the_logs_folder_is_refused_and_not_listed(logdir, server):
    (logdir / "evil.status.json").symlink_to(logdir.parent / "secret.status.json")
    code, headers, body = fetch(server, "/api/status/evil")
    assert code == 403 and b"leaked" not in body and "not a regular file" in error_of(headers, body)
    code, _, body = fetch(server, "/api/runs")
    assert code == 200 and [run["run_id"] for run in json.loads(body)] == ["smoke"]


def test_a_symlink_inside_the_logs_folder_is_refused_too(logdir, server):
    (logdir / "alias.status.json").symlink_to(logdir / "smoke.status.json")
    assert fetch(server, "/api/status/alias")[0] == 403


def test_a_fifo_is_refused_without_blocking(logdir, server):
    os.mkfifo(logdir / "pipe.status.json")
    assert fetch(server, "/api/status/pipe")[0] == 403
    assert fetch(server, "/api/runs")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/status/../secret",
        "/api/status/..%2Fsecret",
        "/api/status/%2e%2e%2fsecret",
        "/api/status/%2Ftmp%2Fsecret",
        "/api/status/..",
        "/../secret.status.json",
        "/api/status/smoke%00",
    ],
)
def test_traversal_is_refused_with_a_json_error(server, path):
    code, headers, body = fetch(server, path)
    assert code in (400, 404) and b"leaked" not in body
    assert error_of(headers, body)


# --- Host -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost"]
)
def test_a_wrong_host_is_refused(server, host):
    port = server.server_address[1]
    code, headers, body = fetch(server, "/api/status/smoke", host=host.format(port=port))
    assert code == 421 and b"training" not in body
    assert "127.0.0.1" in error_of(headers, body)


def test_a_missing_host_is_refused(server):
    code, _head, body = raw(server, b"GET /api/runs HTTP/1.0\r\n\r\n")
    assert code == 400 and json.loads(body) == {"error": "missing Host header"}


def test_the_bound_address_is_answered(server):
    port = server.server_address[1]
    assert fetch(server, "/api/status/smoke", host=f"127.0.0.1:{port}")[0] == 200


def test_localhost_with_the_bound_port_is_answered(server):
    port = server.server_address[1]
    assert fetch(server, "/api/status/smoke", host=f"localhost:{port}")[0] == 200


# --- a huge status file -----------------------------------------------------------------------


def test_a_huge_status_file_costs_one_bounded_read(logdir, server, monkeypatch):
    path = logdir / "huge.status.json"
    with open(path, "wb") as f:  # 100 MB, sparse: the disk is not filled
        f.write(b'{"run_id": "huge", "pad": "')
        f.truncate(100 * 10**6)
    read = []
    real_read = dashboard.read_regular_file
    monkeypatch.setattr(
        dashboard,
        "read_regular_file",
        lambda p, limit: read.append(real_read(p, limit)) or read[-1],
    )
    start = time.perf_counter()
    code, headers, body = fetch(server, "/api/status/huge")
    assert time.perf_counter() - start < 2.0
    assert code == 404 and "over 1048576 bytes" in error_of(headers, body)
    assert [len(chunk) for chunk in read] == [dashboard.MAX_STATUS_BYTES + 1]


def test_a_status_file_grown_huge_serves_its_last_good_copy(logdir, server):
    assert fetch(server, "/api/status/smoke")[0] == 200
    path = logdir / "smoke.status.json"
    path.write_text(json.dumps({**GOOD, "pad": "x" * (dashboard.MAX_STATUS_BYTES + 10)}))
    code, _, body = fetch(server, "/api/status/smoke")
    assert code == 200 and json.loads(body) == {**GOOD, "stale": True}


# --- JSON errors ------------------------------------------------------------------------------


def test_a_malformed_request_line_is_answered_in_json(server):
    code, head, body = raw(server, b"NONSENSE\r\n\r\n")
    assert code == 400 and "application/json" in head and json.loads(body)["error"]


def test_an_overlong_uri_is_answered_in_json(server):
    code, head, body = raw(server, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
    assert code == 414 and "application/json" in head and json.loads(body)["error"]


@pytest.mark.parametrize(
    "path, want", [("/nope", 404), ("/api/status/nope", 404), ("/api/status/a b", 400)]
)
def test_every_refusal_is_json(server, path, want):
    code, headers, body = fetch(server, path.replace(" ", "%20"))
    assert code == want and error_of(headers, body)


def test_a_refused_method_is_json(server):
    code, headers, body = fetch(server, "/api/runs", method="POST")
    assert code == 405 and error_of(headers, body)
