"""
harness: start and stop what the integration tests need, speak raw HTTP/1.1.

Standard library only (Debian's python3).  A test file builds one or more
"pairs" (a fake upstream and a dsgate in front of it), runs its tests through
a Runner that prints one line per test (`PASS name` / `FAIL name: reason`)
and, at the end, one machine-readable line `RESULT passed=N failed=N` that
tests/run.sh adds up; a file's main() is harness.main(suite, tests, ...).
Where build/fake_upstream cannot do what a test needs, ScriptedUpstream
answers from a script of data (status, verbatim headers, timed body pieces,
reset/close/hold/keep-alive).  Every wait has a deadline; nothing sleeps
blindly.
Everything started here is stopped (SIGTERM, then SIGKILL after a deadline)
even when a test fails or the interpreter is interrupted.

dsgate's stderr goes to $DSGATE_TEST_LOGDIR/dsgate-<tag>-<n>.log (a temporary
directory when unset); tests/run.sh scans those files for sanitizer reports.
"""

import atexit
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from http import HTTPStatus

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DSGATE = os.environ.get("DSGATE_BIN", os.path.join(ROOT, "build", "asan", "dsgate"))
FAKE = os.environ.get("FAKE_UPSTREAM_BIN", os.path.join(ROOT, "build", "fake_upstream"))

_tmp_root = tempfile.mkdtemp(prefix="dsgate-it-")
LOGDIR = os.environ.get("DSGATE_TEST_LOGDIR") or _tmp_root
os.makedirs(LOGDIR, exist_ok=True)

# Sanitizer settings for dsgate (tests/run.sh may override them, e.g. to turn
# leak detection off where LeakSanitizer cannot run).
ASAN_OPTIONS = os.environ.get(
    "DSGATE_ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1")
UBSAN_OPTIONS = os.environ.get(
    "DSGATE_UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")

# Variables dsgate reads that must not leak in from the caller's environment.
_SCRUB_ENV = ("DSGATE_LISTEN", "DSGATE_UPSTREAM", "DSGATE_REDIS_URL",
              "DEEPSEEK_API_KEY", "http_proxy", "https_proxy", "HTTP_PROXY",
              "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")

_procs = []          # every process started here, stopped at exit
_log_seq = [0]


def now_ms():
    """CLOCK_MONOTONIC in ms (the fake's clock in /_log)."""
    return time.monotonic() * 1000.0


def free_port():
    """A loopback port that was free a moment ago."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(pred, timeout, interval=0.02):
    """Poll PRED until it returns a true value or TIMEOUT seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def stop_process(p, timeout=10.0):
    """SIGTERM, wait up to TIMEOUT s, then SIGKILL.  Returns the exit code."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    return p.returncode


def _stop_all():
    for p in reversed(_procs):
        try:
            stop_process(p, 5.0)
        except Exception:
            pass
    if not os.environ.get("DSGATE_TEST_KEEP_TMP"):
        shutil.rmtree(_tmp_root, ignore_errors=True)


atexit.register(_stop_all)


def _on_signal(signum, frame):
    _stop_all()
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)


# ---------------------------------------------------------------- raw HTTP

class HTTPError(Exception):
    pass


class Response:
    def __init__(self):
        self.status = None
        self.reason = ""
        self.version = ""
        self.headers = []            # [(name, value)] as received
        self.body = b""
        self.chunked = False
        self.complete = False        # terminating chunk / full length seen
        self.t_head = None           # monotonic s when the head was complete
        self.t_end = None
        self.chunks = []             # [(monotonic s, bytes)] body pieces

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        b = self.body[:300]
        return "<Response %s %r>" % (self.status, b)


class Conn:
    """One client connection: send bytes, parse responses incrementally."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.eof = False
        self.timeout = timeout

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline, n=65536):
        """Read more into the buffer.  False on EOF."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise HTTPError("timed out")
        self.sock.settimeout(left)
        try:
            d = self.sock.recv(n)
        except socket.timeout:
            raise HTTPError("timed out")
        except ConnectionResetError:
            d = b""
        if not d:
            self.eof = True
            return False
        self.buf += d
        return True

    def _line(self, deadline):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if not self._fill(deadline):
                raise HTTPError("connection closed in a line (%r)" % bytes(self.buf[:100]))

    def _take(self, n, deadline):
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise HTTPError("connection closed after %d of %d bytes" % (len(self.buf), n))
        d = bytes(self.buf[:n])
        del self.buf[:n]
        return d

    def read_head(self, timeout=None, resp=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        r = resp or Response()
        while True:
            line = self._line(deadline)
            parts = line.decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                raise HTTPError("bad status line %r" % line)
            r.version = parts[0]
            r.status = int(parts[1])
            r.reason = parts[2] if len(parts) > 2 else ""
            r.headers = []
            while True:
                h = self._line(deadline)
                if not h:
                    break
                k, _, v = h.decode("latin-1").partition(":")
                r.headers.append((k.strip(), v.strip()))
            if r.status >= 200 or r.status == 101:
                break                      # skip 1xx interim answers
        r.t_head = time.monotonic()
        te = (r.header("transfer-encoding") or "").lower()
        r.chunked = "chunked" in te
        return r

    def iter_body(self, r, timeout=None, method="GET"):
        """Yield body pieces as they arrive (decoded from chunked)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        if method == "HEAD" or r.status in (204, 304) or 100 <= r.status < 200:
            r.complete = True
            return
        if r.chunked:
            while True:
                line = self._line(deadline)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._line(deadline):     # trailers
                        pass
                    r.complete = True
                    return
                d = self._take(size, deadline)
                if self._take(2, deadline) != b"\r\n":
                    raise HTTPError("bad chunk framing")
                yield d
            return
        cl = r.header("content-length")
        if cl is not None:
            left = int(cl)
            while left > 0:
                if not self.buf and not self._fill(deadline):
                    raise HTTPError("connection closed with %d body bytes missing" % left)
                d = bytes(self.buf[:left])
                del self.buf[:left]
                left -= len(d)
                yield d
            r.complete = True
            return
        # until close
        while True:
            if self.buf:
                d = bytes(self.buf)
                del self.buf[:]
                yield d
            if not self._fill(deadline):
                r.complete = True
                return

    def read_response(self, timeout=None, method="GET"):
        t = timeout or self.timeout
        r = self.read_head(t)
        parts = []
        for d in self.iter_body(r, t, method):
            r.chunks.append((time.monotonic(), d))
            parts.append(d)
        r.body = b"".join(parts)
        r.t_end = time.monotonic()
        return r


def build_request(method, path, headers=None, body=None, port=None, host=None):
    """Bytes of one HTTP/1.1 request.  HEADERS: list of pairs or dict."""
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in hs}
    if "host" not in names:
        hs.insert(0, ("Host", host or "127.0.0.1:%d" % (port or 80)))
    if body is not None:
        if isinstance(body, str):
            body = body.encode("utf-8")
        if "content-length" not in names and "transfer-encoding" not in names:
            hs.append(("Content-Length", str(len(body))))
    out = "%s %s HTTP/1.1\r\n" % (method, path)
    out += "".join("%s: %s\r\n" % (k, v) for k, v in hs)
    out += "\r\n"
    return out.encode("latin-1") + (body or b"")


def request(port, method, path, headers=None, body=None, timeout=10.0):
    """One request on a fresh connection (Connection: close)."""
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if not any(k.lower() == "connection" for k, _ in hs):
        hs.append(("Connection", "close"))
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        if not any(k.lower() == "content-type" for k, _ in hs):
            hs.append(("Content-Type", "application/json"))
    with Conn(port, timeout=timeout) as c:
        c.send(build_request(method, path, hs, body, port=port))
        return c.read_response(timeout, method)


def raw_exchange(port, data, timeout=10.0):
    """Send raw bytes, read one response (or EOF).  Returns Response or None."""
    with Conn(port, timeout=timeout) as c:
        try:
            c.send(data)
        except OSError:
            pass
        try:
            return c.read_response(timeout)
        except HTTPError:
            return None


def parse_sse(data):
    """Split an SSE byte stream into events: [{"event":..,"data":..,"comment":..}]."""
    events = []
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        ev = {"event": None, "data": None, "comments": []}
        datas = []
        for line in block.split("\n"):
            if line.startswith(":"):
                ev["comments"].append(line[1:].strip())
            elif line.startswith("data:"):
                datas.append(line[5:][1:] if line[5:6] == " " else line[5:])
            elif line.startswith("event:"):
                ev["event"] = line[6:].strip()
        if datas:
            ev["data"] = "\n".join(datas)
        if ev["data"] is None and ev["event"] is None:
            continue                      # comment-only block
        events.append(ev)
    return events


class Stream:
    """A streamed (SSE) answer: the response, its events with arrival times."""

    def __init__(self):
        self.resp = None
        self.events = []          # dicts from parse_sse, plus "t" (monotonic s)
        self.comments = 0         # comment-only blocks (keep-alives)
        self.error = None         # transport problem (HTTPError text) or None
        self.t_sent = None
        self.t_end = None
        self.raw = b""

    def data_events(self):
        return [e for e in self.events if e["data"] is not None and not is_error_event(e)]

    def chunks(self):
        """Parsed JSON chunks of the data events other than [DONE]."""
        out = []
        for e in self.data_events():
            if e["data"] != "[DONE]":
                out.append(json.loads(e["data"]))
        return out

    def joined(self, field):
        s = ""
        for ch in self.chunks():
            for c in ch.get("choices") or []:
                v = (c.get("delta") or {}).get(field)
                if isinstance(v, str):
                    s += v
        return s


def sse_request(port, body, headers=None, timeout=15.0, path="/v1/chat/completions",
                conn=None, stop_after=None):
    """POST BODY (dict or bytes) and read an SSE answer, timing each event.

    STOP_AFTER: return (with the connection still open, as st.conn) once that
    many data events have arrived.
    """
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    hs.append(("Content-Type", "application/json"))
    hs.append(("Accept", "text/event-stream"))
    if stop_after is None and not any(k.lower() == "connection" for k, _ in hs):
        hs.append(("Connection", "close"))
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    st = Stream()
    c = conn or Conn(port, timeout=timeout)
    st.conn = c
    st.t_sent = time.monotonic()
    c.send(build_request("POST", path, hs, body, port=port))
    deadline = st.t_sent + timeout
    try:
        r = c.read_head(timeout)
        st.resp = r
        pending = b""
        parts = []
        for d in c.iter_body(r, max(0.1, deadline - time.monotonic())):
            parts.append(d)
            pending += d
            pending = pending.replace(b"\r\n", b"\n")
            while b"\n\n" in pending:
                block, pending = pending.split(b"\n\n", 1)
                evs = parse_sse(block + b"\n\n")
                if not evs and block.strip():
                    st.comments += 1
                for ev in evs:
                    ev["t"] = time.monotonic()
                    st.events.append(ev)
            if stop_after is not None and len(st.data_events()) >= stop_after:
                st.raw = b"".join(parts)
                return st
        st.raw = b"".join(parts)
        r.body = st.raw
    except HTTPError as e:
        st.error = str(e)
    finally:
        st.t_end = time.monotonic()
        if stop_after is None and conn is None:
            c.close()
    return st


def is_error_event(ev):
    if ev["event"] == "error":
        return True
    if ev["data"] and ev["data"] != "[DONE]":
        try:
            j = json.loads(ev["data"])
        except ValueError:
            return False
        return isinstance(j, dict) and "error" in j
    return False


def openai_error_shape(resp):
    """None if RESP's body is {"error":{"message","type","code"}}, else why not."""
    try:
        j = resp.json()
    except Exception:
        return "body is not JSON: %r" % resp.body[:200]
    e = j.get("error") if isinstance(j, dict) else None
    if not isinstance(e, dict):
        return "no error object: %r" % resp.body[:200]
    for k in ("message", "type", "code"):
        if k not in e:
            return "error object lacks %r: %r" % (k, resp.body[:200])
    if not isinstance(e["message"], str) or not e["message"]:
        return "error.message is not a non-empty string"
    ct = (resp.header("content-type") or "").lower()
    if "application/json" not in ct:
        return "content-type %r is not application/json" % ct
    return None


# ---------------------------------------------------------------- processes

def _drain(stream, path):
    with open(path, "ab") as f:
        for line in iter(stream.readline, b""):
            f.write(line)
            f.flush()


class Fake:
    """build/fake_upstream on a free port."""

    def __init__(self, *args, name="fake"):
        self.name = name
        self.stderr_path = os.path.join(LOGDIR, "fake-%s-%d.log" % (name, _next_seq()))
        errf = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [FAKE, "--port", "0", "--name", name] + list(args),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
        errf.close()
        _procs.append(self.proc)
        self.port = self._read_ready(10.0)
        threading.Thread(target=_drain, args=(self.proc.stdout, self.stderr_path),
                         daemon=True).start()

    def _read_ready(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                stop_process(self.proc)
                raise RuntimeError("fake_upstream did not print READY (got %r)" % buf)
            r, _, _ = select.select([fd], [], [], left)
            if r:
                d = os.read(fd, 1)
                if not d:
                    continue
                buf += d
        line = buf.decode().strip()
        if not line.startswith("READY "):
            raise RuntimeError("fake_upstream said %r" % line)
        return int(line.split()[1])

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def get_json(self, path):
        r = request(self.port, "GET", path, timeout=5.0)
        if r.status != 200:
            raise RuntimeError("fake %s: %d" % (path, r.status))
        return r.json()

    def stats(self):
        return self.get_json("/_stats")

    def log(self):
        return self.get_json("/_log")

    def reset(self):
        request(self.port, "POST", "/_reset", body=b"", timeout=5.0)

    def find(self, test_id, timeout=2.0, pred=None):
        """The /_log entry whose X-Test-Id header is TEST_ID (and PRED holds)."""
        def look():
            for e in self.log():
                if (e.get("headers") or {}).get("x-test-id") == test_id:
                    if pred is None or pred(e):
                        return e
            return None
        return wait_until(look, timeout, 0.01)

    def stop(self):
        return stop_process(self.proc)


def _next_seq():
    _log_seq[0] += 1
    return _log_seq[0]


def yaml_quote(s):
    return json.dumps(s)       # a JSON string is a valid YAML double-quoted scalar


def make_config(listen_port, upstream_url, api_key_env=None, timeouts=None,
                limits=None, retry_attempts=1, cache=False, extra="",
                upstream_extra="", name="fake"):
    """YAML text for one dsgate with one upstream."""
    t = {"connect": "2s", "first_data": "30s", "idle": "30s", "total": "0"}
    t.update(timeouts or {})
    lines = [
        "# written by tests/integration/harness.py",
        "listen: 127.0.0.1:%d" % listen_port,
        "upstreams:",
        "  - name: %s" % name,
        "    url: %s" % yaml_quote(upstream_url),
    ]
    if api_key_env is not None:
        lines.append("    api_key_env: %s" % yaml_quote(api_key_env))
    lines.append("    max_inflight: 64")
    lines.append("    timeouts: {%s}" % ", ".join("%s: %s" % kv for kv in t.items()))
    if upstream_extra:
        lines.append(upstream_extra.rstrip("\n"))
    lines += [
        "retry:",
        "  max_attempts: %d" % retry_attempts,
        "cache:",
        "  enabled: %s" % ("true" if cache else "false"),
    ]
    if limits:
        lines.append("limits:")
        for k, v in limits.items():
            lines.append("  %s: %s" % (k, v))
    lines.append("shutdown_timeout: 3s")
    lines.append("log: {level: info, format: json}")
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


class Dsgate:
    """build/asan/dsgate with a config written to a temp dir."""

    def __init__(self, config_text=None, env=None, tag="dsgate", port=None,
                 upstream_url=None, wait=True, **cfg):
        self._args = dict(config_text=config_text, env=env, tag=tag,
                          upstream_url=upstream_url, wait=wait, **cfg)
        self.port = port or free_port()
        if config_text is None:
            config_text = make_config(self.port, upstream_url, **cfg)
        self.dir = tempfile.mkdtemp(prefix="cfg-", dir=_tmp_root)
        self.config_path = os.path.join(self.dir, "dsgate.yaml")
        with open(self.config_path, "w") as f:
            f.write(config_text)
        self.log_path = os.path.join(LOGDIR, "dsgate-%s-%d.log" % (tag, _next_seq()))
        e = dict(os.environ)
        for k in _SCRUB_ENV:
            e.pop(k, None)
        e["ASAN_OPTIONS"] = ASAN_OPTIONS
        e["UBSAN_OPTIONS"] = UBSAN_OPTIONS
        e.update(env or {})
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen([DSGATE, "-c", self.config_path],
                                     stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, env=e)
        logf.close()
        _procs.append(self.proc)
        if wait:
            self.wait_healthy(15.0)

    @property
    def pid(self):
        return self.proc.pid

    def wait_healthy(self, timeout):
        def ok():
            if self.proc.poll() is not None:
                raise RuntimeError("dsgate exited with %s before /healthz answered; log %s:\n%s"
                                   % (self.proc.returncode, self.log_path, self.log_tail()))
            try:
                return request(self.port, "GET", "/healthz", timeout=1.0).status == 200
            except (OSError, HTTPError):
                return False
        if not wait_until(ok, timeout, 0.05):
            raise RuntimeError("dsgate /healthz not 200 within %.0fs; log:\n%s"
                               % (timeout, self.log_tail()))

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_tail(self, n=2000):
        return self.log_text()[-n:]

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def alive(self):
        return self.proc.poll() is None

    def restart(self):
        """A new dsgate like this one (new port when the config was generated)."""
        self.stop(5.0)
        return Dsgate(**self._args)

    def crash_summary(self):
        """The first sanitizer line of the log, or its last line."""
        text = self.log_text()
        for line in text.splitlines():
            if ("SUMMARY: " in line or "runtime error:" in line
                    or "ERROR: AddressSanitizer" in line or "ERROR: LeakSanitizer" in line):
                if "SUMMARY" in line or "runtime error" in line:
                    return line.strip()
        for line in text.splitlines():
            if "ERROR: " in line:
                return line.strip()
        lines = text.strip().splitlines()
        return lines[-1][:300] if lines else "(empty log)"

    def stop(self, timeout=10.0):
        return stop_process(self.proc, timeout)


# ---------------------------------------------------------------- scripted upstream

class UpstreamRequest:
    """One request a ScriptedUpstream received (or, with http=False, the
    first bytes of one connection)."""

    def __init__(self):
        self.n = None               # index over all requests of the upstream: 0, 1, ...
        self.conn = None            # index of its connection (order of accept)
        self.seq = None             # index on its connection (keep-alive): 0, 1, ...
        self.method = None
        self.path = None
        self.version = None
        self.headers = []           # [(name, value)] as received
        self.head = ""              # request line and header lines, as text
        self.body = b""             # decoded (Content-Length or chunked)
        self.raw = b""              # http=False: the bytes received first
        self.t_head = None          # monotonic s: head complete
        self.t = None               # monotonic s: whole request received
        self.answer = None          # the answer it got (dict)
        self.client_closed = False  # the client left before the answer was done
        self.t_client_closed = None

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def __repr__(self):
        return "<UpstreamRequest #%s %s %s>" % (self.n, self.method, self.path)


_ANSWER_KEYS = {"status", "reason", "headers", "body", "framing", "raw", "delay_ms",
                "action", "at", "hold_ms", "fin"}
_ACTIONS = ("close", "keep", "reset", "hold")
NEVER = {"action": "hold", "at": "start"}     # accept the request, never answer


def _pieces(body):
    """[(delay ms, bytes)] from bytes or a list of bytes / (delay ms, bytes)."""
    if body is None:
        return []
    if isinstance(body, (bytes, bytearray)):
        return [(0, bytes(body))]
    out = []
    for p in body:
        if isinstance(p, tuple):
            out.append((p[0], bytes(p[1])))
        else:
            out.append((0, bytes(p)))
    return out


class _UConn:
    def __init__(self, sock, index):
        self.sock = sock
        self.index = index
        self.buf = bytearray()
        self.eof = False


class ScriptedUpstream:
    """An upstream that answers from a script of data, and records requests.

    SCRIPT is one answer (a dict, given to every request), a list of answers
    (the Nth request, counted over all connections, gets the Nth; the last
    one repeats) or a callable that returns the answer for an
    UpstreamRequest (it has .n, .method, .path, .headers, .body).

    An answer is a dict; every key is optional:
      status, reason   status line (200, its usual phrase)
      headers          [(name, value)], sent verbatim and in order (odd,
                       duplicated and hop-by-hop headers included)
      body             bytes, or a list of pieces: bytes or (delay ms, bytes)
      framing          "length" (default): add Content-Length (the sum of
                       the pieces) unless the headers carry Content-Length
                       or Transfer-Encoding; "chunked": add
                       Transfer-Encoding: chunked (unless there) and send each
                       piece as a chunk, then the last chunk; "none": add
                       nothing (the body ends when the connection does)
      raw              bytes or pieces sent verbatim instead of status,
                       headers and body (garbage, hand-made framing)
      delay_ms         wait this long before the first byte
      action           after the answer: "close" (FIN, the default),
                       "keep" (keep-alive: read the next request on the
                       connection), "reset" (RST: SO_LINGER 0, then close),
                       "hold" (stay open and silent until the client leaves,
                       hold_ms pass or the upstream stops, then close)
      at               when the action happens instead of after the whole
                       answer: k (int) after the head and the first k pieces
                       (with raw: the first k pieces), "start" before any byte
                       (hold: never answer; reset: a reset for an answer)
      hold_ms          the most a hold lasts (default 30000)
      fin              True (plain HTTP, action close): the answer's last bytes
                       and the FIN leave in one segment (TCP_CORK, then
                       shutdown), so that the client sees the close as soon
                       as it has read the answer and never reuses the
                       connection
    NEVER is {"action": "hold", "at": "start"}.

    http=False: no HTTP parsing; each connection's first bytes (what one read
    returns within first_bytes_ms; b"" if none) are recorded as a request
    with .raw, then the answer is carried out (raw/action/at/delay_ms).
    tls=(cert file, key file): serve HTTPS (handshakes are counted).

    Recorded: .requests [UpstreamRequest] in the order they were complete,
    .arrivals (their .t), .connections (accepted), .handshakes (TLS), .received (http=False: every
    connection's first bytes, joined), .errors (exceptions in a handler).
    Threads, one per connection; every read and write has a deadline
    (io_timeout s; idle_timeout s between keep-alive requests); stop() closes
    the listener and every connection and joins the threads.
    """

    def __init__(self, script, http=True, tls=None, io_timeout=5.0, idle_timeout=30.0,
                 first_bytes_ms=2000, backlog=64):
        self.script = script
        self.http = http
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self.first_bytes_ms = first_bytes_ms
        self.requests = []
        self.connections = 0
        self.handshakes = 0
        self.errors = []
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self._socks = set()
        self._threads = []
        self.ctx = None
        if tls:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(tls[0], tls[1])
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(backlog)
        self.port = self.lsock.getsockname()[1]
        self._acceptor = threading.Thread(target=self._serve, daemon=True)
        self._acceptor.start()

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.ctx else "http", self.port)

    @property
    def arrivals(self):
        """Monotonic s each request was received (whole), in order."""
        with self.lock:
            return [r.t for r in self.requests]

    @property
    def received(self):
        with self.lock:
            return b"".join(r.raw for r in self.requests)

    def wait_requests(self, n, timeout=5.0):
        """True once N requests have been recorded (within TIMEOUT s)."""
        return bool(wait_until(lambda: len(self.requests) >= n, timeout, 0.01))

    # -- serving

    def _serve(self):
        while not self._stopping.is_set():
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            if self._stopping.is_set():
                s.close()
                return
            with self.lock:
                idx = self.connections
                self.connections += 1
                self._socks.add(s)
                t = threading.Thread(target=self._conn, args=(s, idx), daemon=True)
                self._threads.append(t)
            t.start()

    def _conn(self, s, idx):
        c = _UConn(s, idx)
        try:
            s.settimeout(self.io_timeout)
            if self.ctx is not None:
                try:
                    c.sock = self.ctx.wrap_socket(s, server_side=True)
                except OSError:          # ssl.SSLError included
                    return
                with self.lock:
                    self._socks.add(c.sock)
                    self.handshakes += 1
            seq = 0
            while not self._stopping.is_set():
                req = self._read_request(c, seq) if self.http else self._read_first(c)
                if req is None:
                    return
                ans = self._pick(req)
                if not self._answer(c, req, ans):
                    return
                if not self.http:
                    return
                seq += 1
        except Exception as e:           # noqa: BLE001
            if not self._stopping.is_set() and not isinstance(e, OSError):
                self.errors.append(e)
        finally:
            with self.lock:
                self._socks.discard(s)
                self._socks.discard(c.sock)
            try:
                c.sock.close()
            except OSError:
                pass

    def _recv(self, c, deadline):
        """Read more into c.buf until DEADLINE.  False on EOF, timeout or stop."""
        left = deadline - time.monotonic()
        if left <= 0 or self._stopping.is_set():
            return False
        c.sock.settimeout(left)
        try:
            d = c.sock.recv(65536)
        except (socket.timeout, OSError):
            return False
        if not d:
            c.eof = True
            return False
        c.buf += d
        return True

    def _read_first(self, c):
        deadline = time.monotonic() + self.first_bytes_ms / 1000.0
        self._recv(c, deadline)
        req = UpstreamRequest()
        req.raw = bytes(c.buf)
        del c.buf[:]
        req.t_head = req.t = time.monotonic()
        return self._record(req, c, 0)

    def _read_request(self, c, seq):
        deadline = time.monotonic() + (self.idle_timeout if seq else self.io_timeout)
        while b"\r\n\r\n" not in c.buf:
            if not self._recv(c, deadline):
                return None
            if seq and len(c.buf):
                deadline = max(deadline, time.monotonic() + self.io_timeout)
        i = c.buf.index(b"\r\n\r\n")
        head = bytes(c.buf[:i]).decode("latin-1")
        del c.buf[:i + 4]
        req = UpstreamRequest()
        req.t_head = time.monotonic()
        req.head = head
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        req.method = parts[0]
        req.path = parts[1] if len(parts) > 1 else ""
        req.version = parts[2] if len(parts) > 2 else ""
        for line in lines[1:]:
            k, _, v = line.partition(":")
            req.headers.append((k.strip(), v.strip()))
        deadline = time.monotonic() + self.io_timeout
        te = (req.header("transfer-encoding") or "").lower()
        if "chunked" in te:
            body = bytearray()
            while True:
                while b"\r\n" not in c.buf:
                    if not self._recv(c, deadline):
                        return None
                j = c.buf.index(b"\r\n")
                size = int(bytes(c.buf[:j]).split(b";")[0].strip() or b"0", 16)
                del c.buf[:j + 2]
                if size == 0:
                    while True:            # trailers up to the empty line
                        while b"\r\n" not in c.buf:
                            if not self._recv(c, deadline):
                                return None
                        j = c.buf.index(b"\r\n")
                        del c.buf[:j + 2]
                        if j == 0:
                            break
                    break
                while len(c.buf) < size + 2:
                    if not self._recv(c, deadline):
                        return None
                body += c.buf[:size]
                del c.buf[:size + 2]
            req.body = bytes(body)
        else:
            cl = int(req.header("content-length") or "0")
            while len(c.buf) < cl:
                if not self._recv(c, deadline):
                    break                   # recorded with what arrived
            req.body = bytes(c.buf[:cl])
            del c.buf[:cl]
        req.t = time.monotonic()
        return self._record(req, c, seq)

    def _record(self, req, c, seq):
        req.conn = c.index
        req.seq = seq
        with self.lock:
            req.n = len(self.requests)
            self.requests.append(req)
        return req

    def _pick(self, req):
        sc = self.script
        if callable(sc):
            ans = sc(req)
        elif isinstance(sc, dict):
            ans = sc
        else:
            ans = sc[min(req.n, len(sc) - 1)]
        bad = set(ans) - _ANSWER_KEYS
        if bad:
            raise ValueError("ScriptedUpstream: unknown answer keys %s" % sorted(bad))
        if ans.get("action", "close") not in _ACTIONS:
            raise ValueError("ScriptedUpstream: action %r" % ans.get("action"))
        if ans.get("action") == "keep" and ans.get("at") is not None:
            raise ValueError("ScriptedUpstream: keep cannot cut an answer")
        req.answer = ans
        return ans

    def _pause(self, c, req, ms):
        """Wait MS ms watching the connection.  False if the client left (or
        the upstream is stopping); bytes the client sends are kept."""
        deadline = time.monotonic() + ms / 1000.0
        while True:
            if self._stopping.is_set():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            pending = getattr(c.sock, "pending", None)
            r = [c.sock] if pending and pending() else select.select([c.sock], [], [], left)[0]
            if r and not self._stopping.is_set():
                c.sock.settimeout(self.io_timeout)
                try:
                    d = c.sock.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                except OSError:
                    d = b""
                if not d:
                    self._left(req)
                    return False
                c.buf += d

    def _left(self, req):
        if not req.client_closed:
            req.client_closed = True
            req.t_client_closed = time.monotonic()

    def _send(self, c, req, data):
        if not data:
            return True
        c.sock.settimeout(self.io_timeout)
        try:
            c.sock.sendall(data)
            return True
        except OSError:
            self._left(req)
            return False

    def _answer(self, c, req, ans):
        """Carry out ANS.  True to read the next request on this connection."""
        action = ans.get("action", "close")
        at = ans.get("at")
        if ans.get("delay_ms") and not self._pause(c, req, ans["delay_ms"]):
            return False
        if at == "start":
            return self._act(c, req, ans, action)
        if ans.get("fin") and self.ctx is None:
            try:
                c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            except OSError:
                pass
        if "raw" in ans:
            pieces = _pieces(ans["raw"])
            framing = "none"
        else:
            pieces = _pieces(ans.get("body"))
            framing = ans.get("framing", "length")
            status = ans.get("status", 200)
            reason = ans.get("reason")
            if reason is None:
                try:
                    reason = HTTPStatus(status).phrase
                except ValueError:
                    reason = "Status"
            hs = list(ans.get("headers") or [])
            names = {k.lower() for k, _ in hs}
            if framing == "length":
                if "content-length" not in names and "transfer-encoding" not in names:
                    hs.append(("Content-Length", str(sum(len(p) for _, p in pieces))))
            elif framing == "chunked":
                if "transfer-encoding" not in names:
                    hs.append(("Transfer-Encoding", "chunked"))
            elif framing != "none":
                raise ValueError("ScriptedUpstream: framing %r" % framing)
            head = "HTTP/1.1 %d %s\r\n" % (status, reason)
            head += "".join("%s: %s\r\n" % kv for kv in hs) + "\r\n"
            if not self._send(c, req, head.encode("latin-1")):
                return False
        if at == 0:
            return self._act(c, req, ans, action)
        for i, (ms, data) in enumerate(pieces):
            if ms and not self._pause(c, req, ms):
                return False
            if framing == "chunked":
                data = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
            if not self._send(c, req, data):
                return False
            if at == i + 1:
                return self._act(c, req, ans, action)
        if framing == "chunked" and not self._send(c, req, b"0\r\n\r\n"):
            return False
        return self._act(c, req, ans, action)

    def _act(self, c, req, ans, action):
        if action == "keep":
            return True
        if ans.get("fin") and self.ctx is None and action == "close":
            try:
                c.sock.shutdown(socket.SHUT_WR)     # the corked bytes go with the FIN
            except OSError:
                pass
        if action == "hold":
            self._pause(c, req, ans.get("hold_ms", 30000))
        elif action == "reset":
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                  b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
        return False                       # the caller closes the socket

    def stop(self, timeout=5.0):
        """Close the listener and every connection; join the threads."""
        self._stopping.set()
        for s in (self.lsock,):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self.lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        self._acceptor.join(max(0.0, deadline - time.monotonic()))
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    close = stop


class RawUpstream:
    """Every request gets the same canned bytes, then a close (a
    ScriptedUpstream with {"raw": RESPONSE}).  .requests: each request's
    head as text."""

    def __init__(self, response):
        self.response = response
        self.upstream = ScriptedUpstream({"raw": response})
        self.port = self.upstream.port

    @property
    def url(self):
        return self.upstream.url

    @property
    def requests(self):
        return [r.head for r in self.upstream.requests]

    def close(self):
        self.upstream.stop()

    stop = close


# ---------------------------------------------------------------- runner

class Runner:
    """Runs named test functions, prints PASS/FAIL lines and the RESULT line."""

    def __init__(self, suite):
        self.suite = suite
        self.passed = 0
        self.failed = 0
        self.t0 = time.monotonic()
        self.notes = set()              # the "# ..." lines note_once() printed

    def run(self, name, fn, *args):
        t = time.monotonic()
        try:
            fn(*args)
        except AssertionError as e:
            self.fail(name, str(e) or "assertion failed: " + _where(e))
        except Exception as e:
            self.fail(name, "%s: %s" % (type(e).__name__, e), tb=True)
        else:
            self.ok(name, time.monotonic() - t)

    def ok(self, name, dt=None):
        self.passed += 1
        extra = " (%.2fs)" % dt if dt is not None and dt >= 1.0 else ""
        print("PASS %s%s" % (name, extra), flush=True)

    def fail(self, name, reason, tb=False):
        self.failed += 1
        reason = str(reason).strip().replace("\n", " | ")
        print("FAIL %s: %s" % (name, reason[:1500]), flush=True)
        if tb and os.environ.get("DSGATE_TEST_VERBOSE"):
            traceback.print_exc()

    def note_once(self, text):
        """Print "# TEXT", unless it was printed already."""
        if text not in self.notes:
            self.notes.add(text)
            print("# %s" % text, flush=True)

    def fail_all(self, names, reason):
        for n in names:
            self.fail(n, reason)

    def finish(self):
        print("# %s: %.1fs" % (self.suite, time.monotonic() - self.t0), flush=True)
        print("RESULT passed=%d failed=%d" % (self.passed, self.failed), flush=True)
        _stop_all()
        return 1 if self.failed else 0


def run_tests(run, tests, pair, key="dsgate", final=(), only=()):
    """Run TESTS [(name, fn)] against the dsgate in PAIR[KEY].

    A test after which dsgate is dead fails with the crash's first sanitizer
    line, and the next test gets a fresh dsgate (same config), so one crash
    does not hide every later result.  Tests named in FINAL (shutdown and log
    checks) run as they are.  ONLY: run just these names (and FINAL).
    """
    for name, fn in tests:
        if only and name not in only and name not in final:
            continue
        if name not in final and not pair[key].alive():
            try:
                pair[key] = pair[key].restart()
            except Exception as e:
                run.fail(name, "dsgate restart failed: %s" % e)
                continue
        if name in final:
            run.run(name, fn)
            continue
        d = pair[key]

        def wrapped(fn=fn, d=d):
            err = None
            try:
                fn()
            except BaseException as e:
                err = e
            if wait_until(lambda: not d.alive(), 0.1, 0.01):
                raise AssertionError("dsgate died during this test (exit %s): %s; log %s"
                                     % (d.proc.returncode, d.crash_summary(), d.log_path))
            if err is not None:
                raise err
        run.run(name, wrapped)


def stop_started(started):
    """Stop (last first) and empty STARTED, a list of objects with .stop()
    (dsgates, fakes, upstreams, Redis servers); the dsgates that crashed or
    did not exit 0 on SIGTERM, as [(log path, exit status, was it running)]."""
    bad = []
    while started:
        o = started.pop()
        alive = not isinstance(o, Dsgate) or o.alive()
        try:
            rc = o.stop()
        except Exception:                       # noqa: BLE001
            rc = None
        if isinstance(o, Dsgate) and (not alive or rc != 0):
            bad.append((o.log_path, rc, alive))
    return bad


def reports(fn):
    """Mark a test function that takes (run, name) and reports itself
    (run.ok / run.fail, or a SKIP line) instead of raising; see main()."""
    fn.reports = True
    return fn


class Pair:
    """A group of tests for main(): SETUP() starts a dsgate (and what it
    needs) into the dict PAIR, then run_tests() runs TESTS against PAIR[KEY]
    (a crash restarts it; FINAL names run as they are).  When SETUP raises,
    every test of the group fails with "setup: ..."."""

    def __init__(self, tests, setup, pair, key="dsgate", final=(), lazy=False, skip=None):
        """LAZY: when names are given on the command line and none is one of
        this group's tests other than FINAL, the group is not set up and
        nothing of it runs (FINAL included).  SKIP: a reason (say, a server
        it needs is not installed): the group does not run and is not
        counted; "# SKIP" is printed once per file, however many groups
        share it (a lazy group not named prints nothing)."""
        self.tests = tests
        self.setup = setup
        self.pair = pair
        self.key = key
        self.final = set(final)
        self.lazy = lazy
        self.skip = skip

    def wanted(self, only):
        return (not self.lazy or not only
                or any(n in only and n not in self.final for n, _ in self.tests))

    def run(self, run, only):
        if not self.wanted(only):
            return
        if self.skip:
            run.note_once(self.skip)
            return
        try:
            self.setup()
        except Exception as e:                  # noqa: BLE001
            run.fail_all([n for n, _ in self.tests], "setup: %s" % e)
            return
        run_tests(run, self.tests, self.pair, self.key, final=self.final, only=only)


def main(suite, tests, started=None, after_each=None, final=None, require=(), argv=None):
    """The main() of a test file; returns its exit status (for sys.exit).

    Runs TESTS in order and prints the RESULT line.  An item of TESTS is
    (name, fn), fn run by Runner.run (or, marked @reports, called as
    fn(run, name)), or a Pair.  Names given on the command line (ARGV,
    default sys.argv[1:]) run only those tests.
    STARTED: the list where the file's tests put what they start; after each
    (name, fn) test it is emptied by stop_started(), and a dsgate in it that
    died or did not exit 0 on SIGTERM fails NAME_dsgate_exit.
    AFTER_EACH(run, name): more cleanup after each (name, fn) test.
    FINAL(run): after the last test (before the RESULT line).
    REQUIRE: [(path, what)]: the first path that is not executable fails
    every test with "setup: WHAT not built" and nothing runs.
    """
    run = Runner(suite)
    only = set(sys.argv[1:] if argv is None else argv)
    for path, what in require:
        if not os.access(path, os.X_OK):
            names = []
            for t in tests:
                names += [n for n, _ in t.tests] if isinstance(t, Pair) else [t[0]]
            run.fail_all(names, "setup: %s not built" % what)
            return run.finish()
    for t in tests:
        if isinstance(t, Pair):
            t.run(run, only)
            continue
        name, fn = t
        if only and name not in only:
            continue
        try:
            if getattr(fn, "reports", False):
                try:
                    fn(run, name)
                except Exception as e:          # noqa: BLE001
                    run.fail(name, "%s: %s" % (type(e).__name__, e))
            else:
                run.run(name, fn)
        finally:
            if started is not None:
                for log, rc, alive in stop_started(started):
                    run.fail(name + "_dsgate_exit", "dsgate %s with status %s; log %s"
                             % ("exited on SIGTERM" if alive else "died during the test",
                                rc, log))
            if after_each is not None:
                after_each(run, name)
    if final is not None:
        final(run)
    return run.finish()


def _where(e):
    tb = traceback.extract_tb(e.__traceback__)
    if tb:
        f = tb[-1]
        return "%s:%d: %s" % (os.path.basename(f.filename), f.lineno, f.line)
    return "?"


def check(cond, msg, *args):
    if not cond:
        raise AssertionError(msg % args if args else msg)


# ---------------------------------------------------------------- helpers shared by test files
#
# Small pieces several test files used to carry their own copies of.

CHAT = "/v1/chat/completions"

# Substrings of a line of dsgate's stderr that mean a sanitizer report.
SANITIZER_MARKS = ("runtime error:", "AddressSanitizer", "LeakSanitizer")


def note(fmt, *args):
    """Print "# FMT % ARGS" (a comment line the runner's output keeps)."""
    print("# " + (fmt % args if args else fmt), flush=True)


def test_id(prefix="", n=12):
    """A fresh X-Test-Id value: PREFIX and N random hex digits."""
    return prefix + uuid.uuid4().hex[:n]


def chat_request(content, stream=False, model="deepseek-chat"):
    """A one-message chat completion request (a dict); "stream": true when STREAM."""
    b = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return b


def chat_body(content, stream=False, model="deepseek-chat"):
    """chat_request() as JSON bytes."""
    return json.dumps(chat_request(content, stream, model)).encode()


def start_fake(started, *args, name="fake"):
    """A Fake (ARGS: its command-line options) appended to STARTED."""
    f = Fake(*args, name=name)
    started.append(f)
    return f


def start_scripted(started, script):
    """A ScriptedUpstream answering from SCRIPT, appended to STARTED."""
    s = ScriptedUpstream(script)
    started.append(s)
    return s


def start_dsgate(config_for, tag, started, *more, **kw):
    """A Dsgate on a free port whose config is CONFIG_FOR(port), appended to
    STARTED and to each list in MORE; KW go to Dsgate (env=...)."""
    port = free_port()
    d = Dsgate(config_text=config_for(port), tag=tag, port=port, **kw)
    started.append(d)
    for lst in more:
        lst.append(d)
    return d


def upstream_yaml(name, url, max_inflight=16, adaptive=False, connect="2s",
                  first_data="30s", extra_timeouts=""):
    """The lines of one entry of a config's upstreams: list (indented for
    it).  ADAPTIVE None: no adaptive line.  EXTRA_TIMEOUTS: more
    "key: value" text appended inside the timeouts {...}."""
    lines = [
        "  - name: %s" % name,
        "    url: %s" % yaml_quote(url),
        "    max_inflight: %d" % max_inflight,
    ]
    if adaptive is not None:
        lines.append("    adaptive: %s" % ("true" if adaptive else "false"))
    lines.append("    timeouts: {connect: %s, first_data: %s, idle: 30s, total: 0%s}"
                 % (connect, first_data, extra_timeouts))
    return lines


def sanitizer_lines(d):
    """The lines of dsgate D's log that are part of a sanitizer report."""
    return [ln.strip() for ln in d.log_text().splitlines()
            if any(b in ln for b in SANITIZER_MARKS)]


def check_healthy(d):
    """dsgate D is alive and its log has no sanitizer report."""
    check(d.alive(), "dsgate died (exit %s): %s" % (d.proc.returncode, d.crash_summary()))
    bad = sanitizer_lines(d)
    check(not bad, "dsgate log: %s" % " | ".join(bad[:3]))


def check_stopped_clean(dsgates):
    """Stops every dsgate of DSGATES (name -> dsgate, None when never started):
    each must exit 0 with no sanitizer report in its log."""
    bad = []
    for k, d in dsgates.items():
        if d is None:
            continue
        rc = d.stop(15.0)
        if rc != 0 or sanitizer_lines(d):
            bad.append("%s: exit %s %s (%s)" % (k, rc, sanitizer_lines(d)[:2], d.log_path))
    check(not bad, "; ".join(bad))


def sanitizer_after_each(dsgates):
    """An after_each for main(): empties DSGATES (the dsgates the test
    started, stopped by then) and fails NAME_sanitizer when a log of theirs
    has a sanitizer report (leaks are reported at exit)."""
    def after_each(run, name):
        ds = list(dsgates)
        del dsgates[:]
        bad = []
        for d in ds:
            for ln in sanitizer_lines(d):
                bad.append("%s: %s" % (os.path.basename(d.log_path), ln))
        if bad:
            run.fail(name + "_sanitizer", " | ".join(bad[:3]))
    return after_each


def access_lines(d, path=CHAT):
    """dsgate D's access log lines (JSON objects) for PATH, oldest first."""
    out = []
    for ln in d.log_text().splitlines():
        ln = ln.strip()
        if not ln.startswith("{") or '"path"' not in ln:
            continue
        try:
            j = json.loads(ln)
        except ValueError:
            continue
        if j.get("path") == path and "status" in j and "attempts" in j:
            out.append(j)
    return out


def wait_access(d, n, path=CHAT, timeout=3.0):
    """access_lines(D, PATH) once there are at least N (fails after TIMEOUT s)."""
    got = wait_until(lambda: len(access_lines(d, path)) >= n, timeout, 0.02)
    check(got, "%d access log lines for %s, want %d; log tail %r", len(access_lines(d, path)),
          path, n, d.log_tail(600))
    return access_lines(d, path)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(port):
    """GET /metrics: [(name, {label: value}, float)] of every sample."""
    r = request(port, "GET", "/metrics", timeout=5.0)
    check(r.status == 200, "/metrics: %s", r.status)
    out = []
    for line in r.body.decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def log_for(f, test_id):
    """The entries of fake F's /_log whose X-Test-Id is TEST_ID."""
    return [e for e in f.log() if (e.get("headers") or {}).get("x-test-id") == test_id]


class Pending:
    """A POST sent at once on its own connection (Content-Type JSON,
    Connection: close) whose whole answer a thread reads; READ=False: the
    test reads it (or leaves) itself.  HEADERS: dict or pairs; ACCEPT: an
    Accept header to add.  .resp (or .error), .t_sent, .t_end (monotonic s);
    wait() returns the response."""

    def __init__(self, port, body, headers=None, path=CHAT, timeout=15.0, read=True,
                 accept=None):
        hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        hs += [("Content-Type", "application/json"), ("Connection", "close")]
        if accept:
            hs.append(("Accept", accept))
        self.timeout = timeout
        self.resp = self.error = self.t_end = None
        self.conn = Conn(port, timeout=timeout)
        self._opened()
        self.t_sent = time.monotonic()
        self.conn.send(build_request("POST", path, hs, body, port=port))
        self.thread = None
        if read:
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _opened(self):
        """Called once the connection is open, before the request is sent."""

    def _read(self):
        try:
            self.resp = self.conn.read_response(self.timeout)
        except Exception as e:                  # noqa: BLE001
            self.error = e
        finally:
            self.t_end = time.monotonic()
            self.close()

    def close(self):
        self.conn.close()

    def wait(self, timeout=None):
        """The response, once the thread has it (TIMEOUT s, default the
        request's timeout + 5)."""
        t = self.timeout if timeout is None else timeout
        self.thread.join(timeout if timeout is not None else self.timeout + 5)
        check(not self.thread.is_alive(), "no answer within %.0fs", t)
        check(self.resp is not None, "no response: %s", self.error)
        return self.resp


# ---------------------------------------------------------------- differential corpora

_ESC = re.compile(rb"\\(?:x([0-9a-fA-F]{2})|\{(\d+)\*(.)\}|(.))", re.S)
_SIMPLE = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"\\": b"\\"}


def corpus_unescape(s):
    def rep(m):
        if m.group(1):
            return bytes([int(m.group(1), 16)])
        if m.group(2):
            return m.group(3) * int(m.group(2))
        c = m.group(4)
        if c not in _SIMPLE:
            raise ValueError("unknown escape \\%s" % c.decode())
        return _SIMPLE[c]
    return _ESC.sub(rep, s)


def load_corpus(path):
    """The vectors of a tests/differential corpus file: [(name, raw bytes)], one per
    line "NAME ESCAPED-BYTES" (\\r \\n \\t \\\\ \\xHH, \\{N*c} for c N times; # comments)."""
    out = []
    names = set()
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip(b"\n")
            if not line or line.startswith(b"#"):
                continue
            name, sp, rest = line.partition(b" ")
            if not sp:
                raise ValueError("%s:%d: no bytes after the name" % (path, n))
            name = name.decode()
            if name in names:
                raise ValueError("%s:%d: vector %s twice" % (path, n, name))
            names.add(name)
            out.append((name, corpus_unescape(rest)))
    return out


# ---------------------------------------------------------------- config keys of the dsgate under test

_accepted = {}


def config_accepted(text):
    """(True, "") when `dsgate --check-config` accepts the config TEXT, else
    (False, its first message line).  Cached per text."""
    if text in _accepted:
        return _accepted[text]
    d = tempfile.mkdtemp(prefix="chk-", dir=_tmp_root)
    path = os.path.join(d, "dsgate.yaml")
    with open(path, "w") as f:
        f.write(text)
    e = dict(os.environ)
    for k in _SCRUB_ENV:
        e.pop(k, None)
    e["ASAN_OPTIONS"] = ASAN_OPTIONS
    try:
        p = subprocess.run([DSGATE, "-c", path, "--check-config"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e, timeout=30)
        out = p.stdout.decode("utf-8", "replace").strip().splitlines()
        res = (p.returncode == 0, "" if p.returncode == 0 else (out[0] if out else "exit %d" % p.returncode))
    except (OSError, subprocess.TimeoutExpired) as ex:
        res = (False, str(ex))
    _accepted[text] = res
    return res


def dialects_line(dialects=("openai", "anthropic"), indent="    "):
    """The line `dialects: [...]` of an upstreams: entry (issue 15: an upstream
    that is not api.deepseek.com takes only OpenAI requests unless it lists
    anthropic), or "" when the dsgate under test does not know the key yet,
    so that a test of something else still runs (the tests of dialects
    themselves write the key and fail at startup then)."""
    line = "%sdialects: [%s]" % (indent, ", ".join(dialects))
    ok, _ = config_accepted("listen: 127.0.0.1:1\nupstreams:\n  - name: a\n"
                            "    url: http://127.0.0.1:9\n%s\n" % line.replace(indent, "    ", 1))
    return line if ok else ""
