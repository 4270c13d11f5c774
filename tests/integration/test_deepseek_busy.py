#!/usr/bin/env python3
"""
test_deepseek_busy: what DeepSeek does when it is busy, through the real daemon.

DeepSeek does not answer 503 when busy: it answers 200 at once, sends
keep-alives (`: keep-alive` SSE comments, or blank lines for a JSON answer)
while the request waits for inference, and closes the connection without
any data when the wait is too long.  dsgate must take such an answer for
what it is (nothing yet) and retry it transparently:

  * a stream closed (FIN, with or without the last chunk) or reset after
    the SSE head and keep-alives only is retried: the client gets ONE 200
    stream with the next attempt's whole answer, no error event (also when
    the cut fell in the middle of a keep-alive line); the same for a JSON
    answer of blank lines (no blank lines reach the client);
  * a retry of such a stream that answers 429 when retries are used up
    ends the stream with an SSE error event carrying the upstream's
    message, status 429 and code "429" (access log status 429);
  * a sole upstream whose circuit opened on 503s still takes the next
    request at once, and that success closes the circuit;
  * every attempt is exactly one upstream call: a reused keep-alive
    connection reset before the answer (X-Fake-Reset-Reused) is not resent
    silently by libcurl (fake /_log count == X-Dsgate-Attempts);
  * upstreams that refuse connections: once their circuits are open, a
    fast 503 with Retry-After (a sole upstream; requests queued when it opened);
  * the fake's hold mode (--hold --capacity 4 --hold-max-ms 800) end to
    end: 24 concurrent requests, every one completes whole.

ScriptedUpstream plays the attempts that must differ (first held and cut,
then a real answer); build/fake_upstream does the rest.  Each test starts
what it needs and stops it after; every wait has a deadline; dsgate's log
is scanned for sanitizer reports after each test.  About 10 s in all.
`test_deepseek_busy.py NAME...` runs only those tests.
"""

import concurrent.futures
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import CHAT, chat_body, check, note                # noqa: E402
from harness import log_for, wait_access                        # noqa: E402

STARTED = []        # fakes, scripted upstreams and dsgates of the running test
DSGATES = []        # the dsgates of the running test (their logs are scanned after it)


def tid():
    return H.test_id("dsb-")


# ---------------------------------------------------------------- processes

def fake(*args, name="dsbusy"):
    return H.start_fake(STARTED, *args, name=name)


def scripted(script):
    return H.start_scripted(STARTED, script)


def closed_port_url():
    return "http://127.0.0.1:%d" % H.free_port()


def config(port, ups, attempts=2, base="20ms", cap="200ms", jitter="full", budget=0.5,
           max_wait="20s", max_inflight=16, adaptive=None, connect="2s", first_data="30s",
           retry_on=None, routing="failover"):
    """dsgate YAML; UPS: [(name, url)]."""
    lines = [
        "# written by tests/integration/test_deepseek_busy.py",
        "listen: 127.0.0.1:%d" % port,
        "routing: %s" % routing,
        "upstreams:",
    ]
    for name, url in ups:
        lines += H.upstream_yaml(name, url, max_inflight, adaptive, connect, first_data)
    lines += [
        "queue:",
        "  max_queued: 10000",
        "  max_wait: %s" % max_wait,
        "retry:",
        "  max_attempts: %d" % attempts,
        "  base: %s" % base,
        "  cap: %s" % cap,
        "  jitter: %s" % jitter,
        "  budget: %s" % budget,
    ]
    if retry_on is not None:
        lines.append("  on: [%s]" % ", ".join(str(x) for x in retry_on))
    lines += [
        "cache:",
        "  enabled: false",
        "shutdown_timeout: 3s",
        "log: {level: info, format: json}",
    ]
    return "\n".join(lines) + "\n"


def dsgate(ups, tag, **cfg):
    if isinstance(ups, str):
        ups = [("up", ups)]
    return H.start_dsgate(lambda port: config(port, ups, **cfg), "dsbusy-" + tag,
                          STARTED, DSGATES)


healthy = H.check_healthy


def readyz(port):
    r = H.request(port, "GET", "/readyz", timeout=5.0)
    check(r.status in (200, 503), "/readyz answered %s", r.status)
    j = r.json()
    return r.status, j


def states(port):
    _, j = readyz(port)
    return {u["name"]: (u["state"], u["reason"]) for u in j["upstreams"]}


def attempts_of(r):
    return int(r.header("x-dsgate-attempts") or "0")


Pending = H.Pending     # a request sent now whose answer a thread reads


# ---------------------------------------------------------------- scripted answers

SSE_HEAD = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")]
JSON_HEAD = [("Content-Type", "application/json")]
KA = b": keep-alive\n\n"


def sse_chunk(cid, delta, finish=None):
    return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": 1,
                       "model": "deepseek-chat", "system_fingerprint": "fp_s",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def sse_answer(cid, text, pieces=3):
    """A real SSE answer (chunked, one event per chunk) whose content deltas join to TEXT."""
    n = max(1, min(pieces, len(text)))
    step = (len(text) + n - 1) // n
    events = [sse_chunk(cid, {"role": "assistant", "content": ""})]
    events += [sse_chunk(cid, {"content": text[i:i + step]}) for i in range(0, len(text), step)]
    events.append(sse_chunk(cid, {"content": ""}, "stop"))
    body = [("data: %s\n\n" % e).encode() for e in events] + [b"data: [DONE]\n\n"]
    return {"status": 200, "headers": SSE_HEAD, "body": body, "framing": "chunked"}, events


def json_answer(cid, text):
    b = json.dumps({"id": cid, "object": "chat.completion", "created": 1,
                    "model": "deepseek-chat",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                              "total_tokens": 3}}).encode()
    return {"status": 200, "headers": JSON_HEAD, "body": b}, b


def held(stream, end, n=3, every_ms=60):
    """DeepSeek's held answer: the 200 head at once, N keep-alives EVERY_MS
    apart, then END: "fin" (close without the last chunk), "fin_last" (the
    last chunk, then close), "fin_midline" (half a keep-alive line, then a
    close without the last chunk) or "reset" (RST)."""
    pieces = [(every_ms, KA if stream else b"\n") for _ in range(n)]
    if end == "fin_midline":            # cut in the middle of a keep-alive comment
        pieces.append((every_ms, KA[:6] if stream else b" "))
        n += 1
    a = {"status": 200, "headers": SSE_HEAD if stream else JSON_HEAD, "body": pieces,
         "framing": "chunked"}
    if end in ("fin", "fin_midline"):
        a.update(action="close", at=n)
    elif end == "reset":
        a.update(action="reset", at=n)
    elif end != "fin_last":
        raise ValueError(end)
    return a


def err_answer(status, message, kind):
    return {"status": status, "headers": JSON_HEAD,
            "body": json.dumps({"error": {"message": message, "type": kind, "param": None,
                                          "code": kind}}).encode()}


def stream_ok(st, what):
    """ST is one whole 200 stream: events, [DONE], no error event, no transport error."""
    check(st.resp is not None, "%s: no response (%s)", what, st.error)
    check(st.resp.status == 200, "%s: status %s %r", what, st.resp.status, st.raw[:300])
    check(st.error is None, "%s: transport error %s (raw %r)", what, st.error, st.raw[-300:])
    check(st.resp.complete, "%s: the stream did not end with the last chunk", what)
    ct = (st.resp.header("content-type") or "").lower()
    check(ct.startswith("text/event-stream"), "%s: content-type %r", what, ct)
    errs = [e for e in st.events if H.is_error_event(e)]
    check(not errs, "%s: error events %r", what, [e["data"] for e in errs])
    datas = [e["data"] for e in st.data_events()]
    check(datas and datas[-1] == "[DONE]", "%s: last data event %r", what,
          datas[-1] if datas else None)
    check(datas.count("[DONE]") == 1, "%s: %d [DONE] events", what, datas.count("[DONE]"))
    return datas


# ---------------------------------------------------------------- 1: held, then closed

def t_stream_held_closed_retried():
    """A stream whose first attempt is the 200 SSE head and keep-alives, then
    a close (FIN without the last chunk; FIN after the last chunk) or a
    reset: retried; the client gets one 200 stream with the second attempt's
    whole answer, the upstream saw 2 calls."""
    failed = []
    for end in ("fin", "fin_last", "reset", "twice"):
        try:
            _stream_held_variant(end)
        except AssertionError as e:
            failed.append(str(e))
    check(not failed, "%s", " || ".join(failed))


def _stream_held_variant(end):
    """One variant of the held stream (see held()); "twice": held and cut
    twice (FIN, then RST), the answer on the third attempt."""
    t = tid()
    second, events = sse_answer("chatcmpl-second-" + end, "second attempt answer " + end)
    if end == "twice":              # held and cut twice, then the answer
        s = scripted([held(True, "fin"), held(True, "reset"), second])
    else:
        s = scripted([held(True, end), second])
    calls = 3 if end == "twice" else 2
    d = dsgate(s.url, "stream-" + end, attempts=calls)
    t0 = time.monotonic()
    st = H.sse_request(d.port, chat_body("held " + end, stream=True),
                       headers={"X-Test-Id": t}, timeout=10.0)
    dt = time.monotonic() - t0
    datas = stream_ok(st, end)
    check(datas == events + ["[DONE]"], "%s: %d data events (want the second attempt's %d "
          "+ [DONE]); raw stream starts %r", end, len(datas), len(events), st.raw[:160])
    check(st.joined("content") == "second attempt answer " + end, "%s: content %r", end,
          st.joined("content"))
    check(len(s.requests) == calls, "%s: the upstream saw %d calls, want %d", end,
          len(s.requests), calls)
    check(all(r.header("x-test-id") == t for r in s.requests), "%s: not our requests", end)
    check(s.requests[1].body == s.requests[0].body, "%s: the retry sent another body", end)
    acc = wait_access(d, 1)
    check(acc[-1]["status"] == 200 and acc[-1]["attempts"] == calls,
          "%s: access log %r", end, acc[-1])
    check(dt < 3.0, "%s: took %.2fs", end, dt)
    healthy(d)


def t_stream_held_closed_failover():
    """Two upstreams: the first always holds and closes the stream, the
    second is the fake: the retry moves there and the client gets its whole
    stream (one 200, no error event)."""
    t = tid()
    s = scripted(held(True, "fin"))
    f = fake(name="second")
    d = dsgate([("holder", s.url), ("fake", f.url)], "stream-failover", attempts=2)
    st = H.sse_request(d.port, chat_body("failover " + t, stream=True),
                       headers={"X-Test-Id": t}, timeout=10.0)
    stream_ok(st, "failover")
    check(st.joined("content") == "echo: failover " + t, "content %r", st.joined("content"))
    check(len(s.requests) == 1, "holder saw %d calls", len(s.requests))
    check(len(log_for(f, t)) == 1, "the fake saw %d calls", len(log_for(f, t)))
    acc = wait_access(d, 1)
    check(acc[-1]["status"] == 200 and acc[-1]["attempts"] == 2 and
          acc[-1]["upstream"] == "fake", "access log %r", acc[-1])
    healthy(d)


def t_stream_cut_midline_retried():
    """The first attempt is cut in the middle of a keep-alive comment
    (": keep" then FIN): the client must still get the second attempt's
    events whole (the cut line ended before them), and a late 429 after
    such a cut must still be a well-formed error event."""
    failed = []
    try:
        _stream_held_variant("fin_midline")
    except AssertionError as e:
        failed.append(str(e))
    s = scripted([held(True, "fin_midline"), err_answer(429, RATE_MSG, "rate_limit_error")])
    d = dsgate(s.url, "midline-429", attempts=2)
    st = H.sse_request(d.port, chat_body("midline 429", stream=True), timeout=10.0)
    errs = [e for e in st.events if H.is_error_event(e)]
    if len(errs) != 1 or (json.loads(errs[0]["data"]).get("error") or {}).get("message") \
            != RATE_MSG:
        failed.append("late 429 after a cut line: error events %r; raw end %r"
                      % ([e["data"] for e in errs], st.raw[-200:]))
    healthy(d)
    check(not failed, "%s", " || ".join(failed))


def t_json_held_closed_retried():
    """Non-stream: a 200 application/json chunked head and blank lines, then
    a close (with or without the last chunk) or a reset: retried; the client
    gets one complete JSON answer, 200, without leading blank lines."""
    for end in ("fin", "fin_last", "reset", "fin_midline"):
        t = tid()
        second, body = json_answer("chatcmpl-json-" + end, "json second " + end)
        s = scripted([held(False, end, n=4), second])
        d = dsgate(s.url, "json-" + end, attempts=2)
        t0 = time.monotonic()
        r = H.request(d.port, "POST", CHAT, headers={"X-Test-Id": t},
                      body=chat_body("json held " + end), timeout=10.0)
        dt = time.monotonic() - t0
        check(r.status == 200, "%s: status %s %r", end, r.status, r.body[:300])
        check(r.body == body, "%s: body %r, want exactly the second answer %r", end,
              r.body[:300], body[:100])
        check(r.json()["choices"][0]["message"]["content"] == "json second " + end,
              "%s: content", end)
        check(attempts_of(r) == 2, "%s: X-Dsgate-Attempts %r", end,
              r.header("x-dsgate-attempts"))
        check(len(s.requests) == 2, "%s: the upstream saw %d calls, want 2", end,
              len(s.requests))
        check(dt < 3.0, "%s: took %.2fs", end, dt)
        healthy(d)


# ---------------------------------------------------------------- 2: a late non-200

RATE_MSG = "Too many concurrent requests"


def t_late_429_error_event():
    """First attempt held and closed, the retry answers 429 and retries are
    used up (max_attempts 2): the stream (already 200) ends with an SSE
    error event: the upstream's message, status 429, code "429"; the access
    log says 429.  With a third attempt allowed the 429 is retried and the
    stream completes."""
    t = tid()
    s = scripted([held(True, "fin"), err_answer(429, RATE_MSG, "rate_limit_error")])
    d = dsgate(s.url, "late429", attempts=2)
    st = H.sse_request(d.port, chat_body("late 429", stream=True), headers={"X-Test-Id": t},
                       timeout=10.0)
    check(st.resp is not None and st.resp.status == 200, "status %r (%s)",
          st.resp and st.resp.status, st.error)
    check(len(s.requests) == 2, "the upstream saw %d calls, want 2", len(s.requests))
    check(not st.data_events(), "data events %r", [e["data"] for e in st.data_events()])
    errs = [e for e in st.events if H.is_error_event(e)]
    check(len(errs) == 1, "%d error events in %r", len(errs), st.raw[-400:])
    ev = errs[0]
    check(ev["event"] == "error", "error event's type %r", ev["event"])
    check(st.events[-1] is ev, "the error event is not the last event: %r", st.raw[-400:])
    j = json.loads(ev["data"])
    e = j.get("error") or {}
    check(e.get("message") == RATE_MSG, "error.message %r", e.get("message"))
    check(e.get("status") == 429, "error.status %r", e.get("status"))
    check(e.get("code") == "429", "error.code %r", e.get("code"))
    check(e.get("type") == "rate_limit_error", "error.type %r", e.get("type"))
    acc = wait_access(d, 1)
    check(acc[-1]["status"] == 429, "access log status %r (%r)", acc[-1]["status"], acc[-1])
    healthy(d)

    # non-stream: nothing reached the client yet, so the 429 is passed on as it is
    s2 = scripted([held(False, "fin"), err_answer(429, RATE_MSG, "rate_limit_error")])
    d2 = dsgate(s2.url, "late429-json", attempts=2)
    r = H.request(d2.port, "POST", CHAT, body=chat_body("late 429 json"), timeout=10.0)
    check(r.status == 429, "non-stream: status %s %r", r.status, r.body[:300])
    check((r.json().get("error") or {}).get("message") == RATE_MSG, "non-stream: body %r",
          r.body[:300])
    check(len(s2.requests) == 2, "non-stream: the upstream saw %d calls", len(s2.requests))
    healthy(d2)

    # a third attempt allowed: held, 429, then the answer
    third, events = sse_answer("chatcmpl-third", "third time lucky")
    s3 = scripted([held(True, "fin"), err_answer(429, RATE_MSG, "rate_limit_error"), third])
    d3 = dsgate(s3.url, "late429-retried", attempts=3)
    st = H.sse_request(d3.port, chat_body("late 429 retried", stream=True), timeout=10.0)
    datas = stream_ok(st, "429 retried")
    check(datas == events + ["[DONE]"], "429 retried: data events %r", datas)
    check(len(s3.requests) == 3, "429 retried: the upstream saw %d calls", len(s3.requests))
    healthy(d3)


# ---------------------------------------------------------------- 3: a sole upstream

def t_sole_upstream_never_stalls():
    """One upstream, max_attempts 1: 5 answers 503 open its circuit (/readyz
    open); the next request is still sent and gets 200 at once; the circuit
    is closed again afterwards."""
    f = fake(name="sole")
    d = dsgate(f.url, "sole", attempts=1)
    for i in range(5):
        r = H.request(d.port, "POST", CHAT, headers={"X-Fake-Status": "503",
                                                     "X-Test-Id": tid()},
                      body=chat_body("503 %d" % i), timeout=10.0)
        check(r.status == 503, "request %d: %s %r", i, r.status, r.body[:200])
    s = states(d.port)
    check(s.get("up", ("?",))[0] == "open", "/readyz after 5 x 503: %s", s)
    t = tid()
    t0 = time.monotonic()
    r = H.request(d.port, "POST", CHAT, headers={"X-Test-Id": t}, body=chat_body("after " + t),
                  timeout=10.0)
    dt = time.monotonic() - t0
    note("sole upstream with an open circuit: answered in %.0f ms", dt * 1000)
    check(r.status == 200, "with the circuit open: %s %r", r.status, r.body[:200])
    check(r.json()["choices"][0]["message"]["content"] == "echo: after " + t, "body %r",
          r.body[:200])
    check(dt < 1.0, "answered after %.2fs, want at once", dt)
    check(len(log_for(f, t)) == 1, "the fake saw it %d times", len(log_for(f, t)))
    st, j = readyz(d.port)
    s = states(d.port)
    check(s.get("up", ("?",))[0] == "closed", "/readyz after the success: %s", s)
    check(st == 200 and j["ready"] is True, "/readyz after the success: %s %s", st, j)
    healthy(d)


# ---------------------------------------------------------------- 4: one attempt, one call

def t_reset_reused_counted():
    """X-Fake-Reset-Reused: the fake resets a reused keep-alive connection
    before answering.  Sequential requests through dsgate (retry on
    connect): every one but the first finds its pooled connection reset,
    reports X-Dsgate-Attempts: 2 and the fake logged exactly 2 calls for it
    (libcurl did not resend on its own): fake log count == attempts, for
    each request, stream or not."""
    f = fake(name="reused")
    d = dsgate(f.url, "reused", attempts=3, base="10ms", cap="50ms")
    rows = []
    for i in range(8):
        t = tid()
        hs = {"X-Fake-Reset-Reused": "1", "X-Test-Id": t}
        stream = i % 3 == 2
        if stream:
            st = H.sse_request(d.port, chat_body("reused %d" % i, stream=True), headers=hs,
                               timeout=10.0)
            stream_ok(st, "stream %d" % i)
            check(st.joined("content") == "echo: reused %d" % i, "stream %d: content %r", i,
                  st.joined("content"))
            att = attempts_of(st.resp)
        else:
            r = H.request(d.port, "POST", CHAT, headers=hs, body=chat_body("reused %d" % i),
                          timeout=10.0)
            check(r.status == 200, "request %d: %s %r", i, r.status, r.body[:200])
            check(r.json()["choices"][0]["message"]["content"] == "echo: reused %d" % i,
                  "request %d: body %r", i, r.body[:200])
            att = attempts_of(r)
        n = len(log_for(f, t))
        rows.append((i, att, n))
    note("reset_reused: (request, X-Dsgate-Attempts, fake log entries) %r", rows)
    for i, att, n in rows:
        check(att == n, "request %d: X-Dsgate-Attempts %d but the fake saw %d calls (%r)",
              i, att, n, rows)
    check(rows[0][1] == 1, "the first request (fresh connection) took %d attempts", rows[0][1])
    check(all(att == 2 for _, att, _ in rows[1:]),
          "requests on a reused connection should take exactly 2 attempts: %r", rows)
    acc = wait_access(d, len(rows))
    check([a["attempts"] for a in acc] == [att for _, att, _ in rows],
          "access log attempts %r", [a["attempts"] for a in acc])
    check(f.stats()["requests"] == sum(att for _, att, _ in rows),
          "fake requests %d != sum of attempts %d", f.stats()["requests"],
          sum(att for _, att, _ in rows))
    healthy(d)


# ---------------------------------------------------------------- 5: unreachable

def t_unreachable_sole_fast_503():
    """A sole upstream that refuses connections, max_attempts 1: 5 x 502
    open its circuit (reason connect); the next request gets 503 at once
    with Retry-After, without reaching for the upstream."""
    d = dsgate(closed_port_url(), "unreach", attempts=1, max_wait="10s")
    for i in range(5):
        r = H.request(d.port, "POST", CHAT, body=chat_body("down %d" % i), timeout=10.0)
        check(r.status == 502, "request %d: %s %r", i, r.status, r.body[:200])
    s = states(d.port)
    check(s.get("up") == ("open", "connect"), "/readyz %s", s)
    t0 = time.monotonic()
    r = H.request(d.port, "POST", CHAT, body=chat_body("after"), timeout=10.0)
    dt = time.monotonic() - t0
    check(r.status == 503, "with the circuit open: %s %r", r.status, r.body[:200])
    check(dt < 0.5, "503 after %.2fs, want at once", dt)
    check(H.openai_error_shape(r) is None, "503 body: %s", H.openai_error_shape(r))
    ra = r.header("retry-after")
    check(ra is not None and ra.isdigit() and 1 <= int(ra) <= 6, "Retry-After %r", ra)
    check(attempts_of(r) == 0, "X-Dsgate-Attempts %r", r.header("x-dsgate-attempts"))
    # a stream too: a plain 503, not a stream
    st = H.sse_request(d.port, chat_body("after stream", stream=True), timeout=5.0)
    check(st.resp is not None and st.resp.status == 503, "stream: %r %s",
          st.resp and st.resp.status, st.error)
    check(st.resp.header("retry-after"), "stream 503 without Retry-After")
    healthy(d)


def queue_depth(port):
    r = H.request(port, "GET", "/metrics", timeout=5.0)
    check(r.status == 200, "/metrics: %s", r.status)
    n = 0.0
    for ln in r.body.decode("utf-8", "replace").splitlines():
        if ln.startswith("dsgate_queue_depth"):
            n += float(ln.split()[-1])
    return n


def t_unreachable_queued_fast_503():
    """Requests that were queued when the circuit opened on connect errors
    get 503 with Retry-After at once, not after queue.max_wait (10 s).  A
    sole upstream with max_inflight 1 holds one request (it never answers)
    while 8 more queue behind it; then it goes away (its port closed): the
    held one breaks (502), the next 4 queued find the port refused (502;
    5 failures open the circuit, the last for connect), the 4 still queued
    get 503 + Retry-After at once."""
    s = H.ScriptedUpstream(H.NEVER)
    stopped = [False]
    try:
        d = dsgate(s.url, "unreach-queued", attempts=1, max_wait="10s", max_inflight=1,
                   adaptive=False, connect="1s")
        holder = Pending(d.port, chat_body("holder"))
        check(s.wait_requests(1, 5.0), "the holder did not reach the upstream")
        queued = []
        for i in range(8):
            queued.append(Pending(d.port, chat_body("queued %d" % i)))
            want = i + 1
            check(H.wait_until(lambda: queue_depth(d.port) == want, 5.0),
                  "queue depth %s, want %d", queue_depth(d.port), want)
        t0 = time.monotonic()
        s.stop()
        stopped[0] = True
        rh = holder.wait(10.0)
        res = [p.wait(12.0) for p in queued]
        dt = max(p.t_end for p in queued) - t0
    finally:
        if not stopped[0]:
            s.stop()
    got = [r.status for r in res]
    note("queued when the circuit opened: holder %s, queued %r, all answered %.2fs after the "
         "upstream went away", rh.status, got, dt)
    check(rh.status == 502, "holder: %s %r", rh.status, rh.body[:200])
    check(got == [502] * 4 + [503] * 4, "queued statuses %r, want 4 x 502 then 4 x 503", got)
    check(dt < 1.5, "the queued requests were answered %.2fs after the upstream went away "
          "(queue.max_wait 10 s)", dt)
    for r in res[4:]:
        ra = r.header("retry-after")
        check(ra is not None and ra.isdigit() and 1 <= int(ra) <= 6, "Retry-After %r", ra)
        check(H.openai_error_shape(r) is None, "503 body: %s", H.openai_error_shape(r))
    check(states(d.port).get("up") == ("open", "connect"), "/readyz %s", states(d.port))
    check(queue_depth(d.port) == 0, "queue depth %s at the end", queue_depth(d.port))
    healthy(d)


# ---------------------------------------------------------------- 6: hold mode end to end

def t_hold_mode_end_to_end():
    """fake --hold --capacity 4 --hold-keepalive-ms 200 --hold-max-ms 800,
    dsgate max_inflight 16, max_attempts 4, base 100ms: 12 non-stream and
    12 stream requests at once, each X-Fake-Delay-Ms 300: all 200 and
    whole (streams end with [DONE], no error event); the requests the fake
    held past 800 ms and cut were retried transparently."""
    f = fake("--hold", "--capacity", "4", "--hold-keepalive-ms", "200", "--hold-max-ms", "800",
             name="hold")
    d = dsgate(f.url, "hold", attempts=4, base="100ms", cap="1s", max_inflight=16)
    jobs = [(i, i % 2 == 1, tid()) for i in range(24)]

    def one(job):
        i, stream, t = job
        hs = {"X-Fake-Delay-Ms": "300", "X-Test-Id": t}
        try:
            if stream:
                return H.sse_request(d.port, chat_body("hold %d" % i, stream=True), headers=hs,
                                     timeout=20.0)
            return H.request(d.port, "POST", CHAT, headers=hs, body=chat_body("hold %d" % i),
                             timeout=20.0)
        except Exception as e:                  # noqa: BLE001
            return e
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(24) as ex:
        res = list(ex.map(one, jobs))
    dt = time.monotonic() - t0
    st = f.stats()
    bad = []
    calls = []
    for (i, stream, t), r in zip(jobs, res):
        n = len(log_for(f, t))
        calls.append(n)
        want = "echo: hold %d" % i
        try:
            check(not isinstance(r, Exception), "exception %r", r)
            if stream:
                stream_ok(r, "stream %d" % i)
                check(r.joined("content") == want, "content %r", r.joined("content"))
            else:
                check(r.status == 200, "status %s %r", r.status, r.body[:200])
                check(r.body[:1] == b"{", "body starts %r", r.body[:20])
                check(r.json()["choices"][0]["message"]["content"] == want, "body %r",
                      r.body[:200])
                check(attempts_of(r) == n, "X-Dsgate-Attempts %s, fake calls %d",
                      attempts_of(r), n)
        except AssertionError as e:
            bad.append("%s %d: %s" % ("stream" if stream else "json", i, e))
    note("hold mode: 24 requests in %.2fs; fake calls per request %r; fake held_total %s, "
         "hold_closed %s, max_inflight %s", dt, calls, st.get("held_total"),
         st.get("hold_closed"), st.get("max_inflight"))
    check(not bad, "%d of 24 failed: %s", len(bad), " | ".join(bad[:4]))
    check(st.get("hold_closed", 0) > 0, "the fake cut no held request (stats %r): the test "
          "did not exercise the retry", st)
    acc = wait_access(d, 24)
    check(sum(a["attempts"] for a in acc) == st["requests"],
          "sum of access-log attempts %d != fake requests %d",
          sum(a["attempts"] for a in acc), st["requests"])
    check(all(a["status"] == 200 for a in acc), "access statuses %r",
          sorted({a["status"] for a in acc}))
    healthy(d)


# ---------------------------------------------------------------- runner

def metric_value(port, name, **labels):
    r = H.request(port, "GET", "/metrics", timeout=5.0)
    for ln in r.body.decode().splitlines():
        if ln.startswith("#") or not ln.startswith(name):
            continue
        head, _, value = ln.rpartition(" ")
        got = dict(kv.split("=", 1) for kv in head[len(name):].strip("{}").split(",") if kv)
        if head.split("{")[0] == name and {k: v.strip('"') for k, v in got.items()} == labels:
            return float(value)
    return None


def t_hold_priority_and_limit():
    """fake --hold --capacity 4 --latency-ms 250, dsgate max_inflight 64,
    adaptive: 60 low requests flood it (the fake holds most of them), then 6
    high ones: the highs overtake (held lows are taken back into dsgate's
    queue), every request completes whole, and the limit has learnt to
    stay far below 64."""
    f = fake("--hold", "--capacity", "4", "--latency-ms", "250", "--hold-keepalive-ms", "100",
             name="holdprio")
    d = dsgate(f.url, "holdprio", attempts=4, base="50ms", cap="500ms", max_inflight=64,
               adaptive=True, max_wait="60s")
    t0 = time.monotonic()
    lows = [Pending(d.port, chat_body("low %d" % i), {"X-Priority": "low"}, timeout=40.0)
            for i in range(60)]
    check(H.wait_until(lambda: f.stats().get("held", 0) >= 20, 5.0),
          "the fake never held the lows: %r", f.stats())
    t_high = time.monotonic()
    highs = [Pending(d.port, chat_body("high %d" % i), {"X-Priority": "high"}, timeout=40.0)
             for i in range(6)]
    for p in highs + lows:
        r = p.wait(45.0)
        # after keepalive.after (2 s) the body starts with dsgate's blank keep-alive lines
        check(r.status == 200 and r.json().get("object") == "chat.completion", "status %s %r",
              r.status, r.body[:120])
    high_done = sorted(p.t_end - t_high for p in highs)
    late_lows = sorted(p.t_end - t_high for p in lows if p.t_end > t_high)
    note("hold priority: highs done after %s s; %d lows still running at the highs' send, "
         "their median %.2f s; total %.2f s", ["%.2f" % x for x in high_done], len(late_lows),
         late_lows[len(late_lows) // 2] if late_lows else -1, time.monotonic() - t0)
    check(late_lows, "every low had finished before the highs were sent")
    med_high = high_done[len(high_done) // 2]
    med_low = late_lows[len(late_lows) // 2]
    check(med_high < 0.5 * med_low, "highs did not overtake: median %.2f s vs lows %.2f s",
          med_high, med_low)
    limit = metric_value(d.port, "dsgate_concurrency_limit", upstream="up")
    shed = metric_value(d.port, "dsgate_upstream_attempts_total", upstream="up", outcome="shed")
    note("limit after the flood %s, shed attempts %s", limit, shed)
    check(limit is not None and limit < 32, "the limit did not learn the hold: %s", limit)
    acc = wait_access(d, 66)
    check(all(a["status"] == 200 for a in acc), "statuses %r", sorted({a["status"] for a in acc}))
    healthy(d)


def t_hold_limit_recovers():
    """After a hold flood cut the limit, capacity comes back (POST /_config):
    the limit grows again with the successes."""
    f = fake("--hold", "--capacity", "2", "--latency-ms", "100", "--hold-keepalive-ms", "50",
             name="holdrec")
    d = dsgate(f.url, "holdrec", attempts=4, base="50ms", cap="300ms", max_inflight=40,
               adaptive=True, max_wait="60s")
    ps = [Pending(d.port, chat_body("flood %d" % i), timeout=40.0) for i in range(40)]
    for p in ps:
        check(p.wait(45.0).status == 200, "flood request failed")
    low = metric_value(d.port, "dsgate_concurrency_limit", upstream="up")
    check(low is not None and low < 40, "no cut to recover from: %s", low)
    H.request(f.port, "POST", "/_config", body=json.dumps({"capacity": 0, "latency_ms": 20}),
              timeout=5.0)

    def burst():
        qs = [Pending(d.port, chat_body("after %d %f" % (i, time.monotonic())), timeout=20.0)
              for i in range(30)]
        for q in qs:
            check(q.wait(25.0).status == 200, "request after recovery failed")
    deadline = time.monotonic() + 20.0
    high = low
    while time.monotonic() < deadline and high < low + 5:
        burst()
        high = metric_value(d.port, "dsgate_concurrency_limit", upstream="up")
    note("limit %s after the flood, %s once capacity came back", low, high)
    check(high >= low + 5, "the limit did not grow back: %s -> %s", low, high)
    healthy(d)


def t_max_wait_by_class():
    """queue.max_wait_by_class: high gives up after 300 ms, low waits on."""
    f = fake(name="classwait")
    port = H.free_port()
    text = config(port, [("up", f.url)], max_inflight=1, max_wait="20s").replace(
        "  max_wait: 20s\n", "  max_wait: 20s\n  max_wait_by_class: {high: 300ms}\n")
    d = H.Dsgate(config_text=text + "keepalive: {after: 0s}\n", tag="dsbusy-classwait",
                 port=port)
    STARTED.append(d)
    DSGATES.append(d)
    hold = Pending(port, chat_body("hold"), {"X-Fake-Delay-Ms": "1500"})
    check(H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0), "slot not taken")
    low = Pending(port, chat_body("low"), {"X-Priority": "low"})
    t0 = time.monotonic()
    r = H.request(port, "POST", CHAT, headers={"X-Priority": "high"}, body=chat_body("high"))
    dt = time.monotonic() - t0
    check(r.status == 504, "high: %s %r", r.status, r.body[:200])
    check(0.2 <= dt < 1.2, "high answered after %.2f s, want about 300 ms", dt)
    check(low.wait(10.0).status == 200, "low did not wait for its slot")
    check(hold.wait(10.0).status == 200, "held request failed")
    healthy(d)


TESTS = [
    ("stream_held_closed_retried", t_stream_held_closed_retried),
    ("stream_cut_midline_retried", t_stream_cut_midline_retried),
    ("stream_held_closed_failover", t_stream_held_closed_failover),
    ("json_held_closed_retried", t_json_held_closed_retried),
    ("late_429_sse_error_event", t_late_429_error_event),
    ("sole_upstream_never_stalls", t_sole_upstream_never_stalls),
    ("reset_reused_one_attempt_one_call", t_reset_reused_counted),
    ("unreachable_sole_fast_503", t_unreachable_sole_fast_503),
    ("unreachable_queued_fast_503", t_unreachable_queued_fast_503),
    ("hold_mode_end_to_end", t_hold_mode_end_to_end),
    ("hold_priority_high_overtakes_and_limit_learns", t_hold_priority_and_limit),
    ("hold_limit_recovers", t_hold_limit_recovers),
    ("max_wait_by_class", t_max_wait_by_class),
]


after_each = H.sanitizer_after_each(DSGATES)


def main():
    return H.main("test_deepseek_busy", TESTS, started=STARTED, after_each=after_each,
                  require=[(H.DSGATE, "build/asan/dsgate"),
                           (H.FAKE, "build/fake_upstream")])


if __name__ == "__main__":
    sys.exit(main())
