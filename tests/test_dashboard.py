"""dashboard.py and dashboard.html: the read-only status server, then the page in a real
headless browser.

The browser tests drive the system Chromium from its command line (--dump-dom, --screenshot) with a
virtual-time budget: timers run on virtual time, which does not advance while a fetch is pending, so
the page's polls happen in a fixed order without any sleeping. They are skipped when there is no
Chromium (`apt-get install chromium`; CHROMIUM=/path/to/binary to use another).
"""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

import dashboard  # the repository root is on sys.path (conftest.py)

ROOT = Path(__file__).resolve().parents[1]

FIXTURES = ROOT / "tests" / "fixtures" / "status"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason=f"no browser at {CHROMIUM} (apt-get install chromium)"
)


# -----------------------------------------------------------------------------
# HELPERS
# -----------------------------------------------------------------------------


@pytest.fixture
def logdir(tmp_path):
    """A LOGDIR holding copies of the recorded runs, smoke the older one."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for path in FIXTURES.glob("*.status.json"):
        shutil.copy(path, logs / path.name)
    os.utime(logs / "smoke.status.json", (1_700_000_000, 1_700_000_000))
    return logs


@pytest.fixture
def serve():
    """serve(logdir, handler=None) -> a running server on an ephemeral port;
    stopped after the test."""
    servers = []

    def start(logdir, handler=None):
        server = dashboard.make_server(logdir, 0)
        if handler is not None:
            server.RequestHandlerClass = handler
        # A short poll interval: shutdown() waits up to one interval.
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fetch(server, path, method="GET"):
    """(status code, headers, body bytes); the path goes out exactly as given."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def fetch_json(server, path):
    code, _, body = fetch(server, path)
    return code, json.loads(body)


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def rewrite(path, **changes):
    path.write_text(json.dumps({**load(path), **changes}), encoding="utf-8")


def url(server, query=""):
    return f"http://127.0.0.1:{server.server_address[1]}/{query}"


def chromium(tmp_path, *args, budget_ms=3000):
    """Runs headless Chromium with a fresh profile; returns its stdout (the DOM for --dump-dom)."""
    profile = Path(tmp_path) / f"profile-{len(list(Path(tmp_path).glob('profile-*')))}"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


class Dom(HTMLParser):
    """A dumped page: attributes and text of every element with an id, and the attributes of all."""

    VOID = {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    }

    def __init__(self, html):
        super().__init__()
        self.by_id, self.text, self.elements, self._open = {}, {}, [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append(attrs)
        if "id" in attrs:
            self.by_id[attrs["id"]] = attrs
            self.text[attrs["id"]] = ""
        if tag not in self.VOID:
            self._open.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if tag not in self.VOID and self._open:
            self._open.pop()

    def handle_data(self, data):
        for element_id in filter(None, self._open):
            self.text[element_id] += data

    def points(self, chart_id):
        return int(self.by_id[chart_id]["data-points"])

    def with_class(self, name):
        return [attrs for attrs in self.elements if name in attrs.get("class", "").split()]


def dump(tmp_path, server, query, budget_ms=3000):
    dom = Dom(chromium(tmp_path, "--dump-dom", url(server, query), budget_ms=budget_ms))
    assert dom.by_id["errors"]["data-count"] == "0", dom.text["errors"]
    return dom


# -----------------------------------------------------------------------------
# SERVER
# -----------------------------------------------------------------------------


def test_runs_lists_every_status_file_newest_first(logdir, serve):
    (logdir / "notes.txt").write_text("not a status file")
    code, runs = fetch_json(serve(logdir), "/api/runs")
    assert code == 200
    assert [(r["run_id"], r["state"]) for r in runs] == [
        ("hydra_smoke", "training"),
        ("smoke", "done"),
    ]
    assert runs[1]["mtime"] == 1_700_000_000


def test_status_serves_the_file_json(logdir, serve):
    code, status = fetch_json(serve(logdir), "/api/status/smoke")
    assert code == 200
    assert status == {**load(logdir / "smoke.status.json"), "stale": False}


def test_root_serves_the_page(logdir, serve):
    code, headers, body = fetch(serve(logdir), "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert body == (ROOT / "dashboard.html").read_bytes()


def test_head_sends_headers_without_a_body(logdir, serve):
    code, headers, body = fetch(serve(logdir), "/api/status/smoke", method="HEAD")
    assert code == 200 and int(headers["Content-Length"]) > 0 and body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_every_method_but_get_and_head_is_refused(logdir, serve, method):
    before = sorted(p.name for p in logdir.iterdir())
    code, headers, _ = fetch(serve(logdir), "/api/status/smoke", method=method)
    assert code == 405 and headers["Allow"] == "GET, HEAD"
    assert sorted(p.name for p in logdir.iterdir()) == before


@pytest.mark.parametrize(
    "path",
    [
        "/api/status/../secret",
        "/api/status/..%2Fsecret",
        "/api/status/%2e%2e%2fsecret",
        "/api/status/%2Ftmp%2Fsecret",
        "/api/status/",
        "/../secret.status.json",
    ],
)
def test_path_traversal_is_refused(logdir, serve, path):
    (logdir.parent / "secret.status.json").write_text('{"secret": "leaked"}')
    code, _, body = fetch(serve(logdir), path)
    assert code in (400, 404) and b"leaked" not in body


def test_half_written_file_is_served_as_its_last_good_copy_marked_stale(logdir, serve):
    server, path = serve(logdir), logdir / "smoke.status.json"
    fetch_json(server, "/api/status/smoke")
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    code, status = fetch_json(server, "/api/status/smoke")
    assert code == 200 and status["stale"] is True and status["step"] == json.loads(good)["step"]
    assert fetch_json(server, "/api/runs")[0] == 200  # still serving
    path.write_text(good)  # the writer's next replace
    assert fetch_json(server, "/api/status/smoke")[1]["stale"] is False


def test_half_written_file_without_a_good_copy_is_404(logdir, serve):
    (logdir / "fresh.status.json").write_text('{"run_id": "fresh", "step": 1')
    code, body = fetch_json(serve(logdir), "/api/status/fresh")
    assert code == 404 and "fresh" in body["error"]


def test_deleted_file_is_served_as_its_last_good_copy_marked_stale(logdir, serve):
    server = serve(logdir)
    fetch_json(server, "/api/status/smoke")
    (logdir / "smoke.status.json").unlink()
    code, status = fetch_json(server, "/api/status/smoke")
    assert code == 200 and status["stale"] is True


def test_unknown_run_is_404(logdir, serve):
    assert fetch(serve(logdir), "/api/status/nope")[0] == 404


def test_missing_logdir_lists_no_runs(tmp_path, serve):
    server = serve(tmp_path / "not-there")
    assert fetch_json(server, "/api/runs") == (200, [])
    assert fetch(server, "/api/status/smoke")[0] == 404


def test_nan_and_infinity_are_served_as_null(logdir, serve):
    # A diverged run may write NaN (Python's json allows it); browsers' JSON.parse does not.
    (logdir / "nan.status.json").write_text(
        '{"train_loss": NaN, "smma100": Infinity, "val_bpb": 1e999}'
    )
    _, _, body = fetch(serve(logdir), "/api/status/nan")
    status = json.loads(body, parse_constant=lambda name: pytest.fail(f"served {name}"))
    assert status["train_loss"] is None and status["smma100"] is None and status["val_bpb"] is None


def test_server_listens_on_loopback_only(logdir):
    server = dashboard.make_server(logdir, 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_command_line_prints_the_address_and_logdir(logdir):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "dashboard.py"), str(logdir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    assert re.fullmatch(
        rf"dashboard: http://127\.0\.0\.1:\d+/ \(reading {re.escape(str(logdir))}\)\n", line
    )


# -----------------------------------------------------------------------------
# PAGE IN A HEADLESS BROWSER
# -----------------------------------------------------------------------------


@needs_chromium
def test_page_draws_the_recorded_runs(tmp_path, logdir, serve):
    smoke, hydra = load(logdir / "smoke.status.json"), load(logdir / "hydra_smoke.status.json")
    dom = dump(tmp_path, serve(logdir), "?run=smoke,hydra_smoke")
    assert dom.text["hdr-run"] == "smoke" and dom.by_id["hdr-state"]["data-state"] == smoke["state"]
    assert dom.text["hdr-step"] == f"{smoke['step']} / {smoke['iterations']}"
    assert (
        dom.text["val-bpb"] == f"{smoke['val_bpb']:.4f}"
        and dom.by_id["val-bpb"]["data-run"] == "smoke"
    )
    for chart in ("chart-loss", "chart-bpb", "chart-lr", "chart-tps", "chart-coherence"):
        assert dom.points(chart) > 0, chart
    assert dom.points("chart-bpb") == len(smoke["history"]["val_bpb"]) + len(
        hydra["history"]["val_bpb"]
    )
    budget = {row["data-run"]: row for row in dom.with_class("budget-row")}
    assert int(budget["smoke"]["data-total"]) == smoke["artifact_bytes"] + smoke["code_bytes"]
    assert (
        budget["smoke"]["data-exact"] == "true" and budget["hydra_smoke"]["data-exact"] == "false"
    )
    assert budget["smoke"]["data-over"] == "false"
    assert dom.by_id["audit-verdict"]["data-valid"] == "true"
    assert (
        "hidden" not in dom.by_id["geometry-panel"]
        and dom.by_id["geometry"]["data-run"] == "hydra_smoke"
    )
    assert dom.points("chart-analogy") == len(hydra["history"]["analogy"])
    assert int(dom.by_id["last-update"]["data-polls"]) >= 1


@needs_chromium
def test_a_second_load_shows_the_file_as_it_is_now(tmp_path, logdir, serve):
    server, path = serve(logdir), logdir / "smoke.status.json"
    assert dump(tmp_path, server, "?run=smoke").text["val-bpb"] == f"{load(path)['val_bpb']:.4f}"
    history = load(path)["history"]
    history["val_step"].append(250)
    history["val_bpb"].append(2.3001)
    rewrite(path, step=250, iterations=250, val_bpb=2.3001, history=history)
    dom = dump(tmp_path, server, "?run=smoke")
    assert dom.text["val-bpb"] == "2.3001" and dom.text["hdr-step"] == "250 / 250"
    assert dom.points("chart-bpb") == len(history["val_bpb"])


@needs_chromium
def test_the_page_polls_and_shows_a_changed_file(tmp_path, logdir, serve):
    path = logdir / "smoke.status.json"
    status_requests = []

    class ChangesAfterFirstPoll(dashboard.DashboardHandler):
        # The file changes just before the second status request is read: the first poll must show
        # the old value, and only a second poll can show the new one.
        def do_GET(self):
            if self.path.startswith("/api/status/smoke"):
                status_requests.append(self.path)
                if len(status_requests) == 2:
                    rewrite(path, step=260, val_bpb=2.2222)
            super().do_GET()

    dom = dump(tmp_path, serve(logdir, ChangesAfterFirstPoll), "?run=smoke&poll=1", budget_ms=3500)
    assert len(status_requests) >= 2
    assert int(dom.by_id["last-update"]["data-polls"]) >= 2
    assert dom.text["val-bpb"] == "2.2222" and dom.by_id["hdr-step"]["data-value"] == "260"


@needs_chromium
def test_the_page_keeps_the_last_data_when_the_server_stops_answering(tmp_path, logdir, serve):
    requests = []

    class GoesDownAfterFirstPoll(dashboard.DashboardHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path.startswith("/api/runs") and requests.count(self.path) > 1:
                self.send_error(503)
            elif self.path.startswith("/api/status/") and requests.count(self.path) > 1:
                self.send_error(503)
            else:
                super().do_GET()

    dom = dump(tmp_path, serve(logdir, GoesDownAfterFirstPoll), "?run=smoke&poll=1", budget_ms=2500)
    assert dom.by_id["notice"]["data-kind"] == "offline" and "hidden" not in dom.by_id["notice"]
    assert "hidden" not in dom.by_id["stale"]
    assert dom.text["val-bpb"] == f"{load(logdir / 'smoke.status.json')['val_bpb']:.4f}"
    assert dom.points("chart-loss") > 0


@needs_chromium
def test_the_page_marks_a_stale_status(tmp_path, logdir, serve):
    server, path = serve(logdir), logdir / "smoke.status.json"
    fetch(server, "/api/status/smoke")  # the server now holds a good copy
    path.write_text(path.read_text()[:100])
    dom = dump(tmp_path, server, "?run=smoke")
    assert "hidden" not in dom.by_id["stale"] and dom.text["hdr-run"] == "smoke"


@needs_chromium
def test_the_page_flags_a_failed_audit_and_an_over_budget_artifact(tmp_path, logdir, serve):
    path = logdir / "smoke.status.json"
    rewrite(
        path,
        artifact_bytes=15_990_000,
        sample="<b>not markup</b> & more",
        audits={"causality": {"passed": False, "leak_at": 17}, "bytes": {"passed": True}},
    )
    dom = dump(tmp_path, serve(logdir), "?run=smoke")
    assert (
        dom.text["audit-verdict"] == "score INVALID"
        and dom.by_id["audit-verdict"]["data-valid"] == "false"
    )
    audits = {row["data-audit"]: row["data-passed"] for row in dom.elements if "data-audit" in row}
    assert audits == {"causality": "false", "bytes": "true"}
    (row,) = dom.with_class("budget-row")
    assert row["data-over"] == "true" and "over" in row["class"].split()
    assert dom.text["sample"] == "<b>not markup</b> & more"  # shown as text, not parsed as HTML


@needs_chromium
def test_the_page_copes_with_missing_and_odd_fields(tmp_path, logdir, serve):
    (logdir / "odd.status.json").write_text(
        json.dumps(
            {
                "run_id": "odd",
                "step": "12",
                "val_bpb": None,
                "audits": {"causality": {}},
                "probes": [],
                "geometry": "n/a",
                "history": {"step": [1, 2, None, 4], "train_loss": [5.0, None, 4.0, "x"]},
            }
        )
    )
    dom = dump(tmp_path, serve(logdir), "?run=odd")
    assert dom.text["hdr-run"] == "odd" and dom.text["val-bpb"] == "—"
    assert dom.points("chart-loss") == 1 and dom.points("chart-bpb") == 0
    # an audit without "passed" is no pass
    assert dom.by_id["audit-verdict"]["data-valid"] == "false"
    assert "hidden" in dom.by_id["geometry-panel"]


@needs_chromium
def test_screenshot_of_the_recorded_runs(tmp_path, logdir, serve):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(
        tmp_path,
        f"--screenshot={shot}",
        "--window-size=1400,1000",
        url(serve(logdir), "?run=smoke,hydra_smoke"),
    )
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1400, 1000)
    assert len(png) > 50_000  # a blank page is a few kB


@needs_chromium
def test_the_page_shows_the_step_under_way_and_its_eta(tmp_path, logdir, serve):
    """Issue 25: the status file's `progress` (stage, fraction, units, ETA) in the header while
    the run is active; a finished run's last progress is not shown as if under way."""
    progress = {"stage": "eval sliding", "fraction": 0.37, "done": 370, "total": 1000,
                "eta_s": 42.4, "elapsed_s": 24.6}  # fmt: skip
    rewrite(logdir / "smoke.status.json", state="evaluating", progress=progress)
    dom = dump(tmp_path, serve(logdir), "?run=smoke")
    assert dom.text["hdr-progress"] == "eval sliding 37% (370/1000), eta 42s"
    assert dom.by_id["hdr-progress"]["data-eta"] == "42.4"
    assert dom.by_id["hdr-progress"]["data-fraction"] == "0.37"
    rewrite(logdir / "smoke.status.json", state="done")
    dom = dump(tmp_path, serve(logdir), "?run=smoke")
    assert dom.text["hdr-progress"] == "—"
