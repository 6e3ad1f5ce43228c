"""Live training dashboard: a read-only web page over the runs' status files.

    python dashboard.py                  # reads logs/, serves http://127.0.0.1:8765/
    python dashboard.py runs/ --port 9000

Each training script replaces logs/<RUN_ID>.status.json atomically every few steps
(docs/design.md, "Logs and telemetry"); this server only reads those files. It binds to
127.0.0.1, answers GET and HEAD only, and has no endpoint that writes or controls anything
(docs/techniques.md, Telemetry: the dashboard is read-only).

What it will not do: serve anything but a regular file inside LOGDIR (a status file that is a
symlink, a FIFO or a device is refused, whatever it points to), answer a request whose Host header
is not the address:port it is bound to (a DNS-rebinding page in the browser cannot read the runs),
or read more than MAX_STATUS_BYTES of a status file (a huge file costs one bounded read, not the
server's memory).
Every failure is answered as JSON, {"error": "..."}, with its HTTP status.

Routes:
    /                     dashboard.html (read from next to this file)
    /api/runs             [{"run_id", "mtime", "state"}, ...] for every *.status.json, newest first
    /api/status/<run_id>  the run's status JSON, plus "stale": true when it is the last good copy

Stdlib only, so it runs wherever the trainer runs.
"""

import argparse
import json
import math
import os
import re
import stat
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

HOST = "127.0.0.1"  # loopback only: the page shows unpublished results
DEFAULT_PORT = 8765
STATUS_SUFFIX = ".status.json"
RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")  # no "/" and no "%", so no way out of LOGDIR
PAGE = Path(__file__).resolve().with_name("dashboard.html")
MAX_STATUS_BYTES = 1 << 20  # a status file is a few KB; anything over 1 MiB is not one


# -----------------------------------------------------------------------------
# STATUS FILES
#
# The writer replaces the file atomically, but a file may still be missing (the run has not started,
# or was cleaned up) or half-written (a writer that does not use os.replace, a copy in progress).
# We parse on the server and keep the last good copy per run, so the page never sees broken JSON.
# NaN and Infinity (a diverged loss) become null: browsers' JSON.parse rejects them.
# -----------------------------------------------------------------------------


def _finite_or_none(text):
    value = float(text)
    return value if math.isfinite(value) else None


class StatusError(Exception):
    """A status request that cannot be answered: the HTTP code and a one-line reason."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def read_regular_file(path, limit):
    """At most limit + 1 bytes of path, which must be a regular file and not a symlink (O_NOFOLLOW:
    checked by the same open that reads, so the file cannot be swapped in between). OSError when it
    is missing or anything else."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path}: not a regular file")
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class StatusReader:
    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self._last_good = {}
        self._lock = threading.Lock()  # requests are served on several threads

    def status_path(self, run_id):
        """LOGDIR/<run_id>.status.json, a regular file directly inside LOGDIR: the run id has no
        "/" and the file is not a symlink, so its real path is inside LOGDIR's. StatusError 400 for
        a bad run id, 403 when the file is a symlink or not a regular file; a missing file is left
        to read()."""
        if not RUN_ID_RE.fullmatch(run_id):
            raise StatusError(400, "bad run id: use letters, digits, _ . -")
        path = self.logdir / (run_id + STATUS_SUFFIX)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return path  # missing: read() serves the last good copy or 404
        if not stat.S_ISREG(mode):
            raise StatusError(403, f"the status file of run {run_id} is not a regular file")
        return path

    def read(self, run_id):
        """The run's status dict ("stale": False), else its last good copy ("stale": True).

        StatusError: 400 for a bad run id, 403 for a symlink or a non-regular file, 404 when there
        is neither a readable file (at most MAX_STATUS_BYTES of JSON) nor a last good copy."""
        path = self.status_path(run_id)
        try:
            raw = read_regular_file(path, MAX_STATUS_BYTES)
            if len(raw) > MAX_STATUS_BYTES:
                raise ValueError(f"over {MAX_STATUS_BYTES} bytes")
            status = json.loads(
                raw.decode("utf-8"),
                parse_float=_finite_or_none,
                parse_constant=lambda _: None,
            )
            if not isinstance(status, dict):
                raise ValueError("status is not a JSON object")
        except (OSError, ValueError) as exc:  # missing, unreadable, truncated, too big, not UTF-8
            with self._lock:
                last_good = self._last_good.get(run_id)
            if last_good is None:
                reason = "missing" if isinstance(exc, FileNotFoundError) else "unreadable"
                if isinstance(exc, ValueError) and str(exc).startswith("over "):
                    reason = str(exc)
                raise StatusError(404, f"no status file for run {run_id} ({reason})") from None
            return {**last_good, "stale": True}
        status["stale"] = False
        with self._lock:
            self._last_good[run_id] = status
        return status

    def runs(self):
        """Every run with a status file in LOGDIR, newest first; [] when LOGDIR does not exist.
        Symlinks and other non-regular files are left out."""
        if not self.logdir.is_dir():
            return []
        runs = []
        for path in self.logdir.glob("*" + STATUS_SUFFIX):
            run_id = path.name[: -len(STATUS_SUFFIX)]
            try:
                info = os.lstat(self.status_path(run_id))
                status = self.read(run_id)
            except (OSError, StatusError):  # removed since the glob, a symlink, not a status
                continue
            runs.append({"run_id": run_id, "mtime": info.st_mtime, "state": status.get("state")})
        runs.sort(key=lambda run: run["mtime"], reverse=True)
        return runs


# -----------------------------------------------------------------------------
# HTTP SERVER
#
# HTTP/1.0 (the http.server default): one request per connection, so an unread request body of a
# refused POST cannot be mistaken for the next request. Request logging is off; errors go to the
# client as one-line JSON, and no request can take the server down.
# -----------------------------------------------------------------------------


class DashboardHandler(BaseHTTPRequestHandler):
    server_version = "dashboard"
    # A malformed request line is answered with headers (and its JSON error), never as HTTP/0.9.
    default_request_version = "HTTP/1.0"

    def do_GET(self):
        self._serve(send_body=True)

    def do_HEAD(self):
        self._serve(send_body=False)

    def __getattr__(self, name):
        # http.server answers a method it has no do_<METHOD> for with 501; a read-only server says
        # 405 to every method but GET and HEAD.
        if name.startswith("do_"):
            return self._refuse_method
        raise AttributeError(name)

    def _refuse_method(self):
        if not self._host_ok(send_body=True):
            return
        self._send_json(
            405,
            {"error": f"{self.command} not allowed: the dashboard is read-only"},
            send_body=True,
            extra_headers={"Allow": "GET, HEAD"},
        )

    def _host_ok(self, send_body):
        """True when the Host header names the address:port this server is bound to (or
        localhost:port on loopback); else the
        request is answered 400 (no Host) or 421 (another name: DNS rebinding) and False."""
        host = self.headers.get("Host")
        address, port = self.server.server_address[:2]
        if host is None:
            self._send_json(400, {"error": "missing Host header"}, send_body)
            return False
        allowed = {f"{address}:{port}"}
        if address == "127.0.0.1":
            # The loopback name a person types: it resolves only to this machine, so it is no
            # DNS-rebinding door (a rebinding page arrives under its own domain name).
            allowed.add(f"localhost:{port}")
        if host.strip().lower() not in allowed:
            self._send_json(
                421, {"error": f"this server answers only Host {address}:{port}"}, send_body
            )
            return False
        return True

    def _serve(self, send_body):
        path = unquote(urlsplit(self.path).path)
        reader = self.server.reader
        try:
            if not self._host_ok(send_body):
                return
            if path in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8", send_body)
            elif path == "/api/runs":
                self._send_json(200, reader.runs(), send_body)
            elif path.startswith("/api/status/"):
                self._send_json(200, reader.read(path[len("/api/status/") :]), send_body)
            else:
                self._send_json(404, {"error": f"no such page: {path}"}, send_body)
        except StatusError as exc:
            self._send_json(exc.code, {"error": str(exc)}, send_body)
        except ConnectionError:  # the browser went away mid-answer
            pass
        except Exception as exc:  # a bad file or a bug must cost one request, not the server
            try:
                self._send_json(500, {"error": f"{type(exc).__name__}: {exc}"}, send_body)
            except OSError:
                pass

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, an over-long URI or header) as
        JSON like every other error, instead of its HTML page."""
        self.close_connection = True
        reason = message or HTTPStatus(code).phrase
        send_body = getattr(self, "command", None) != "HEAD" and code >= 200
        try:
            self._send_json(code, {"error": reason}, send_body)
        except OSError:
            pass

    def _send_json(self, code, obj, send_body, extra_headers=None):
        body = json.dumps(obj, allow_nan=False).encode("utf-8")
        self._send(code, body, "application/json", send_body, extra_headers)

    def _send(self, code, body, content_type, send_body, extra_headers=None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # every poll must see the file as it is now
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # quiet: a poll every 10 s per run would drown the terminal


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck browser connection must not block Ctrl-C

    def __init__(self, logdir, port):
        super().__init__((HOST, port), DashboardHandler)
        self.reader = StatusReader(logdir)


def make_server(logdir, port=DEFAULT_PORT):
    """A DashboardServer on 127.0.0.1:port (0 = any free port), not yet serving."""
    return DashboardServer(logdir, port)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Read-only live dashboard of the training runs' status files."
    )
    parser.add_argument(
        "logdir",
        nargs="?",
        default="logs",
        help="directory holding <RUN_ID>.status.json files (default: logs)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port on 127.0.0.1 to serve on, 0 for any free one (default: {DEFAULT_PORT})",
    )
    args = parser.parse_args(argv)
    try:
        server = make_server(args.logdir, args.port)
    except OSError as exc:
        sys.exit(f"dashboard: cannot listen on {HOST}:{args.port}: {exc.strerror or exc}")
    print(
        f"dashboard: http://{HOST}:{server.server_address[1]}/ (reading {args.logdir})", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
