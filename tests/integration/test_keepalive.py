#!/usr/bin/env python3
"""
test_keepalive: dsgate's own 200 head and keep-alives (config
`keepalive: {after, every}`), through the real daemon on real sockets.

A POST on a completion path (cache.paths) that has waited `after` without
any reply head (queued in dsgate, backing off between retries, held by the
upstream with no data yet) gets dsgate's own 200 head (text/event-stream
for "stream": true, else application/json; chunked), then a keep-alive
every `every` (`: keep-alive` comments, blank lines) until data flows:

  * held upstream (X-Fake-First-Token-Ms, no upstream keep-alives),
    non-stream and stream: the head at ~after, keep-alives ~every apart,
    then the whole answer on the same reply (the JSON parses as a whole);
  * queued behind max_inflight 1: the same while queued, then the answer;
    the early head's X-Dsgate-Queue-Ms is the time queued as of then;
  * backing off between retries (503, then the answer): the same;
  * cache on: identical requests in one flight all get the early head and
    the whole answer; the cached copy has no keep-alives in it;
  * clients that leave after the early head: dsgate stays up, the upstream
    call is cancelled;
  * a queue timeout after the early head: non-stream, the body is exactly
    an OpenAI-shaped error object (code queue_timeout) and a clean chunked
    end; stream, an SSE error event with status 504; the access log says
    504 / queue_timeout;
  * before `after`, errors keep their status (504 queue timeout, upstream
    429 and 400);
  * paths not in cache.paths (and a completion path left out of it) never
    get an early head;
  * an upstream error (400) after the early head: the body is an error
    object with the upstream's message (non-stream) or an SSE error event
    with status 400; access log 400;
  * a real client with a 5 s read timeout (httpx, from Debian's
    python3-httpx; http.client with a 5 s socket timeout when httpx is
    missing) against an answer that comes after 8 s: through dsgate with
    the default keepalive (after 2s, every 3s) it succeeds, directly
    against the fake it times out.

After each test dsgate must be alive, exit 0 on SIGTERM and have no
sanitizer line in its log.  About 25 s.  `test_keepalive.py NAME...` runs
only those tests.
"""

import os
import subprocess
import sys

# httpx comes from Debian (python3-httpx, `make deps`): when this
# interpreter (say a pyenv one first on PATH) lacks it and Debian's has
# it, run under Debian's (before anything is started).
try:
    import httpx
except ImportError:
    httpx = None
    _deb = "/usr/bin/python3"
    if (not os.environ.get("DSGATE_KA_REEXEC") and os.access(_deb, os.X_OK)
            and os.path.realpath(sys.executable) != os.path.realpath(_deb)
            and subprocess.call([_deb, "-c", "import httpx"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) == 0):
        os.environ["DSGATE_KA_REEXEC"] = "1"
        os.execv(_deb, [_deb, "-u", os.path.abspath(__file__)] + sys.argv[1:])

import http.client                                              # noqa: E402
import json                                                     # noqa: E402
import socket                                                   # noqa: E402
import threading                                                # noqa: E402
import time                                                     # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import CHAT, check, note                           # noqa: E402

STARTED = []        # fakes, scripted upstreams and dsgates of the running test
DSGATES = []        # the dsgates of the running test (their logs are scanned after it)
KA_SSE = b": keep-alive\n\n"
FAKE_400_MSG = "Invalid request (fake)"


def tid():
    return H.test_id("ka-")


chat = H.chat_request


# ---------------------------------------------------------------- processes

def fake(*args, name="ka"):
    return H.start_fake(STARTED, *args, name=name)


def scripted(script):
    return H.start_scripted(STARTED, script)


def config(port, url, after="300ms", every="200ms", max_inflight=16, max_wait="20s",
           attempts=1, base="20ms", cap="200ms", jitter="full", paths=None, cache=False):
    """dsgate YAML with one upstream; AFTER None: no keepalive block (the defaults)."""
    lines = [
        "# written by tests/integration/test_keepalive.py",
        "listen: 127.0.0.1:%d" % port,
        "upstreams:",
    ] + H.upstream_yaml("up", url, max_inflight) + [
        "queue:",
        "  max_wait: %s" % max_wait,
        "retry:",
        "  max_attempts: %d" % attempts,
        "  base: %s" % base,
        "  cap: %s" % cap,
        "  jitter: %s" % jitter,
        "cache:",
        "  enabled: %s" % ("true" if cache else "false"),
    ]
    if paths is not None:
        lines.append("  paths: [%s]" % ", ".join(paths))
    if after is not None:
        lines.append("keepalive: {after: %s, every: %s}" % (after, every))
    lines += ["shutdown_timeout: 3s", "log: {level: info, format: json}"]
    return "\n".join(lines) + "\n"


def dsgate(url, tag, **cfg):
    return H.start_dsgate(lambda port: config(port, url, **cfg), "ka-" + tag,
                          STARTED, DSGATES)


healthy = H.check_healthy


def wait_access(d, n, path=CHAT, timeout=4.0):
    return H.wait_access(d, n, path, timeout)


# ---------------------------------------------------------------- a timed client

class Timed:
    """One POST on a fresh connection, read by a thread: the head and every
    body piece with its time since the request was sent (s).  .resp (the
    harness Response, .complete when the chunked end came), .error (a
    transport problem), .t_head, .pieces [(t, bytes)], .body."""

    def __init__(self, port, body, headers=None, path=CHAT, timeout=15.0):
        hs = list((headers or {}).items())
        hs += [("Content-Type", "application/json"), ("Connection", "close")]
        if isinstance(body, dict):
            if body.get("stream"):
                hs.append(("Accept", "text/event-stream"))
            body = json.dumps(body).encode()
        self.resp = self.error = self.t_head = self.t_end = None
        self.pieces = []
        self.timeout = timeout
        self.conn = H.Conn(port, timeout=timeout)
        self.t0 = time.monotonic()
        self.conn.send(H.build_request("POST", path, hs, body, port=port))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            r = self.conn.read_head(self.timeout)
            self.resp = r
            self.t_head = r.t_head - self.t0
            for d in self.conn.iter_body(r, max(0.1, self.timeout - self.t_head)):
                self.pieces.append((time.monotonic() - self.t0, d))
        except Exception as e:                  # noqa: BLE001
            self.error = "%s: %s" % (type(e).__name__, e)
        finally:
            self.t_end = time.monotonic() - self.t0
            self.conn.close()

    @property
    def body(self):
        return b"".join(d for _, d in self.pieces)

    def wait(self, timeout=None):
        self.thread.join(timeout if timeout is not None else self.timeout + 2)
        check(not self.thread.is_alive(), "no whole answer within %.0fs", self.timeout)
        check(self.resp is not None, "no response head: %s", self.error)
        return self


def post(port, body, headers=None, path=CHAT, timeout=15.0):
    return Timed(port, body, headers, path, timeout).wait()


def first_data_t(t, marker):
    """Arrival time of the piece that holds the first byte of MARKER's
    first occurrence in the body (None if absent)."""
    body = t.body
    i = body.find(marker)
    if i < 0:
        return None
    n = 0
    for at, d in t.pieces:
        n += len(d)
        if n > i:
            return at
    return None


def early_head_ok(t, what, after, stream, attempts=None):
    """T's head is dsgate's early head: 200 at ~AFTER s, chunked, the right
    Content-Type, X-Dsgate-Attempts / X-Dsgate-Queue-Ms present."""
    r = t.resp
    check(r.status == 200, "%s: status %s, body %r", what, r.status, t.body[:300])
    check(after - 0.05 <= t.t_head <= after + 0.6, "%s: head after %.3fs, want ~%.1fs",
          what, t.t_head, after)
    check(r.chunked and r.header("content-length") is None, "%s: not chunked: %r",
          what, r.headers)
    ct = (r.header("content-type") or "").lower()
    want = "text/event-stream" if stream else "application/json"
    check(ct.startswith(want), "%s: content-type %r, want %s", what, ct, want)
    a = r.header("x-dsgate-attempts")
    q = r.header("x-dsgate-queue-ms")
    check(a is not None and q is not None and q.isdigit(),
          "%s: X-Dsgate-Attempts %r / X-Dsgate-Queue-Ms %r", what, a, q)
    if attempts is not None:
        check(a == str(attempts), "%s: X-Dsgate-Attempts %r as of the head, want %d", what,
              a, attempts)


def keepalives(t, stream, before):
    """Arrival times of the keep-alives that came before BEFORE s."""
    out = []
    for at, d in t.pieces:
        if before is not None and at >= before - 0.001:
            break
        if stream:
            out += [at] * d.count(KA_SSE)
        else:
            out += [at] * d.count(b"\n")
    return out


def cadence_ok(what, kas, every, span):
    """KAS (arrival times) look like one keep-alive every EVERY s over SPAN s."""
    want = 1 + span / every
    check(want * 0.5 <= len(kas) <= want * 1.5 + 1, "%s: %d keep-alives over %.1fs, want ~%.0f"
          " (at %s)", what, len(kas), span, want, ["%.2f" % x for x in kas])
    gaps = [b - a for a, b in zip(kas, kas[1:])]
    big = [g for g in gaps if g > every * 2.5]
    check(not big, "%s: keep-alive gaps %s (every %.1fs)", what, ["%.2f" % g for g in gaps],
          every)


def json_whole(t, what):
    """The non-stream body parses as one JSON document (leading blank lines
    are whitespace); only blank lines precede it."""
    body = t.body
    check(t.error is None and t.resp.complete, "%s: body incomplete (%s), ends %r", what,
          t.error, body[-200:])
    i = body.find(b"{")
    check(i >= 0 and body[:i].strip(b"\n") == b"", "%s: body starts %r", what, body[:200])
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError as e:
        raise AssertionError("%s: json.loads of the whole body failed (%s): %r"
                             % (what, e, body[:300]))


def sse_of(t):
    return H.parse_sse(t.body)


def stream_whole(t, what, content):
    check(t.error is None and t.resp.complete, "%s: stream incomplete (%s), ends %r", what,
          t.error, t.body[-200:])
    evs = sse_of(t)
    errs = [e for e in evs if H.is_error_event(e)]
    check(not errs, "%s: error events %r", what, [e["data"] for e in errs])
    datas = [e["data"] for e in evs if e["data"] is not None]
    check(datas and datas[-1] == "[DONE]" and datas.count("[DONE]") == 1,
          "%s: data events end %r", what, datas[-3:])
    text = ""
    for dd in datas[:-1]:
        for c in json.loads(dd).get("choices") or []:
            v = (c.get("delta") or {}).get("content")
            if isinstance(v, str):
                text += v
    check(text == content, "%s: content %r, want %r", what, text, content)


def error_object(t, what, code=None, message=None):
    """The non-stream body after the early head is exactly an OpenAI-shaped
    error object (blank lines before it), then the chunked end."""
    check(t.error is None and t.resp.complete, "%s: body did not end cleanly (%s), ends %r",
          what, t.error, t.body[-200:])
    j = json_whole(t, what)
    check(isinstance(j, dict) and list(j) == ["error"], "%s: body %r", what, t.body[-300:])
    e = j["error"]
    for k in ("message", "type", "code"):
        check(isinstance(e.get(k), str) and e[k], "%s: error.%s %r", what, k, e.get(k))
    if code is not None:
        check(e["code"] == code, "%s: error.code %r, want %r", what, e["code"], code)
    if message is not None:
        check(e["message"] == message, "%s: error.message %r, want %r", what, e["message"],
              message)
    return e


def sse_error(t, what, status, code=None, message=None):
    """The stream after the early head ends with exactly one SSE error event
    carrying STATUS; no data events; a clean chunked end."""
    check(t.error is None and t.resp.complete, "%s: stream did not end cleanly (%s), ends %r",
          what, t.error, t.body[-200:])
    evs = sse_of(t)
    errs = [e for e in evs if H.is_error_event(e)]
    others = [e for e in evs if not H.is_error_event(e)]
    check(len(errs) == 1 and not others, "%s: events %r", what, t.body[-400:])
    ev = errs[0]
    check(ev["event"] == "error", "%s: event type %r", what, ev["event"])
    e = (json.loads(ev["data"]).get("error") or {})
    check(e.get("status") == status, "%s: error.status %r, want %d (%r)", what,
          e.get("status"), status, ev["data"])
    for k in ("message", "type", "code"):
        check(isinstance(e.get(k), str) and e[k], "%s: error.%s %r", what, k, e.get(k))
    if code is not None:
        check(e["code"] == code, "%s: error.code %r, want %r", what, e["code"], code)
    if message is not None:
        check(e["message"] == message, "%s: error.message %r, want %r", what, e["message"],
              message)
    return e


def wait_inflight(f, n, timeout=3.0):
    check(H.wait_until(lambda: f.stats()["inflight"] >= n, timeout, 0.01),
          "the fake has %d requests in flight, want %d", f.stats()["inflight"], n)


# ---------------------------------------------------------------- 1, 2: held upstream

def t_held_nonstream():
    """X-Fake-First-Token-Ms 1500, no upstream keep-alives (the fake sends
    its head at once, dsgate holds it for the first byte): dsgate's head at
    ~0.3 s, a blank line every ~0.2 s, then the whole JSON at ~1.5 s."""
    f = fake()
    d = dsgate(f.url, "held-json")
    t = post(d.port, chat("held json"), {"X-Fake-First-Token-Ms": "1500"})
    early_head_ok(t, "held json", 0.3, False, attempts=1)
    j = json_whole(t, "held json")
    check(j["choices"][0]["message"]["content"] == "echo: held json", "content %r", j)
    t_json = first_data_t(t, b"{")
    check(t_json is not None and t_json >= 1.4, "the JSON came at %r s, want >= 1.4", t_json)
    cadence_ok("held json", keepalives(t, False, t_json), 0.2, t_json - t.t_head)
    acc = wait_access(d, 1)
    check(acc[-1]["status"] == 200 and acc[-1]["end"] == "completed", "access log %r", acc[-1])
    healthy(d)


def t_held_stream():
    """The stream variant: text/event-stream head at ~0.3 s, `: keep-alive`
    comments every ~0.2 s, then the data events and [DONE], no error event."""
    f = fake()
    d = dsgate(f.url, "held-sse")
    t = post(d.port, chat("held stream", stream=True), {"X-Fake-First-Token-Ms": "1500"})
    early_head_ok(t, "held stream", 0.3, True, attempts=1)
    stream_whole(t, "held stream", "echo: held stream")
    t_data = first_data_t(t, b"data:")
    check(t_data is not None and t_data >= 1.4, "the first event came at %r s", t_data)
    check(t.body.startswith(KA_SSE), "the stream starts %r", t.body[:80])
    check(t.body.count(b": keep-alive") == t.body.count(KA_SSE),
          "a keep-alive comment is not a whole event: %r", t.body[:300])
    cadence_ok("held stream", keepalives(t, True, t_data), 0.2, t_data - t.t_head)
    check(KA_SSE not in t.body[t.body.find(b"data:"):], "keep-alives after data flowed: %r",
          t.body[-300:])
    acc = wait_access(d, 1)
    check(acc[-1]["status"] == 200 and acc[-1]["end"] == "completed", "access log %r", acc[-1])
    healthy(d)


# ---------------------------------------------------------------- 3: queued

def t_queued():
    """max_inflight 1; A holds the slot for 2 s (X-Fake-Delay-Ms); B
    (non-stream) and C (stream) wait in dsgate's queue: each gets the early
    head (X-Dsgate-Attempts 0) and keep-alives while queued, then its whole
    answer once A is done; the fake saw them only after A."""
    f = fake()
    d = dsgate(f.url, "queued", max_inflight=1)
    a = Timed(d.port, chat("A holds"), {"X-Fake-Delay-Ms": "2000", "X-Test-Id": "A"})
    wait_inflight(f, 1)
    b = Timed(d.port, chat("B queued"), {"X-Test-Id": "B"})
    c = Timed(d.port, chat("C queued", stream=True), {"X-Test-Id": "C"})
    a.wait()
    b.wait()
    c.wait()
    j = json_whole(a, "A")
    check(j["choices"][0]["message"]["content"] == "echo: A holds", "A content %r", j)
    early_head_ok(b, "B", 0.3, False, attempts=0)
    early_head_ok(c, "C", 0.3, True, attempts=0)
    j = json_whole(b, "B")
    check(j["choices"][0]["message"]["content"] == "echo: B queued", "B content %r", j)
    stream_whole(c, "C", "echo: C queued")
    tb, tc = first_data_t(b, b"{"), first_data_t(c, b"data:")
    check(tb >= 1.5 and tc >= 1.5, "B's JSON at %.2fs, C's first event at %.2fs: not after A",
          tb, tc)
    cadence_ok("B", keepalives(b, False, tb), 0.2, tb - b.t_head)
    cadence_ok("C", keepalives(c, True, tc), 0.2, tc - c.t_head)
    ea, eb, ec = f.find("A"), f.find("B"), f.find("C")
    check(ea and eb and ec, "fake log entries A %r B %r C %r", ea, eb, ec)
    check(eb["t_start_ms"] >= ea["t_end_ms"] - 5 and ec["t_start_ms"] >= ea["t_end_ms"] - 5,
          "B or C reached the fake before A ended: %r %r %r", ea, eb, ec)
    acc = wait_access(d, 3)
    check(sorted(x["status"] for x in acc) == [200, 200, 200], "access log %r", acc)
    qs = sorted(x["queue_ms"] for x in acc)
    check(qs[1] >= 1200, "queue_ms in the access log %r: B and C waited ~1.8 s", qs)
    healthy(d)


def t_queued_head_queue_ms():
    """The early head of a queued request carries X-Dsgate-Queue-Ms as of
    then: B has waited ~300 ms in the queue when its head goes, so the
    header must say about 300 (not 0)."""
    f = fake()
    d = dsgate(f.url, "queued-ms", max_inflight=1)
    a = Timed(d.port, chat("A holds"), {"X-Fake-Delay-Ms": "1000"})
    wait_inflight(f, 1)
    b = Timed(d.port, chat("B queued"))
    a.wait()
    b.wait()
    early_head_ok(b, "B", 0.3, False, attempts=0)
    json_whole(b, "B")
    q = int(b.resp.header("x-dsgate-queue-ms"))
    acc = wait_access(d, 2)
    check(200 <= q <= 900, "B's early head says X-Dsgate-Queue-Ms %d after %.2fs queued "
          "(access log queue_ms %r): want the time queued as of the head (~%d)", q,
          b.t_head, [x["queue_ms"] for x in acc], b.t_head * 1000)
    healthy(d)


# ---------------------------------------------------------------- backoff

def t_backoff():
    """Backing off between retries: the first attempt answers 503, the
    backoff is 1 s (jitter none): dsgate's head at ~0.3 s (attempts 1 as of
    then), blank lines, then the second attempt's JSON; access log 200,
    attempts 2."""
    ans = json.dumps({"id": "chatcmpl-bo", "object": "chat.completion", "created": 1,
                      "model": "deepseek-chat",
                      "choices": [{"index": 0, "message": {"role": "assistant",
                                                           "content": "after backoff"},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                "total_tokens": 3}}).encode()
    err = json.dumps({"error": {"message": "Server is busy", "type": "server_busy",
                                "param": None, "code": "server_busy"}}).encode()
    s = scripted([{"status": 503, "headers": [("Content-Type", "application/json")],
                   "body": err},
                  {"status": 200, "headers": [("Content-Type", "application/json")],
                   "body": ans}])
    d = dsgate(s.url, "backoff", attempts=2, base="1s", cap="1s", jitter="none")
    t = post(d.port, chat("backoff"))
    early_head_ok(t, "backoff", 0.3, False, attempts=1)
    j = json_whole(t, "backoff")
    check(j["choices"][0]["message"]["content"] == "after backoff", "content %r", j)
    tj = first_data_t(t, b"{")
    check(0.8 <= tj <= 2.0, "the JSON came at %.2fs, want ~1 s (the backoff)", tj)
    check(t.body[:t.body.find(b"{")].count(b"\n") >= 2, "blank lines %r", t.body[:40])
    check(len(s.requests) == 2, "the upstream saw %d calls", len(s.requests))
    acc = wait_access(d, 1)
    check(acc[-1]["status"] == 200 and acc[-1]["attempts"] == 2, "access log %r", acc[-1])
    healthy(d)


# ---------------------------------------------------------------- the cache

def t_cache_and_coalescing_after_early_head():
    """Cache on: two identical requests at once (one flight: the second
    follows the first) for an answer held 1 s, non-stream and stream: all
    four get the early head, keep-alives and the whole answer; the fake is
    called once per kind; a third request of each kind is a cache hit whose
    body has no keep-alives in it (blank lines / comments are not stored)."""
    f = fake()
    d = dsgate(f.url, "cache", cache=True)
    hs = {"X-Fake-First-Token-Ms": "1000"}
    js = [Timed(d.port, chat("cached json"), hs) for _ in range(2)]
    ss = [Timed(d.port, chat("cached stream", stream=True), hs) for _ in range(2)]
    for i, t in enumerate(js):
        t.wait()
        early_head_ok(t, "json %d" % i, 0.3, False)
        j = json_whole(t, "json %d" % i)
        check(j["choices"][0]["message"]["content"] == "echo: cached json", "json %d: %r", i, j)
    for i, t in enumerate(ss):
        t.wait()
        early_head_ok(t, "stream %d" % i, 0.3, True)
        stream_whole(t, "stream %d" % i, "echo: cached stream")
    n = len([e for e in f.log() if e["path"] == CHAT])
    check(n == 2, "the fake saw %d chat calls, want 2 (one per flight)", n)
    hj = post(d.port, chat("cached json"), hs)
    check(hj.resp.status == 200 and hj.t_head < 0.25, "json hit: status %s after %.2fs",
          hj.resp.status, hj.t_head)
    check((hj.resp.header("x-cache") or "").upper() == "HIT", "json hit: X-Cache %r",
          hj.resp.header("x-cache"))
    check(hj.body.startswith(b"{"), "json hit: the stored body starts %r", hj.body[:40])
    json_whole(hj, "json hit")
    hs_ = post(d.port, chat("cached stream", stream=True), hs)
    check(hs_.resp.status == 200 and hs_.t_head < 0.25, "stream hit: status %s after %.2fs",
          hs_.resp.status, hs_.t_head)
    check(KA_SSE not in hs_.body, "stream hit: keep-alives stored: %r", hs_.body[:120])
    stream_whole(hs_, "stream hit", "echo: cached stream")
    healthy(d)


# ---------------------------------------------------------------- the client leaves

def t_client_leaves_after_early_head():
    """Clients that leave after the early head and a keep-alive (one held
    by the upstream, one queued behind max_inflight 1): dsgate stays up,
    the held one's upstream call is cancelled (the fake sees the client
    leave), the queued one never reaches the fake, and dsgate still answers."""
    f = fake()
    d = dsgate(f.url, "leave", max_inflight=1)
    hs = {"X-Fake-First-Token-Ms": "3000", "X-Test-Id": "held"}
    conns = []
    for body, h in ((chat("leave held", stream=True), hs), (chat("leave queued"),
                                                           {"X-Test-Id": "queued"})):
        c = H.Conn(d.port, timeout=5.0)
        c.send(H.build_request("POST", CHAT, list(h.items()) + [
            ("Content-Type", "application/json")], json.dumps(body), port=d.port))
        conns.append(c)
        if h is hs:
            wait_inflight(f, 1)
    for c in reversed(conns):                    # the queued one first: the slot stays taken
        r = c.read_head(2.0)
        check(r.status == 200, "status %s", r.status)
        c._fill(time.monotonic() + 2.0)          # the first keep-alive
        c.close()
        time.sleep(0.2)
    e = f.find("held", timeout=3.0, pred=lambda e: e.get("client_closed"))
    check(e, "the fake did not see the held request's client leave: %r", f.find("held"))
    time.sleep(0.5)                              # let keep-alive timers fire on the gone
    healthy(d)
    check(f.find("queued", timeout=0.3) is None, "the queued request reached the fake")
    t = post(d.port, chat("after leaving"))
    check(t.resp.status == 200, "status %s", t.resp.status)
    json_whole(t, "after leaving")
    acc = wait_access(d, 3)
    check(len(acc) == 3, "access log %r", acc)
    note("clients that left: access log (status, end) %r", [(x["status"], x["end"])
                                                            for x in acc[:2]])
    healthy(d)


# ---------------------------------------------------------------- 4: queue timeout after the head

def t_queue_timeout_after_head():
    """queue.max_wait 1s, keepalive.after 300ms, max_inflight 1, A holds
    the slot 2.5 s: B (non-stream) gets the early head, blank lines, then a
    body that is exactly an OpenAI-shaped error (code queue_timeout) and the
    chunked end; C (stream) an SSE error event with status 504; the access
    log says 504 / queue_timeout for both."""
    f = fake()
    d = dsgate(f.url, "qtimeout", max_inflight=1, max_wait="1s")
    a = Timed(d.port, chat("A holds"), {"X-Fake-Delay-Ms": "2500"})
    wait_inflight(f, 1)
    b = Timed(d.port, chat("B times out"))
    c = Timed(d.port, chat("C times out", stream=True))
    b.wait()
    c.wait()
    early_head_ok(b, "B", 0.3, False, attempts=0)
    early_head_ok(c, "C", 0.3, True, attempts=0)
    e = error_object(b, "B", code="queue_timeout")
    tb = first_data_t(b, b"{")
    check(0.8 <= tb <= 1.8, "B's error came at %.2fs, want ~1 s (max_wait)", tb)
    check(b.body[:b.body.find(b"{")].count(b"\n") >= 2, "B: blank lines before %r",
          b.body[:40])
    check(b.body.rstrip(b"\n").endswith(b"}"), "B: the body ends %r", b.body[-40:])
    note("queue timeout after the head, non-stream body: %r", b.body.lstrip(b"\n"))
    sse_error(c, "C", 504, code="queue_timeout")
    note("queue timeout after the head, stream ends: %r", c.body[-200:])
    a.wait()
    json_whole(a, "A")
    acc = wait_access(d, 3)
    got = sorted((x["status"], x["end"]) for x in acc)
    check(got == [(200, "completed"), (504, "queue_timeout"), (504, "queue_timeout")],
          "access log (status, end) %r", got)
    check(e["type"], "B: error.type %r", e["type"])
    healthy(d)


# ---------------------------------------------------------------- 5: before `after`

def t_errors_before_after_keep_status():
    """keepalive.after 1s: a queue timeout at 300 ms is a plain 504
    (non-stream and stream); an upstream 429 at once and a 400 after 200 ms
    keep their status codes (JSON error bodies, Content-Length)."""
    f = fake()
    d = dsgate(f.url, "before", after="1s", max_inflight=1, max_wait="300ms")
    a = Timed(d.port, chat("A holds"), {"X-Fake-Delay-Ms": "1500"})
    wait_inflight(f, 1)
    b = Timed(d.port, chat("B times out"))
    c = Timed(d.port, chat("C times out", stream=True))
    for t, what in ((b, "B json"), (c, "C stream")):
        t.wait()
        check(t.resp.status == 504, "%s: status %s, want 504; body %r", what, t.resp.status,
              t.body[:300])
        check(t.t_head < 0.9, "%s: the 504 came at %.2fs", what, t.t_head)
        t.resp.body = t.body
        bad = H.openai_error_shape(t.resp)
        check(bad is None, "%s: %s", what, bad)
        check(t.resp.json()["error"]["code"] == "queue_timeout", "%s: body %r", what, t.body)
    a.wait()
    r429 = post(d.port, chat("429 now"), {"X-Fake-Status": "429"})
    r400 = post(d.port, chat("400 soon", stream=True),
                {"X-Fake-Status": "400", "X-Fake-Delay-Ms": "200"})
    for t, st in ((r429, 429), (r400, 400)):
        check(t.resp.status == st, "status %s, want %d; body %r", t.resp.status, st,
              t.body[:300])
        check(not t.resp.chunked, "the %d is chunked: %r", st, t.resp.headers)
        t.resp.body = t.body
        bad = H.openai_error_shape(t.resp)
        check(bad is None, "%d: %s", st, bad)
    acc = wait_access(d, 5)
    got = sorted(x["status"] for x in acc)
    check(got == [200, 400, 429, 504, 504], "access log statuses %r", got)
    healthy(d)


# ---------------------------------------------------------------- 6: other paths

def t_other_paths_no_early_head():
    """cache.paths [/v1/chat/completions]: POST /v1/completions (a
    completion endpoint left out of cache.paths), stream or not, and POST
    /v1/echo answered after 1.2 s get no early head: the upstream's own
    head at ~1.2 s, no keep-alives.  A chat request in the same dsgate does
    get one (the config is live)."""
    f = fake()
    d = dsgate(f.url, "paths", paths=["/v1/chat/completions"])
    slow = {"X-Fake-Delay-Ms": "1200"}
    jobs = {
        "completions": Timed(d.port, {"model": "deepseek-chat", "prompt": "p"}, slow,
                             path="/v1/completions"),
        "completions stream": Timed(d.port, {"model": "deepseek-chat", "prompt": "p",
                                             "stream": True}, slow, path="/v1/completions"),
        "echo": Timed(d.port, {"x": 1}, slow, path="/v1/echo"),
        "chat (control)": Timed(d.port, chat("control"), slow),
    }
    for t in jobs.values():
        t.wait()
    early_head_ok(jobs["chat (control)"], "chat (control)", 0.3, False)
    json_whole(jobs["chat (control)"], "chat (control)")
    for what in ("completions", "completions stream", "echo"):
        t = jobs[what]
        check(t.resp.status == 200, "%s: status %s %r", what, t.resp.status, t.body[:200])
        check(t.t_head >= 1.1, "%s: a head after %.2fs, before the upstream's (1.2 s): %r",
              what, t.t_head, t.resp.headers)
        check(t.error is None and t.resp.complete, "%s: incomplete (%s)", what, t.error)
        check(not t.body.startswith(b"\n") and KA_SSE not in t.body,
              "%s: keep-alives in %r", what, t.body[:100])
    check(jobs["echo"].resp.header("content-length") is not None, "echo: no Content-Length")
    j = json.loads(jobs["completions"].body)
    check(j["choices"][0]["text"] == "echo: p", "completions %r", j)
    check(jobs["completions stream"].body.rstrip().endswith(b"data: [DONE]"),
          "completions stream ends %r", jobs["completions stream"].body[-80:])
    healthy(d)


# ---------------------------------------------------------------- 7: late upstream error

def t_late_upstream_error():
    """X-Fake-Status 400 with X-Fake-Delay-Ms 1000, after 300 ms: the early
    head, then the upstream's 400 becomes the body: non-stream, an error
    object with the upstream's message; stream, an SSE error event with
    status 400; the access log says 400 for both."""
    f = fake()
    d = dsgate(f.url, "late400")
    hs = {"X-Fake-Status": "400", "X-Fake-Delay-Ms": "1000"}
    b = Timed(d.port, chat("late 400"), hs)
    c = Timed(d.port, chat("late 400 stream", stream=True), hs)
    b.wait()
    c.wait()
    early_head_ok(b, "json", 0.3, False, attempts=1)
    early_head_ok(c, "stream", 0.3, True, attempts=1)
    e = error_object(b, "json", message=FAKE_400_MSG)
    note("late 400, non-stream body: %r", b.body.lstrip(b"\n"))
    check(first_data_t(b, b"{") >= 0.9, "json: the error came at %.2fs",
          first_data_t(b, b"{"))
    es = sse_error(c, "stream", 400, message=FAKE_400_MSG)
    note("late 400, stream ends: %r", c.body[-220:])
    check(e["code"] == es["code"] == "400", "error.code json %r stream %r", e["code"],
          es["code"])
    acc = wait_access(d, 2)
    check(sorted(x["status"] for x in acc) == [400, 400], "access log %r", acc)
    healthy(d)


# ---------------------------------------------------------------- 8: a real client's read timeout

def _httpx_post(url, body, headers):
    """httpx with its default timeout (5 s for connect, read, write, pool)."""
    t0 = time.monotonic()
    try:
        r = httpx.post(url, json=body, headers=headers)
        return ("ok", r.status_code, r.text, time.monotonic() - t0)
    except httpx.TimeoutException as e:
        return ("timeout", type(e).__name__, str(e), time.monotonic() - t0)
    except Exception as e:                      # noqa: BLE001
        return ("error", type(e).__name__, str(e), time.monotonic() - t0)


def _httpclient_post(url, body, headers):
    """Stand-in: http.client with a 5 s socket timeout."""
    t0 = time.monotonic()
    hostport = url.split("//", 1)[1].split("/", 1)[0]
    host, port = hostport.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5.0)
    try:
        hs = dict(headers)
        hs["Content-Type"] = "application/json"
        conn.request("POST", CHAT, json.dumps(body), hs)
        r = conn.getresponse()
        text = r.read().decode("utf-8")
        return ("ok", r.status, text, time.monotonic() - t0)
    except socket.timeout as e:
        return ("timeout", type(e).__name__, str(e), time.monotonic() - t0)
    except Exception as e:                      # noqa: BLE001
        return ("error", type(e).__name__, str(e), time.monotonic() - t0)
    finally:
        conn.close()


def t_client_read_timeout():
    """The upstream answers after 8 s (X-Fake-First-Token-Ms 8000, no
    upstream keep-alives).  A client with a 5 s read timeout (httpx's
    default): through dsgate with the default keepalive (after 2s, every
    3s: bytes at 2, 5, 8 s) it gets 200 and the whole JSON; directly
    against the fake (its head at once, then 8 s of silence) it times out."""
    if httpx is not None:
        client, fn = "httpx %s" % httpx.__version__, _httpx_post
    else:
        client, fn = "http.client (5 s socket timeout; httpx missing)", _httpclient_post
    note("client_read_timeout uses %s", client)
    f = fake()
    d = dsgate(f.url, "httpx", after=None)           # the defaults
    hs = {"X-Fake-First-Token-Ms": "8000"}
    res = {}

    def go(key, base):
        res[key] = fn(base + CHAT, chat("slow " + key), hs)

    th = [threading.Thread(target=go, args=("dsgate", "http://127.0.0.1:%d" % d.port)),
          threading.Thread(target=go, args=("direct", f.url))]
    for x in th:
        x.start()
    for x in th:
        x.join(20)
    check("dsgate" in res and "direct" in res, "no results: %r", res)
    kind, st, text, dt = res["dsgate"]
    check(kind == "ok" and st == 200, "through dsgate: %s %s %r after %.2fs", kind, st,
          text[:300], dt)
    j = json.loads(text)
    check(j["choices"][0]["message"]["content"] == "echo: slow dsgate", "content %r", j)
    check(dt >= 7.5, "through dsgate: answered after %.2fs, the upstream takes 8 s", dt)
    kind, name, text, dt = res["direct"]
    if httpx is not None:
        check(kind == "timeout" and name == "ReadTimeout",
              "directly against the fake: %s %s %r after %.2fs, want httpx.ReadTimeout",
              kind, name, text[:200], dt)
    else:
        check(kind == "timeout", "directly against the fake: %s %s %r after %.2fs",
              kind, name, text[:200], dt)
    check(4.5 <= dt <= 7.0, "directly against the fake: timed out after %.2fs, want ~5 s", dt)
    acc = wait_access(d, 1)
    check(acc[-1]["status"] == 200, "access log %r", acc[-1])
    healthy(d)


# ---------------------------------------------------------------- runner

TESTS = [
    ("held_nonstream", t_held_nonstream),
    ("held_stream", t_held_stream),
    ("queued", t_queued),
    ("queued_head_queue_ms", t_queued_head_queue_ms),
    ("backoff", t_backoff),
    ("cache_and_coalescing_after_early_head", t_cache_and_coalescing_after_early_head),
    ("client_leaves_after_early_head", t_client_leaves_after_early_head),
    ("queue_timeout_after_head", t_queue_timeout_after_head),
    ("errors_before_after_keep_status", t_errors_before_after_keep_status),
    ("other_paths_no_early_head", t_other_paths_no_early_head),
    ("late_upstream_error", t_late_upstream_error),
    ("client_read_timeout", t_client_read_timeout),
]


after_each = H.sanitizer_after_each(DSGATES)


def main():
    return H.main("test_keepalive", TESTS, started=STARTED, after_each=after_each,
                  require=[(H.DSGATE, "build/asan/dsgate"),
                           (H.FAKE, "build/fake_upstream")])


if __name__ == "__main__":
    sys.exit(main())
