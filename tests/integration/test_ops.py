#!/usr/bin/env python3
"""
test_ops: operating dsgate (issue 6) through the real daemon.

Reload under load (SIGHUP with a stream in flight and a request queued; a new
limit and a new upstream URL take effect; an invalid file and a changed
listen/admin_listen/fleet.redis are refused, logged with file:line, and the
daemon keeps serving; an upstream keeps its circuit or is replaced cleanly),
drain (SIGTERM during a stream: it completes, the listener is
closed at once, exit 0; a second SIGTERM exits at once; what is left at
shutdown_timeout gets 503 or an SSE error event), metrics after a known
sequence of requests, `promtool check metrics`, the access log (JSON, its
fields, never the key nor the prompt), log.file reopened on SIGUSR1,
admin_listen, the sd_notify protocol, and `dsgate --health`.

Each test starts the dsgate it needs (most with their own config), so a
test's signals never disturb another's.  promtool (Debian package
`prometheus`) is installed with apt-get when missing, only as root and
unless DSGATE_TEST_INSTALL=0; otherwise that test is skipped (a `SKIP` line,
counted neither as passed nor as failed).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402

CANARY = "sk-dsgate-ops-canary-" + uuid.uuid4().hex
CLIENT_CANARY = "sk-client-ops-canary-" + uuid.uuid4().hex
TMP = tempfile.mkdtemp(prefix="ops-", dir=H._tmp_root)

ACCESS_FIELDS = ("id", "method", "path", "status", "priority", "cache", "upstream",
                 "attempts", "queue_ms", "upstream_ms", "total_ms", "bytes_in",
                 "bytes_out", "end")


def tid():
    return uuid.uuid4().hex[:12]


def chat_body(content, stream=False, model="deepseek-chat"):
    b = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return b


def config(port, url, max_inflight=64, adaptive=False, cache=False, retry_attempts=1,
           shutdown_timeout="3s", log_file="", admin_listen="", name="fake",
           api_key_env="DEEPSEEK_API_KEY", extra=""):
    """YAML for one dsgate with one upstream; every key on its own line."""
    lines = [
        "# written by tests/integration/test_ops.py",
        "listen: 127.0.0.1:%d" % port,
        "upstreams:",
        "  - name: %s" % name,
        "    url: %s" % H.yaml_quote(url),
        "    api_key_env: %s" % H.yaml_quote(api_key_env),
        "    max_inflight: %d" % max_inflight,
        "    adaptive: %s" % ("true" if adaptive else "false"),
        "    timeouts: {connect: 2s, first_data: 30s, idle: 30s, total: 0}",
        "retry:",
        "  max_attempts: %d" % retry_attempts,
        "  base: 10ms",
        "  cap: 20ms",
        "cache:",
        "  enabled: %s" % ("true" if cache else "false"),
        "shutdown_timeout: %s" % shutdown_timeout,
        "log: {level: info, format: json, file: %s}" % H.yaml_quote(log_file),
        "admin_listen: %s" % H.yaml_quote(admin_listen),
    ]
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


def start(fake_url, tag, env=None, port=None, **kw):
    port = port or H.free_port()
    e = {"DEEPSEEK_API_KEY": CANARY}
    e.update(env or {})
    return H.Dsgate(config_text=config(port, fake_url, **kw), port=port, tag="ops-" + tag,
                    env=e)


def rewrite(d, text):
    """Replace D's config file in one step (a reader never sees half a file)."""
    tmp = d.config_path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, d.config_path)


def readyz(port):
    r = H.request(port, "GET", "/readyz", timeout=5.0)
    return r.status, r.json()


def limit_of(port, name="fake"):
    _, j = readyz(port)
    for u in j.get("upstreams") or []:
        if u.get("name") == name:
            return u.get("limit")
    return None


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{(name, frozenset of (label, value))): float} of every sample."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise AssertionError("unparsable metrics line %r" % line)
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metrics(port):
    r = H.request(port, "GET", "/metrics", timeout=5.0)
    check(r.status == 200, "/metrics status %s", r.status)
    return r.body.decode("utf-8"), parse_metrics(r.body.decode("utf-8"))


def mval(m, name, **labels):
    return m.get((name, frozenset(labels.items())), 0.0)


def msum(m, name, **labels):
    """Sum over the series of NAME whose labels include LABELS."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


def wait_log(d, pred, timeout=5.0, since=0):
    """Wait until PRED(text of D's log after offset SINCE) is true."""
    return H.wait_until(lambda: pred(d.log_text()[since:]), timeout, 0.02)


def wait_exit(d, timeout):
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def refused(port):
    """True when a TCP connect to PORT is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return False


class Bg:
    """Run FN(*args) in a thread; .result / .error when done."""

    def __init__(self, fn, *args, **kw):
        self.result = None
        self.error = None
        self.t = threading.Thread(target=self._run, args=(fn, args, kw), daemon=True)
        self.t.start()

    def _run(self, fn, args, kw):
        try:
            self.result = fn(*args, **kw)
        except BaseException as e:           # noqa: B902 (reported by join)
            self.error = e

    def join(self, timeout):
        self.t.join(timeout)
        check(not self.t.is_alive(), "background request still running after %.0fs", timeout)
        if self.error is not None:
            raise AssertionError("background request failed: %s: %s"
                                 % (type(self.error).__name__, self.error))
        return self.result


def stream_ok(st, what):
    """ST (harness.Stream) is a complete 200 stream ending with [DONE]."""
    check(st.error is None, "%s: transport error %s", what, st.error)
    check(st.resp is not None and st.resp.status == 200, "%s: status %s", what,
          st.resp and st.resp.status)
    check(st.resp.complete, "%s: no terminating chunk", what)
    errs = [e for e in st.events if H.is_error_event(e)]
    check(not errs, "%s: SSE error event %r", what, errs[:1])
    datas = [e["data"] for e in st.data_events()]
    check(datas and datas[-1] == "[DONE]", "%s: does not end with [DONE]: %r", what, datas[-2:])
    return datas


def slow_stream_headers(events, delay_ms, test_id):
    return {"X-Fake-Events": str(events), "X-Fake-Event-Delay-Ms": str(delay_ms),
            "X-Test-Id": test_id}


# ---------------------------------------------------------------- reload

def t_reload_under_load():
    """SIGHUP with a stream in flight and a request queued: the stream
    finishes intact on the old upstream URL, the new max_inflight shows in
    /readyz and lets the queued request go at once, to the new URL."""
    f1 = H.Fake(name="reload1")
    f2 = H.Fake(name="reload2")
    d = start(f1.url, "reload", max_inflight=1)
    check(limit_of(d.port) == 1, "limit before reload %r", limit_of(d.port))
    t = tid()
    s = Bg(H.sse_request, d.port, chat_body("reload stream " + t, stream=True),
           headers=slow_stream_headers(10, 150, t), timeout=20.0)
    check(H.wait_until(lambda: f1.stats()["inflight"] == 1, 5.0), "stream never reached fake 1")
    q = Bg(H.request, d.port, "POST", "/v1/chat/completions",
           headers={"X-Test-Id": t + "-q"}, body=chat_body("queued " + t), timeout=20.0)

    def queued():
        _, m = metrics(d.port)
        return msum(m, "dsgate_queue_depth") == 1
    check(H.wait_until(queued, 5.0), "second request never queued behind max_inflight 1")
    since = len(d.log_text())
    rewrite(d, config(d.port, f2.url, max_inflight=7))
    os.kill(d.pid, signal.SIGHUP)
    check(H.wait_until(lambda: limit_of(d.port) == 7, 5.0),
          "/readyz limit %r after reload to max_inflight 7; log %r",
          limit_of(d.port), d.log_text()[since:][-600:])
    # The queued request goes at once (the stream still runs) to the new URL.
    r = q.join(10.0)
    check(r.status == 200, "queued request: %s %r", r.status, r.body[:200])
    check(f1.stats()["inflight"] == 1, "stream no longer in flight when the queued one ended")
    check(f2.find(t + "-q") is not None, "queued request did not go to the new upstream URL")
    check(f1.find(t + "-q", timeout=0.1) is None, "queued request went to the old URL")
    # A new request uses the new URL.
    r = H.request(d.port, "POST", "/v1/chat/completions", headers={"X-Test-Id": t + "-n"},
                  body=chat_body("after reload " + t))
    check(r.status == 200, "after reload: %s", r.status)
    check(f2.find(t + "-n") is not None, "new request did not go to the new URL")
    st = s.join(15.0)
    datas = stream_ok(st, "stream in flight during SIGHUP")
    check(len(datas) == 1 + 10 + 1 + 1, "stream has %d data events, want 13", len(datas))
    check(st.resp.header("X-Fake-Name") in (None, "reload1"),
          "stream answered by %r", st.resp.header("X-Fake-Name"))
    check(wait_log(d, lambda s: "reload" in s, 2.0, since), "nothing about the reload logged")
    check(d.alive(), "dsgate died")
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f1.stop()
    f2.stop()


def t_reload_replaces_upstream():
    """A reload that renames the upstream (the old one goes, a new one comes)
    while a stream is in flight on the old one: the stream finishes, /readyz
    lists only the new one, new requests use it."""
    f1 = H.Fake(name="replace1")
    f2 = H.Fake(name="replace2")
    d = start(f1.url, "replace", name="old")
    t = tid()
    s = Bg(H.sse_request, d.port, chat_body("replace " + t, stream=True),
           headers=slow_stream_headers(8, 120, t), timeout=20.0)
    check(H.wait_until(lambda: f1.stats()["inflight"] == 1, 5.0), "stream never reached fake 1")
    rewrite(d, config(d.port, f2.url, name="new", max_inflight=3))
    os.kill(d.pid, signal.SIGHUP)

    def names():
        return [u.get("name") for u in readyz(d.port)[1].get("upstreams") or []]
    check(H.wait_until(lambda: names() == ["new"], 5.0), "/readyz upstreams %r after the "
          "reload (want ['new'])", names())
    r = H.request(d.port, "POST", "/v1/chat/completions", headers={"X-Test-Id": t + "-n"},
                  body=chat_body("to new " + t))
    check(r.status == 200 and r.header("X-Dsgate-Upstream") in (None, "new"),
          "request after the reload: %s upstream %r", r.status, r.header("X-Dsgate-Upstream"))
    check(f2.find(t + "-n") is not None, "request after the reload did not reach the new URL")
    st = s.join(15.0)
    stream_ok(st, "stream on the removed upstream")
    _, m = metrics(d.port)
    check(mval(m, "dsgate_inflight", upstream="new") == 0, "inflight{new} not 0")
    check(d.alive(), "dsgate died")
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f1.stop()
    f2.stop()


# line numbers of the problems in INVALID (1-based)
INVALID_LINES = {"max_inflight": 7, "no_such_key": 10, "shutdown_timeout": 11}


def invalid_config(port, url):
    return "\n".join([
        "# line 1: an invalid file for the reload test",
        "listen: 127.0.0.1:%d" % port,                   # 2
        "upstreams:",                                   # 3
        "  - name: fake",                               # 4
        "    url: %s" % H.yaml_quote(url),              # 5
        "    api_key_env: DEEPSEEK_API_KEY",            # 6
        "    max_inflight: 0",                          # 7  out of range
        "    adaptive: false",                          # 8
        "cache: {enabled: false}",                      # 9
        "no_such_key: 1",                               # 10 unknown
        "shutdown_timeout: soon",                       # 11 bad duration
        "log: {level: info, format: json}",             # 12
    ]) + "\n"


def t_reload_invalid_and_refused():
    """An invalid file and a changed listen/admin_listen/fleet.redis are refused: every
    problem is logged (file:line for the invalid file), the running
    configuration stays, the daemon keeps serving; a valid file then works."""
    f = H.Fake(name="reloadbad")
    d = start(f.url, "reloadbad", max_inflight=5)
    base = os.path.basename(d.config_path)
    # 1. invalid values and an unknown key
    since = len(d.log_text())
    rewrite(d, invalid_config(d.port, f.url))
    os.kill(d.pid, signal.SIGHUP)

    def all_named(text):
        return all(any(("%s:%d" % (base, n)) in l and k in l for l in text.splitlines())
                   for k, n in INVALID_LINES.items())
    ok = wait_log(d, all_named, 5.0, since)
    check(ok, "not every problem logged as file:line + key (want %s); log: %r",
          ", ".join("%s:%d %s" % (base, n, k) for k, n in INVALID_LINES.items()),
          d.log_text()[since:][-1200:])
    check(d.alive(), "dsgate died on an invalid reload")
    check(limit_of(d.port) == 5, "limit %r after an invalid reload (want 5)", limit_of(d.port))
    r = H.request(d.port, "POST", "/v1/chat/completions", body=chat_body("still serving"))
    check(r.status == 200, "after invalid reload: %s", r.status)
    # 2. YAML syntax error
    since = len(d.log_text())
    rewrite(d, "listen: 127.0.0.1:%d\nupstreams: [\n  - name: a\n" % d.port)
    os.kill(d.pid, signal.SIGHUP)
    check(wait_log(d, lambda s: base in s, 5.0, since),
          "YAML syntax error not logged with the file name; log: %r", d.log_text()[since:][-600:])
    r = H.request(d.port, "POST", "/v1/chat/completions", body=chat_body("still serving 2"))
    check(r.status == 200, "after a broken YAML reload: %s", r.status)
    # 3. listen, admin_listen and fleet.redis changed (and max_inflight): refused as a whole
    new_port, admin_port = H.free_port(), H.free_port()
    since = len(d.log_text())
    rewrite(d, config(new_port, f.url, max_inflight=9,
                      admin_listen="127.0.0.1:%d" % admin_port,
                      extra='fleet:\n  redis: "redis://127.0.0.1:9"'))
    os.kill(d.pid, signal.SIGHUP)

    def all3(text):
        ls = text.splitlines()
        return (any("listen" in l and "admin_listen" not in l and "restart" in l for l in ls)
                and any("admin_listen" in l and "restart" in l for l in ls)
                and any("fleet.redis" in l and "restart" in l for l in ls))
    check(wait_log(d, all3, 5.0, since),
          "changed listen, admin_listen and fleet.redis not each refused with a message "
          "naming the key and 'restart'; log: %r", d.log_text()[since:][-1000:])
    check(limit_of(d.port) == 5, "limit %r: a refused reload applied max_inflight",
          limit_of(d.port))
    check(refused(new_port), "dsgate listens on the new port after a refused reload")
    check(refused(admin_port), "dsgate listens on the new admin port after a refused reload")
    r = H.request(d.port, "POST", "/v1/chat/completions", body=chat_body("still serving 3"))
    check(r.status == 200, "old port after a refused listen change: %s", r.status)
    # 4. a valid file again
    rewrite(d, config(d.port, f.url, max_inflight=11))
    os.kill(d.pid, signal.SIGHUP)
    check(H.wait_until(lambda: limit_of(d.port) == 11, 5.0),
          "valid reload after refused ones: limit %r", limit_of(d.port))
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f.stop()


# ---------------------------------------------------------------- drain

def t_drain_stream_completes():
    """SIGTERM with a stream in flight and one request queued: the listener
    closes at once, the stream completes, the queued request is served, and
    dsgate exits 0 only after that."""
    f = H.Fake(name="drain")
    d = start(f.url, "drain", max_inflight=1, shutdown_timeout="20s")
    t = tid()
    s = Bg(H.sse_request, d.port, chat_body("drain stream " + t, stream=True),
           headers=slow_stream_headers(8, 150, t), timeout=20.0)
    check(H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0), "stream never reached the fake")
    q = Bg(H.request, d.port, "POST", "/v1/chat/completions",
           headers={"X-Test-Id": t + "-q"}, body=chat_body("queued at drain " + t),
           timeout=20.0)

    def queued():
        _, m = metrics(d.port)
        return msum(m, "dsgate_queue_depth") == 1
    check(H.wait_until(queued, 5.0), "second request never queued")
    # an idle keep-alive connection (one answered request on it)
    idle = H.Conn(d.port)
    idle.send(H.build_request("GET", "/healthz", port=d.port))
    check(idle.read_response().status == 200, "keep-alive /healthz")
    t_sig = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    check(H.wait_until(lambda: refused(d.port), 1.0, 0.01),
          "new connections still accepted 1 s after SIGTERM")
    dt_refused = time.monotonic() - t_sig
    try:
        idle.sock.settimeout(2.0)
        got = idle.sock.recv(100)
    except socket.timeout:
        got = None
    except OSError:
        got = b""
    idle.close()
    check(got == b"", "idle keep-alive connection not closed at SIGTERM (read %r)", got)
    check(d.alive(), "dsgate exited right after SIGTERM with a stream in flight")
    st = s.join(15.0)
    t_stream = time.monotonic()
    datas = stream_ok(st, "stream in flight during SIGTERM")
    check(len(datas) == 11, "stream has %d data events, want 11", len(datas))
    r = q.join(15.0)
    check(r.status == 200, "queued request during drain: %s %r", r.status, r.body[:200])
    rc = wait_exit(d, 10.0)
    check(rc is not None, "dsgate still running 10 s after the drained stream ended")
    check(rc == 0, "exit code %s after drain (want 0)", rc)
    check(time.monotonic() - t_stream < 5.0, "exit came long after the last request")
    check(dt_refused < 1.0, "listener closed %.2fs after SIGTERM", dt_refused)
    f.stop()


def t_drain_second_signal():
    """A second SIGTERM during the drain exits at once."""
    f = H.Fake(name="drain2")
    d = start(f.url, "drain2", shutdown_timeout="30s")
    t = tid()
    s = Bg(H.sse_request, d.port, chat_body("drain2 " + t, stream=True),
           headers=slow_stream_headers(50, 500, t), timeout=30.0)
    check(H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0), "stream never reached the fake")
    d.proc.send_signal(signal.SIGTERM)
    check(H.wait_until(lambda: refused(d.port), 1.0, 0.01), "listener not closed after SIGTERM")
    check(wait_exit(d, 0.3) is None, "dsgate exited on the first SIGTERM with a stream in flight")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = wait_exit(d, 3.0)
    check(rc is not None, "dsgate still running 3 s after a second SIGTERM")
    dt = time.monotonic() - t0
    check(dt < 1.5, "second SIGTERM took %.2fs to exit", dt)
    check(rc == 0, "exit code %s after the second SIGTERM", rc)
    st = s.join(5.0)
    # The client's stream ends (an SSE error event or a close), never hangs.
    check(st.error is not None or any(H.is_error_event(e) for e in st.events)
          or (st.resp and st.resp.complete), "stream neither ended nor errored")
    check(H.wait_until(lambda: f.stats()["inflight"] == 0, 3.0),
          "upstream transfer not cancelled after exit")
    f.stop()


def t_drain_timeout_503():
    """At shutdown_timeout, what is left is answered: a queued request and an
    in-flight non-stream request get 503, a stream gets an SSE error event;
    then exit 0."""
    f = H.Fake(name="drain3")
    d = start(f.url, "drain3", max_inflight=2, shutdown_timeout="1s")
    t = tid()
    s = Bg(H.sse_request, d.port, chat_body("drain3 stream " + t, stream=True),
           headers=slow_stream_headers(40, 300, t), timeout=20.0)
    check(H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0), "stream never reached the fake")
    n = Bg(H.request, d.port, "POST", "/v1/chat/completions",
           headers={"X-Fake-Delay-Ms": "15000"}, body=chat_body("drain3 slow " + t), timeout=20.0)
    check(H.wait_until(lambda: f.stats()["inflight"] == 2, 5.0), "slow request never in flight")
    q = Bg(H.request, d.port, "POST", "/v1/chat/completions",
           body=chat_body("drain3 queued " + t), timeout=20.0)

    def queued():
        _, m = metrics(d.port)
        return msum(m, "dsgate_queue_depth") == 1
    check(H.wait_until(queued, 5.0), "third request never queued")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = wait_exit(d, 6.0)
    dt = time.monotonic() - t0
    check(rc is not None, "dsgate still running 6 s after SIGTERM with shutdown_timeout 1s")
    check(rc == 0, "exit code %s at shutdown_timeout (want 0)", rc)
    check(0.8 <= dt < 4.0, "exit %.2fs after SIGTERM with shutdown_timeout 1s", dt)
    rq = q.join(5.0)
    check(rq.status == 503, "queued request at shutdown_timeout: %s %r", rq.status, rq.body[:200])
    why = H.openai_error_shape(rq)
    check(why is None, "queued 503: %s", why)
    rn = n.join(5.0)
    check(rn.status == 503, "in-flight request at shutdown_timeout: %s %r",
          rn.status, rn.body[:200])
    st = s.join(5.0)
    check(st.resp is not None and st.resp.status == 200, "stream status %s",
          st.resp and st.resp.status)
    errs = [e for e in st.events if H.is_error_event(e)]
    check(errs, "stream cut at shutdown_timeout without an SSE error event (error %r, "
          "last events %r)", st.error, [e["data"] for e in st.events][-2:])
    f.stop()


# ---------------------------------------------------------------- metrics

def t_metrics_sequence():
    """Counters, cache and histogram counts after a known sequence."""
    f = H.Fake(name="metrics")
    d = start(f.url, "metrics", cache=True, retry_attempts=2, max_inflight=1)
    t = tid()
    _, m0 = metrics(d.port)
    post = "/v1/chat/completions"

    def req(content, headers=None, stream=False):
        if stream:
            return H.sse_request(d.port, chat_body(content, stream=True), headers=headers)
        return H.request(d.port, "POST", post, headers=headers, body=chat_body(content))

    r = req("A " + t)                                             # 200 miss, ok
    check(r.status == 200 and r.header("X-Cache") == "MISS", "1: %s %s", r.status,
          r.header("X-Cache"))
    r = req("A " + t)                                             # 200 hit (memory)
    check(r.status == 200 and r.header("X-Cache") == "HIT", "2: %s %s", r.status,
          r.header("X-Cache"))
    st = req("B " + t, stream=True)                               # 200 miss, ok
    stream_ok(st, "3")
    r = req("C " + t, headers={"X-Fake-Status": "400"})          # 400 miss, 4xx
    check(r.status == 400, "4: %s", r.status)
    r = req("D " + t, headers={"Cache-Control": "no-store"})     # 200 bypass, ok
    check(r.status == 200 and r.header("X-Cache") == "BYPASS", "5: %s %s", r.status,
          r.header("X-Cache"))
    r = req("E " + t, headers={"X-Fake-Status": "503"})          # 503 miss, 2 attempts
    check(r.status == 503, "6: %s", r.status)
    check(r.header("X-Dsgate-Attempts") == "2", "6: attempts %r", r.header("X-Dsgate-Attempts"))
    r = req("F " + t, headers={"X-Priority": "high"})            # 200 miss high, ok
    check(r.status == 200, "7: %s", r.status)
    # 8 and 9: one queued behind the other (max_inflight 1)
    slow = Bg(H.request, d.port, "POST", post, headers={"X-Fake-Delay-Ms": "300"},
              body=chat_body("G " + t))
    check(H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0), "8 never reached the fake")
    r = req("H " + t)
    check(r.status == 200, "9: %s", r.status)
    check(slow.join(10.0).status == 200, "8 failed")
    # not counted: own endpoints
    H.request(d.port, "GET", "/healthz")
    H.request(d.port, "GET", "/readyz")
    text, m1 = metrics(d.port)

    def delta(name, **labels):
        return msum(m1, name, **labels) - msum(m0, name, **labels)

    problems = []

    def want(v, exp, what):
        if v != exp:
            problems.append("%s: %g (want %g)" % (what, v, exp))

    want(delta("dsgate_requests_total"), 9, "requests_total (all)")
    want(delta("dsgate_requests_total", code="200", priority="medium", cache="miss"), 4,
         "requests_total{200,medium,miss}")
    want(delta("dsgate_requests_total", code="200", priority="medium", cache="hit"), 1,
         "requests_total{200,medium,hit}")
    want(delta("dsgate_requests_total", code="200", priority="medium", cache="bypass"), 1,
         "requests_total{200,medium,bypass}")
    want(delta("dsgate_requests_total", code="400", priority="medium", cache="miss"), 1,
         "requests_total{400,medium,miss}")
    want(delta("dsgate_requests_total", code="503", priority="medium", cache="miss"), 1,
         "requests_total{503,medium,miss}")
    want(delta("dsgate_requests_total", code="200", priority="high", cache="miss"), 1,
         "requests_total{200,high,miss}")
    want(delta("dsgate_upstream_attempts_total", upstream="fake"), 9, "upstream_attempts (all)")
    want(delta("dsgate_upstream_attempts_total", upstream="fake", outcome="ok"), 6,
         "upstream_attempts{ok}")
    want(delta("dsgate_upstream_attempts_total", upstream="fake", outcome="4xx"), 1,
         "upstream_attempts{4xx}")
    want(delta("dsgate_retries_total", upstream="fake", reason="503"), 1, "retries{503}")
    want(delta("dsgate_cache_hits_total", tier="memory"), 1, "cache_hits{memory}")
    want(delta("dsgate_cache_misses_total"), 7, "cache_misses")
    want(delta("dsgate_cache_stores_total", tier="memory"), 5, "cache_stores{memory}")
    want(delta("dsgate_request_duration_seconds_count"), 9, "request_duration _count")
    want(delta("dsgate_request_duration_seconds_bucket", le="+Inf"), 9,
         "request_duration _bucket{+Inf}")
    qw = delta("dsgate_queue_wait_seconds_count")
    if not 1 <= qw <= 9:
        problems.append("queue_wait _count %g (want 1..9: one request waited)" % qw)
    # tokens from usage: the fake's prompt_tokens = 1 + len(text)//4, for the
    # 6 answers that came from upstream with status 200 (not the hit)
    texts = ["A " + t, "B " + t, "D " + t, "F " + t, "G " + t, "H " + t]
    want(delta("dsgate_tokens_total", upstream="fake", kind="prompt"),
         sum(1 + len(x.encode()) // 4 for x in texts), "tokens{prompt}")
    want(delta("dsgate_inflight", upstream="fake"), 0, "inflight gauge back to 0")
    want(mval(m1, "dsgate_queue_depth", priority="medium"), 0, "queue_depth{medium}")
    check(not problems, "; ".join(problems))
    # every family in design.md is there
    for fam in ("dsgate_requests_total", "dsgate_request_duration_seconds",
                "dsgate_upstream_attempts_total", "dsgate_retries_total", "dsgate_queue_depth",
                "dsgate_queue_wait_seconds", "dsgate_inflight", "dsgate_cache_hits_total",
                "dsgate_cache_misses_total", "dsgate_circuit_open", "dsgate_tokens_total"):
        check("# TYPE %s " % fam in text, "family %s missing from /metrics", fam)
    check(CANARY not in text and t not in text, "key or prompt text in /metrics")
    P["metrics_text"] = text
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f.stop()


P = {}


def find_promtool():
    """Path of promtool, installing Debian's prometheus when allowed."""
    p = shutil.which("promtool")
    if p:
        return p, None
    if os.geteuid() != 0 or os.environ.get("DSGATE_TEST_INSTALL", "1") == "0":
        return None, ("promtool not installed (Debian package prometheus); run "
                      "`apt-get install prometheus` or run as root without DSGATE_TEST_INSTALL=0")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=120", "install", "-y", "-qq",
           "--no-install-recommends", "prometheus"]
    log = os.path.join(H.LOGDIR, "apt-prometheus.log")
    with open(log, "ab") as lf:
        rc = subprocess.call(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=env,
                             timeout=300)
        if rc != 0:                          # stale or missing lists: update once
            subprocess.call(["apt-get", "-o", "DPkg::Lock::Timeout=120", "update", "-qq"],
                            stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=env, timeout=300)
            rc = subprocess.call(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, env=env,
                                 timeout=300)
    p = shutil.which("promtool") or ("/usr/bin/promtool" if os.access("/usr/bin/promtool",
                                                                     os.X_OK) else None)
    if not p:
        return None, "apt-get install prometheus failed (exit %s), see %s" % (rc, log)
    return p, None


@H.reports
def t_promtool(run, name):
    text = P.get("metrics_text")
    if text is None:
        # metrics_sequence failed early: take the text from a fresh dsgate
        f = H.Fake(name="promtool")
        d = start(f.url, "promtool", cache=True)
        H.request(d.port, "POST", "/v1/chat/completions", body=chat_body("x"))
        text, _ = metrics(d.port)
        d.stop()
        f.stop()
    tool, why = find_promtool()
    if not tool:
        print("SKIP %s: %s" % (name, why), flush=True)
        return
    p = subprocess.run([tool, "check", "metrics"], input=text.encode(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    out = p.stdout.decode("utf-8", "replace").strip()
    if p.returncode != 0 or out:
        run.fail(name, "promtool check metrics: exit %d: %s" % (p.returncode, out[:1200]))
    else:
        run.ok(name)


# ---------------------------------------------------------------- logs

def access_lines(text):
    out = []
    for line in text.splitlines():
        if '"type":"access"' in line or '"type": "access"' in line:
            out.append(line)
    return out


def t_access_log():
    """One JSON line per request with the fields; never the key, the
    client's token or the prompt."""
    f = H.Fake(name="access")
    d = start(f.url, "access", cache=True)
    t = tid()
    prompt = "PROMPT-TEXT-" + uuid.uuid4().hex
    auth = {"Authorization": "Bearer " + CLIENT_CANARY}
    r1 = H.request(d.port, "POST", "/v1/chat/completions", headers=auth,
                   body=chat_body(prompt + " 1"))
    r2 = H.request(d.port, "POST", "/v1/chat/completions", headers=auth,
                   body=chat_body(prompt + " 1"))
    st = H.sse_request(d.port, chat_body(prompt + " 2", stream=True), headers=auth)
    r4 = H.request(d.port, "POST", "/v1/chat/completions?user=" + t,
                   headers=dict(auth, **{"X-Fake-Status": "404", "X-Priority": "low"}),
                   body=chat_body(prompt + " 3"))
    check(r1.status == 200 and r2.status == 200 and r4.status == 404, "statuses %s %s %s",
          r1.status, r2.status, r4.status)
    stream_ok(st, "stream")
    check(wait_log(d, lambda s: len(access_lines(s)) >= 4, 5.0),
          "fewer than 4 access lines: %r", d.log_tail(1500))
    text = d.log_text()
    lines = access_lines(text)
    recs = []
    for line in lines:
        try:
            recs.append(json.loads(line))
        except ValueError as e:
            raise AssertionError("access line is not JSON (%s): %r" % (e, line[:300]))
    check(len(recs) == 4, "%d access lines for 4 requests: %r", len(recs), lines)
    for rec in recs:
        missing = [k for k in ACCESS_FIELDS if k not in rec]
        check(not missing, "access line lacks %s: %r", missing, rec)
        for k in ("id", "status", "attempts", "queue_ms", "upstream_ms", "total_ms",
                  "bytes_in", "bytes_out"):
            check(isinstance(rec[k], int) and not isinstance(rec[k], bool),
                  "%s is not an integer: %r", k, rec)
        for k in ("method", "path", "priority", "cache", "upstream", "end"):
            check(isinstance(rec[k], str), "%s is not a string: %r", k, rec)
    check(len({r["id"] for r in recs}) == 4, "ids not unique: %r", [r["id"] for r in recs])
    a, b, c, e = recs
    check((a["status"], a["cache"], a["upstream"], a["attempts"], a["end"], a["method"],
           a["path"], a["priority"]) ==
          (200, "miss", "fake", 1, "completed", "POST", "/v1/chat/completions", "medium"),
          "first request: %r", a)
    check(a["bytes_in"] == len(json.dumps(chat_body(prompt + " 1"))),
          "bytes_in %r", a["bytes_in"])
    check(a["bytes_out"] > 0 and a["total_ms"] >= 0, "first request sizes %r", a)
    check((b["status"], b["cache"], b["end"], b["attempts"]) == (200, "hit", "cache_hit", 0),
          "cache hit: %r", b)
    check((c["status"], c["end"]) == (200, "completed") and c["bytes_out"] >= len(st.raw) // 2,
          "stream: %r (client got %d bytes)", c, len(st.raw))
    check((e["status"], e["priority"]) == (404, "low"), "404 request: %r", e)
    # tokens from usage (issue 6): the fake's prompt_tokens = 1 + bytes(text)/4
    check([k for k in a if "token" in k], "no tokens field in the access line: %r", a)
    if "tokens_prompt" in a:
        for rec, sent in ((a, prompt + " 1"), (c, prompt + " 2")):
            check(rec["tokens_prompt"] == 1 + len(sent.encode()) // 4,
                  "tokens_prompt %r, want %d (from usage): %r", rec["tokens_prompt"],
                  1 + len(sent.encode()) // 4, rec)
    whole = d.log_text()
    check(CANARY not in whole, "the upstream key (DEEPSEEK_API_KEY) is in dsgate's log")
    check(CLIENT_CANARY not in whole, "the client's Authorization token is in dsgate's log")
    check(prompt not in whole, "the prompt text is in dsgate's log")
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f.stop()


def t_access_log_end():
    """How a request ended: completed, client_closed_queued, queue_timeout,
    upstream_reset, client_closed_streaming (one line each, right status)."""
    f = H.Fake(name="accessend")
    d = start(f.url, "accessend", max_inflight=1, extra="queue:\n  max_wait: 300ms")
    post = "/v1/chat/completions"
    t = tid()
    hold = Bg(H.request, d.port, "POST", post, headers={"X-Fake-Delay-Ms": "1500"},
              body=chat_body("hold " + t), timeout=10.0)
    check(H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0), "slot never taken")
    # a client that leaves while queued
    c = H.Conn(d.port)
    c.send(H.build_request("POST", post, {"Content-Type": "application/json"},
                           json.dumps(chat_body("leaves " + t)), port=d.port))

    def depth(n):
        _, m = metrics(d.port)
        return msum(m, "dsgate_queue_depth") == n
    check(H.wait_until(lambda: depth(1), 5.0), "request never queued")
    c.close()
    check(H.wait_until(lambda: depth(0), 3.0), "queued request of a gone client still queued")
    # one that waits longer than queue.max_wait
    r = H.request(d.port, "POST", post, body=chat_body("waits " + t))
    check(r.status == 504, "queue.max_wait exceeded: %s", r.status)
    check(hold.join(10.0).status == 200, "held request failed")
    # upstream resets mid-stream
    st = H.sse_request(d.port, chat_body("reset " + t, stream=True),
                       headers={"X-Fake-Reset-After": "3"})
    check(st.resp is not None and st.resp.status == 200, "reset stream status %s",
          st.resp and st.resp.status)
    # the client leaves mid-stream
    st = H.sse_request(d.port, chat_body("client leaves " + t, stream=True),
                       headers=slow_stream_headers(20, 100, t), stop_after=2)
    st.conn.close()
    check(H.wait_until(lambda: f.stats()["inflight"] == 0, 3.0),
          "upstream transfer not cancelled when the client left")
    want = [("completed", 200), ("client_closed_queued", None), ("queue_timeout", 504),
            ("upstream_reset", 200), ("client_closed_streaming", 200)]
    ok = wait_log(d, lambda s: len(access_lines(s)) >= len(want), 3.0)
    recs = [json.loads(line) for line in access_lines(d.log_text())]
    check(ok, "%d access lines for %d requests: %r", len(recs), len(want), recs)
    got = sorted((r["end"], r["status"]) for r in recs)
    missing = [e for e, s in want if not any(r["end"] == e and (s is None or r["status"] == s)
                                            for r in recs)]
    check(not missing, "no access line ending %s (status as expected); got %r", missing, got)
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f.stop()


def t_reload_keeps_circuit():
    """An upstream that stays across a reload keeps its open circuit."""
    f = H.Fake(name="circuit")
    d = start(f.url, "circuit")
    r = H.request(d.port, "POST", "/v1/chat/completions", headers={"X-Fake-Status": "402"},
                  body=chat_body("balance"))
    check(r.status == 402, "402 answer: %s", r.status)
    st, j = readyz(d.port)
    u = (j.get("upstreams") or [{}])[0]
    check(u.get("state") == "open", "circuit after a 402: %r", j)
    rewrite(d, config(d.port, f.url, max_inflight=13))
    os.kill(d.pid, signal.SIGHUP)
    check(H.wait_until(lambda: limit_of(d.port) == 13, 5.0), "reload not applied")
    st, j = readyz(d.port)
    u = (j.get("upstreams") or [{}])[0]
    check(u.get("state") == "open" and u.get("reason") == "402" and st == 503,
          "circuit lost on reload: %s %r", st, j)
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f.stop()


def t_rejected_requests_logged():
    """Requests dsgate refuses itself (invalid JSON, bad X-Priority) also get
    an access line and count in dsgate_requests_total."""
    f = H.Fake(name="rejected")
    d = start(f.url, "rejected")
    _, m0 = metrics(d.port)
    r = H.request(d.port, "POST", "/v1/chat/completions", body=b"{not json")
    check(r.status == 400, "invalid JSON: %s", r.status)
    r = H.request(d.port, "POST", "/v1/chat/completions", headers={"X-Priority": "urgent"},
                  body=chat_body("x"))
    check(r.status == 400, "bad priority: %s", r.status)
    ok = wait_log(d, lambda s: len(access_lines(s)) >= 2, 2.0)
    _, m1 = metrics(d.port)
    n = msum(m1, "dsgate_requests_total", code="400") - msum(m0, "dsgate_requests_total",
                                                             code="400")
    check(ok and n == 2, "2 refused requests (400): %d access lines, requests_total{code=400} "
          "+%g", len(access_lines(d.log_text())), n)
    d.stop()
    f.stop()


def t_log_file_reopen():
    """log.file + SIGUSR1: after a rename, new lines go to a new file."""
    f = H.Fake(name="logfile")
    logdir = tempfile.mkdtemp(prefix="logfile-", dir=TMP)
    path = os.path.join(logdir, "dsgate.log")
    d = start(f.url, "logfile", log_file=path)

    def count(p):
        try:
            with open(p) as fh:
                return len(access_lines(fh.read()))
        except FileNotFoundError:
            return -1

    H.request(d.port, "POST", "/v1/chat/completions", body=chat_body("one"))
    check(H.wait_until(lambda: count(path) == 1, 3.0), "no access line in log.file (%d)",
          count(path))
    os.rename(path, path + ".1")
    H.request(d.port, "POST", "/v1/chat/completions", body=chat_body("two"))
    check(H.wait_until(lambda: count(path + ".1") == 2, 3.0),
          "before SIGUSR1 the line should go to the renamed file (%d)", count(path + ".1"))
    os.kill(d.pid, signal.SIGUSR1)
    check(H.wait_until(lambda: os.path.exists(path), 3.0), "SIGUSR1 did not reopen log.file")
    H.request(d.port, "POST", "/v1/chat/completions", body=chat_body("three"))
    check(H.wait_until(lambda: count(path) == 1, 3.0), "new file has %d access lines (want 1)",
          count(path))
    check(count(path + ".1") == 2, "renamed file got more lines after SIGUSR1")
    check(not access_lines(d.log_text()), "access lines on stderr with log.file set")
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f.stop()


# ---------------------------------------------------------------- admin, notify, health

def t_admin_listen():
    f = H.Fake(name="admin")
    admin = H.free_port()
    d = start(f.url, "admin", admin_listen="127.0.0.1:%d" % admin)
    check(H.wait_until(lambda: not refused(admin), 3.0), "admin port not listening")
    for p in ("/metrics", "/healthz", "/readyz"):
        r = H.request(admin, "GET", p)
        check(r.status == 200, "admin GET %s: %s", p, r.status)
    r = H.request(admin, "GET", "/metrics")
    check("# TYPE dsgate_requests_total" in r.body.decode() or
          "dsgate_metrics_dropped_total" in r.body.decode(), "admin /metrics body %r",
          r.body[:200])
    for method, p, body in (("GET", "/v1/models", None),
                            ("POST", "/v1/chat/completions", chat_body("admin")),
                            ("GET", "/", None), ("GET", "/metricsx", None),
                            ("POST", "/metrics", b"")):
        r = H.request(admin, method, p, body=body)
        check(r.status == 404, "admin %s %s: %s (want 404)", method, p, r.status)
    check(f.stats()["requests"] == 0, "the admin port proxied a request upstream")
    r = H.request(d.port, "POST", "/v1/chat/completions", body=chat_body("main port"))
    check(r.status == 200, "main port still proxies: %s", r.status)
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f.stop()


def t_sd_notify():
    f = H.Fake(name="notify")
    sdir = tempfile.mkdtemp(prefix="n-", dir="/tmp")
    spath = os.path.join(sdir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(spath)
    msgs = []

    def recv_until(want, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                m = sock.recv(4096).decode()
            except socket.timeout:
                break
            msgs.append(m)
            if want in m.split("\n"):
                return True
        return False

    try:
        d = start(f.url, "notify", env={"NOTIFY_SOCKET": spath})
        check(recv_until("READY=1", 3.0), "no READY=1 at start-up (got %r)", msgs)
        n = len(msgs)
        os.kill(d.pid, signal.SIGHUP)
        check(recv_until("RELOADING=1", 3.0), "no RELOADING=1 on SIGHUP (got %r)", msgs[n:])
        check(recv_until("READY=1", 3.0), "no READY=1 after the reload (got %r)", msgs[n:])
        n = len(msgs)
        d.proc.send_signal(signal.SIGTERM)
        check(recv_until("STOPPING=1", 3.0), "no STOPPING=1 on SIGTERM (got %r)", msgs[n:])
        check(wait_exit(d, 5.0) == 0, "exit %s", d.proc.returncode)
        # an abstract socket name ("@...") works too
        abstract = "@dsgate-test-" + tid()
        asock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        asock.bind("\0" + abstract[1:])
        asock.settimeout(3.0)
        try:
            d2 = start(f.url, "notify2", env={"NOTIFY_SOCKET": abstract})
            m = asock.recv(4096).decode()
            check("READY=1" in m.split("\n"), "abstract socket got %r", m)
            d2.stop()
        finally:
            asock.close()
    finally:
        sock.close()
        shutil.rmtree(sdir, ignore_errors=True)
        f.stop()


def t_health_cli():
    f = H.Fake(name="health")
    d = start(f.url, "health")
    env = dict(os.environ, ASAN_OPTIONS=H.ASAN_OPTIONS, UBSAN_OPTIONS=H.UBSAN_OPTIONS)
    url = "http://127.0.0.1:%d/healthz" % d.port
    p = subprocess.run([H.DSGATE, "--health", url], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=20)
    check(p.returncode == 0, "--health against a running dsgate: exit %d %r", p.returncode,
          p.stdout[-300:])
    closed = H.free_port()
    p = subprocess.run([H.DSGATE, "--health", "http://127.0.0.1:%d/healthz" % closed],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, env=env, timeout=20)
    check(p.returncode == 1, "--health against a closed port: exit %d (want 1)", p.returncode)
    # a non-200 answer is unhealthy too
    raw = H.ScriptedUpstream({"status": 503,
                              "headers": [("Content-Length", "0"), ("Connection", "close")]})
    try:
        p = subprocess.run([H.DSGATE, "--health", raw.url + "/healthz"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env, timeout=20)
    finally:
        raw.close()
    check(p.returncode == 1, "--health against a 503: exit %d (want 1)", p.returncode)
    check(d.stop() == 0, "exit %s", d.proc.returncode)
    f.stop()


TESTS = [
    ("reload_under_load", t_reload_under_load),
    ("reload_invalid_and_refused", t_reload_invalid_and_refused),
    ("reload_keeps_circuit", t_reload_keeps_circuit),
    ("reload_replaces_upstream", t_reload_replaces_upstream),
    ("drain_stream_completes", t_drain_stream_completes),
    ("drain_second_signal", t_drain_second_signal),
    ("drain_timeout_503", t_drain_timeout_503),
    ("metrics_sequence", t_metrics_sequence),
    ("promtool_check_metrics", t_promtool),
    ("access_log", t_access_log),
    ("access_log_end", t_access_log_end),
    ("rejected_requests_logged", t_rejected_requests_logged),
    ("log_file_reopen_sigusr1", t_log_file_reopen),
    ("admin_listen", t_admin_listen),
    ("sd_notify", t_sd_notify),
    ("health_cli", t_health_cli),
]


def main():
    return H.main("test_ops", TESTS, require=[(H.DSGATE, "%s (dsgate)" % H.DSGATE),
                                              (H.FAKE, "%s (fake_upstream)" % H.FAKE)])


if __name__ == "__main__":
    sys.exit(main())
