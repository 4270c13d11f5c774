#!/usr/bin/env python3
"""
test_hedge: hedged requests (`upstreams[].timeouts.hedge_after`) through the
real daemon on real sockets.

When an attempt on an upstream with hedge_after has produced no data byte
that long, dsgate starts the same request on the next eligible upstream as
well; the first attempt to produce a data byte wins and the other one is
cancelled at once (its upstream sees the client leave).  Checked here:

  * hedge wins (A slow, B fast): the answer comes from B well before A
    would answer (non-stream and stream); the access log says upstream b,
    attempts 2; A's fake sees the client leave right after the answer;
    dsgate_hedges_total{upstream="b",outcome="won"};
  * hedge loses (A answers at 0.6 s, B at 3 s): A's answer, B cancelled,
    outcome "lost";
  * A sends its SSE head and keep-alive comments but no data, B streams:
    ONE clean stream (A's head, maybe A's comments, then exactly B's
    events and [DONE], no error event, every line whole); A's connection
    is closed by dsgate;
  * the hedge fails (B answers 503): A's slow answer is still delivered,
    outcome "cancelled";
  * the original fails while the hedge runs (A resets its connection):
    the hedge takes over (no retry, no error), A counts in attempts;
    also when B's head came before A failed and its data after;
  * coalescing: 3 identical concurrent requests follow whichever attempt
    wins (non-stream and stream); A saw 1 call (cancelled), B saw 1;
  * the client leaves during the race: both upstream calls cancelled;
  * hedge_after 0 (and unset): no hedge;
  * coalescing when the leader's client leaves during the race: its
    follower is still served by that race, and the answer is cached;
  * a retry after the hedge took over and then failed moves on to an
    untried upstream, within retry.max_attempts.

Each test starts the fakes and the dsgate it needs and stops them after;
every wait has a deadline; each test checks dsgate is alive and its log has
no sanitizer report.  About 25 s.  `test_hedge.py NAME...` runs only those.
"""

import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import CHAT, chat_body, check, note                # noqa: E402
from harness import log_for, scrape, wait_access                # noqa: E402

STARTED = []        # fakes, scripted upstreams and dsgates of the running test
DSGATES = []        # the dsgates of the running test (logs scanned after it)


def tid():
    return H.test_id("hedge-")


# ---------------------------------------------------------------- processes

def fake(*args, name="hedge"):
    return H.start_fake(STARTED, *args, name=name)


def scripted(script):
    return H.start_scripted(STARTED, script)


def config(port, ups, attempts=3, cache=False, keepalive_after="0s", first_data="30s"):
    """dsgate YAML; UPS: [(name, url, hedge_after or None)] in failover order."""
    lines = [
        "# written by tests/integration/test_hedge.py",
        "listen: 127.0.0.1:%d" % port,
        "routing: failover",
        "upstreams:",
    ]
    for name, url, hedge in ups:
        lines += H.upstream_yaml(name, url, first_data=first_data, extra_timeouts=(
            "" if hedge is None else ", hedge_after: %s" % hedge))
    lines += [
        "queue:",
        "  max_queued: 1000",
        "  max_wait: 20s",
        "retry:",
        "  max_attempts: %d" % attempts,
        "  base: 20ms",
        "  cap: 200ms",
        "  budget: 0.5",
        "cache:",
        "  enabled: %s" % ("true" if cache else "false"),
        "keepalive: {after: %s, every: 1s}" % keepalive_after,
        "shutdown_timeout: 3s",
        "log: {level: info, format: json}",
    ]
    return "\n".join(lines) + "\n"


def dsgate(ups, tag, **cfg):
    return H.start_dsgate(lambda port: config(port, ups, **cfg), "hedge-" + tag,
                          STARTED, DSGATES)


healthy = H.check_healthy


def hedges(d):
    """{(upstream, outcome): count} of dsgate_hedges_total (zeros left out)."""
    out = {}
    for n, ls, v in scrape(d.port):
        if n == "dsgate_hedges_total" and v:
            k = (ls.get("upstream"), ls.get("outcome"))
            out[k] = out.get(k, 0) + int(v)
    return out


def expect_hedges(d, want, timeout=2.0):
    """dsgate_hedges_total is exactly WANT ({(upstream, outcome): n}), within TIMEOUT s."""
    got = H.wait_until(lambda: hedges(d) == want, timeout, 0.05)
    check(got, "dsgate_hedges_total %r, want %r", hedges(d), want)


def wait_closed(f, test_id, timeout=2.0):
    """The fake's /_log entry for TEST_ID once client_closed is true (or the last seen)."""
    e = f.find(test_id, timeout=timeout, pred=lambda e: e.get("client_closed"))
    if e:
        return e
    es = log_for(f, test_id)
    check(False, "fake %s: no client_closed entry for %s within %.1fs (entries %r)", f.name,
          test_id, timeout, es)


def post(port, body, headers, timeout=15.0):
    hs = list(headers.items()) + [("Content-Type", "application/json")]
    t0 = time.monotonic()
    r = H.request(port, "POST", CHAT, headers=hs, body=body, timeout=timeout)
    r.t_sent = t0
    return r


def stream(port, body, headers, timeout=15.0):
    st = H.sse_request(port, body, headers=headers, timeout=timeout)
    check(st.error is None, "stream transport error: %s (raw %r)", st.error, st.raw[:300])
    check(st.resp is not None and st.resp.status == 200, "stream status %s",
          st.resp and st.resp.status)
    return st


def content_of(r):
    return r.json()["choices"][0]["message"]["content"]


def clean_stream(st, want):
    """ST is one clean SSE stream whose content is WANT: every line whole
    (a data line, a comment, or the blank line between events), no error
    event, [DONE] last.  Returns the data events."""
    text = st.raw.decode("utf-8", "replace")
    for ln in text.split("\n"):
        check(ln == "" or ln.startswith("data: ") or ln.startswith(":"),
              "a line that is neither data, a comment nor blank: %r (raw %r)", ln, st.raw[:600])
    for ln in text.split("\n"):
        if ln.startswith("data: ") and ln != "data: [DONE]":
            try:
                json.loads(ln[6:])
            except ValueError:
                check(False, "a data line is not whole JSON: %r", ln)
    errs = [e for e in st.events if H.is_error_event(e)]
    check(not errs, "error event(s) in the stream: %r", errs[:2])
    data = [e["data"] for e in st.events if e["data"] is not None]
    check(data and data[-1] == "[DONE]", "the stream does not end with [DONE]: %r", data[-2:])
    check(data.count("[DONE]") == 1, "%d [DONE] events", data.count("[DONE]"))
    check(st.joined("content") == want, "content %r, want %r", st.joined("content"), want)
    return data


def normalized(chunks):
    """Stream chunks without what differs between two calls of the same fake."""
    out = []
    for c in chunks:
        c = dict(c)
        c.pop("id", None)
        c.pop("created", None)
        out.append(c)
    return out


# ---------------------------------------------------------------- scripted answers

SSE_HEAD = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
            ("X-Scripted", "a")]
KA = b": keep-alive\n\n"


def sse_chunk(cid, delta, finish=None):
    return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": 1,
                       "model": "deepseek-chat", "system_fingerprint": "fp_s",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def keepalives_only(every_ms=100, total_ms=5000):
    """A's answer: the 200 SSE head at once, a keep-alive comment every
    EVERY_MS for TOTAL_MS, then (never reached if dsgate cancels it) a
    data event and [DONE]."""
    body = [(every_ms, KA) for _ in range(total_ms // every_ms)]
    body.append((0, ("data: %s\n\n" % sse_chunk("late-a", {"content": "A-LATE"})).encode()))
    body.append((0, b"data: [DONE]\n\n"))
    return {"status": 200, "headers": SSE_HEAD, "body": body, "framing": "chunked"}


# ---------------------------------------------------------------- tests

def _hedge_wins(d, a, b, sse, n):
    t = tid()
    prompt = "hedge wins %s %s" % ("stream" if sse else "json", t)
    hs = {"X-Test-Id": t}
    if sse:
        st = stream(d.port, chat_body(prompt, stream=True), hs)
        dt = st.t_end - st.t_sent
        t_sent, t_end = st.t_sent, st.t_end
        clean_stream(st, "echo: " + prompt)
        resp = st.resp
    else:
        resp = post(d.port, chat_body(prompt), hs)
        check(resp.status == 200 and resp.complete, "status %s complete %s body %r",
              resp.status, resp.complete, resp.body[:300])
        check(content_of(resp) == "echo: " + prompt, "content %r", content_of(resp))
        dt = resp.t_end - resp.t_sent
        t_sent, t_end = resp.t_sent, resp.t_end
    note("hedge wins %s: answer in %.3f s, X-Dsgate-Upstream %r", "stream" if sse else "json",
         dt, resp.header("x-dsgate-upstream"))
    check(dt < 1.5, "the answer took %.3f s (A answers at 3 s; B at once after 0.3 s)", dt)
    check(dt >= 0.25, "the answer took only %.3f s: before hedge_after (300 ms)?", dt)
    check(resp.header("x-dsgate-upstream") in (None, "b"), "X-Dsgate-Upstream %r",
          resp.header("x-dsgate-upstream"))
    acc = wait_access(d, n)[n - 1]
    check(acc["upstream"] == "b" and acc["attempts"] == 2 and acc["status"] == 200,
          "access log %r (want upstream b, attempts 2, status 200)", acc)
    check(acc["end"] == "completed", "access log end %r", acc["end"])
    ea = wait_closed(a, t)
    tc = ea["t_closed_ms"]
    check(tc is not None and tc <= t_end * 1000.0 + 500,
          "A noticed the close at %s ms, the answer ended at %.0f ms (want within 0.5 s)",
          tc, t_end * 1000.0)
    check(tc >= t_sent * 1000.0 + 250, "A was closed at +%.0f ms: before hedge_after",
          tc - t_sent * 1000.0)
    eb = log_for(b, t)
    check(len(eb) == 1 and not eb[0]["client_closed"] and eb[0]["status"] == 200,
          "B's log %r", eb)
    check(len(log_for(a, t)) == 1, "A saw %d calls", len(log_for(a, t)))


def t_hedge_wins():
    """A slow (3 s), B fast, hedge_after 300ms on A: the answer is B's,
    well before 1.5 s; A is cancelled; outcome won (non-stream, then stream)."""
    a = fake("--latency-ms", "3000", name="a")
    b = fake(name="b")
    d = dsgate([("a", a.url, "300ms"), ("b", b.url, None)], "wins")
    _hedge_wins(d, a, b, False, 1)
    expect_hedges(d, {("b", "won"): 1})
    _hedge_wins(d, a, b, True, 2)
    expect_hedges(d, {("b", "won"): 2})
    healthy(d)


def t_hedge_loses():
    """A answers at 600 ms, B at 3 s, hedge_after 200ms: A's answer at
    ~0.6 s, B's call cancelled, outcome lost (non-stream, then stream)."""
    a = fake("--latency-ms", "600", name="a")
    b = fake("--latency-ms", "3000", name="b")
    d = dsgate([("a", a.url, "200ms"), ("b", b.url, None)], "loses")
    for n, sse in ((1, False), (2, True)):
        t = tid()
        prompt = "hedge loses %s %s" % (sse, t)
        hs = {"X-Test-Id": t}
        if sse:
            st = stream(d.port, chat_body(prompt, stream=True), hs)
            clean_stream(st, "echo: " + prompt)
            dt, t_end = st.t_end - st.t_sent, st.t_end
        else:
            r = post(d.port, chat_body(prompt), hs)
            check(r.status == 200 and content_of(r) == "echo: " + prompt, "answer %r", r)
            dt, t_end = r.t_end - r.t_sent, r.t_end
        note("hedge loses %s: answer in %.3f s", "stream" if sse else "json", dt)
        check(0.5 <= dt < 1.3, "the answer took %.3f s (A answers at 0.6 s)", dt)
        acc = wait_access(d, n)[n - 1]
        check(acc["upstream"] == "a" and acc["attempts"] == 2 and acc["status"] == 200,
              "access log %r (want upstream a, attempts 2)", acc)
        eb = wait_closed(b, t)
        check(eb["t_closed_ms"] <= t_end * 1000.0 + 500,
              "B noticed the close %.0f ms after the answer ended",
              eb["t_closed_ms"] - t_end * 1000.0)
        ea = log_for(a, t)
        check(len(ea) == 1 and not ea[0]["client_closed"], "A's log %r", ea)
        expect_hedges(d, {("b", "lost"): n})
    healthy(d)


def t_keepalives_then_hedge():
    """A sends its 200 SSE head and keep-alive comments (no data for 5 s),
    hedge_after 300ms, B streams: one clean stream, A's head, then exactly
    B's events; A's connection closed by dsgate."""
    a = scripted(keepalives_only())
    b = fake(name="b")
    d = dsgate([("a", a.url, "300ms"), ("b", b.url, None)], "keepalives")
    t = tid()
    prompt = "keepalives then hedge " + t
    hs = {"X-Test-Id": t, "X-Fake-Events": "6"}
    st = stream(d.port, chat_body(prompt, stream=True), hs)
    dt = st.t_end - st.t_sent
    note("keep-alives then hedge: %.3f s, %d comment blocks, head X-Scripted %r, "
         "X-Dsgate-Upstream %r", dt, st.comments, st.resp.header("x-scripted"),
         st.resp.header("x-dsgate-upstream"))
    check(dt < 1.5, "the stream took %.3f s", dt)
    check(st.resp.header("x-scripted") == "a", "the head is not A's (X-Scripted %r)",
          st.resp.header("x-scripted"))
    check("A-LATE" not in st.raw.decode("utf-8", "replace"), "A's late data reached the client")
    clean_stream(st, "echo: " + prompt)
    # exactly B's events: the same request straight to B
    direct = H.sse_request(b.port, chat_body(prompt, stream=True),
                           headers={"X-Test-Id": t + "-direct", "X-Fake-Events": "6"})
    check(direct.error is None, "direct stream: %s", direct.error)
    check(normalized(st.chunks()) == normalized(direct.chunks()),
          "the events differ from B's own stream: %r vs %r", st.chunks()[:3],
          direct.chunks()[:3])
    check(len(st.data_events()) == len(direct.data_events()), "%d data events, B sends %d",
          len(st.data_events()), len(direct.data_events()))
    check(a.wait_requests(1, 1.0) and len(a.requests) == 1, "A saw %d calls", len(a.requests))
    ra = a.requests[0]
    check(H.wait_until(lambda: ra.client_closed, 1.0), "dsgate did not close A's connection")
    note("A closed %.0f ms after the stream ended", (ra.t_client_closed - st.t_end) * 1000.0)
    check(ra.t_client_closed <= st.t_end + 0.5, "A closed %.3f s after the stream ended",
          ra.t_client_closed - st.t_end)
    acc = wait_access(d, 1)[0]
    check(acc["upstream"] == "b" and acc["attempts"] == 2 and acc["status"] == 200,
          "access log %r", acc)
    expect_hedges(d, {("b", "won"): 1})
    healthy(d)


def t_hedge_fails():
    """B answers 503 at once: the hedge is dropped, A's slow (1.5 s) answer
    is still delivered 200; outcome cancelled."""
    a = fake("--latency-ms", "1500", name="a")
    b = fake("--status", "503", name="b")
    d = dsgate([("a", a.url, "300ms"), ("b", b.url, None)], "fails")
    t = tid()
    prompt = "hedge fails " + t
    r = post(d.port, chat_body(prompt), {"X-Test-Id": t})
    dt = r.t_end - r.t_sent
    note("hedge fails: %s in %.3f s", r.status, dt)
    check(r.status == 200 and r.complete, "status %s body %r", r.status, r.body[:300])
    check(content_of(r) == "echo: " + prompt, "content %r", content_of(r))
    check(1.4 <= dt < 3.0, "the answer took %.3f s (A answers at 1.5 s)", dt)
    eb = log_for(b, t)
    check(len(eb) == 1 and eb[0]["status"] == 503, "B's log %r", eb)
    ea = log_for(a, t)
    check(len(ea) == 1 and not ea[0]["client_closed"], "A's log %r", ea)
    acc = wait_access(d, 1)[0]
    check(acc["upstream"] == "a" and acc["status"] == 200 and acc["attempts"] == 2,
          "access log %r (want upstream a, status 200, attempts 2)", acc)
    expect_hedges(d, {("b", "cancelled"): 1})
    healthy(d)


def _original_fails(d, a, b, sse, n, head_first):
    t = tid()
    prompt = "original fails %s %s %s" % (sse, head_first, t)
    hs = {"X-Test-Id": t}
    if head_first:
        hs["X-Fake-First-Token-Ms"] = "1500"     # B's head at once, its data at 1.5 s
    if sse:
        st = stream(d.port, chat_body(prompt, stream=True), hs)
        clean_stream(st, "echo: " + prompt)
        dt, resp = st.t_end - st.t_sent, st.resp
    else:
        resp = post(d.port, chat_body(prompt), hs)
        check(resp.status == 200 and resp.complete, "status %s complete %s body %r",
              resp.status, resp.complete, resp.body[:300])
        check(content_of(resp) == "echo: " + prompt, "content %r", content_of(resp))
        dt = resp.t_end - resp.t_sent
    note("original fails (%s, B's head %s): 200 in %.3f s", "stream" if sse else "json",
         "first" if head_first else "with its data", dt)
    check(1.6 <= dt < 3.0, "the answer took %.3f s (B answers 1.5 s after the hedge at 0.3 s)",
          dt)
    acc = wait_access(d, n)[n - 1]
    check(acc["upstream"] == "b" and acc["attempts"] == 2 and acc["status"] == 200
          and acc["end"] == "completed", "access log %r (want upstream b, attempts 2)", acc)
    eb = log_for(b, t)
    check(len(eb) == 1 and not eb[0]["client_closed"] and eb[0]["status"] == 200,
          "B's log %r", eb)


def t_original_fails():
    """A resets its connection at 800 ms, B answers at 1.5 s, hedge_after
    300ms: the hedge takes over; the client gets B's 200 (non-stream,
    stream, and stream with B's head before A failed); A counts in attempts."""
    a = scripted({"action": "reset", "at": "start", "delay_ms": 800})
    b = fake("--latency-ms", "1500", name="b")
    d = dsgate([("a", a.url, "300ms"), ("b", b.url, None)], "original-fails")
    cases = [(False, False), (True, False), (True, True), (False, True)]
    for n, (sse, head_first) in enumerate(cases, 1):
        if head_first:
            # B's head goes at once, its data 1.5 s later: --latency-ms is
            # added to X-Fake-First-Token-Ms, so turn it off for these
            r = H.request(b.port, "POST", "/_config", body={"latency_ms": 0}, timeout=5.0)
            check(r.status == 200, "/_config: %s", r.status)
        _original_fails(d, a, b, sse, n, head_first)
        check(len(a.requests) == n, "A saw %d calls, want %d (a retry on A?)", len(a.requests), n)
        expect_hedges(d, {("b", "won"): n})
    healthy(d)


def _coalesce(d, a, b, sse):
    t = tid()
    prompt = "coalesce %s %s" % (sse, t)
    body = chat_body(prompt, stream=sse)
    hs = [("X-Test-Id", t), ("Content-Type", "application/json"), ("Connection", "close")]
    if sse:
        hs.append(("Accept", "text/event-stream"))
    n = 3
    barrier = threading.Barrier(n)
    res = [None] * n

    def one(i):
        c = H.Conn(d.port, timeout=10.0)
        try:
            data = H.build_request("POST", CHAT, hs, body, port=d.port)
            try:
                barrier.wait(5)
            except threading.BrokenBarrierError:
                pass
            t0 = time.monotonic()
            c.send(data)
            r = c.read_response(10.0)
            r.t_sent = t0
            res[i] = r
        except Exception as e:                  # noqa: BLE001
            res[i] = e
        finally:
            c.close()
    ths = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(15.0)
    bad = [r for r in res if not isinstance(r, H.Response)]
    check(not bad, "requests failed: %r", bad)
    note("coalesce %s: %s", "stream" if sse else "json",
         ", ".join("%d in %.3f s%s" % (r.status, r.t_end - r.t_sent,
                                       " (coalesced)" if r.header("x-dsgate-coalesced") else "")
                   for r in res))
    check(all(r.status == 200 and r.complete for r in res), "statuses %r",
          [(r.status, r.complete, r.body[:200]) for r in res])
    slow = [r.t_end - r.t_sent for r in res if r.t_end - r.t_sent >= 1.5]
    check(not slow, "answers took %r s (B answers after 0.3 s)", slow)
    bodies = {r.body for r in res}
    check(len(bodies) == 1, "%d different bodies: %r", len(bodies), [x[:200] for x in bodies])
    body0 = bodies.pop()
    if sse:
        st = H.Stream()
        st.raw = body0
        st.events = H.parse_sse(body0)
        clean_stream(st, "echo: " + prompt)
    else:
        check(json.loads(body0)["choices"][0]["message"]["content"] == "echo: " + prompt,
              "content %r", body0[:200])
    ea = log_for(a, t)
    eb = log_for(b, t)
    check(len(eb) == 1 and eb[0]["status"] == 200, "B saw %r", eb)
    check(len(ea) == 1, "A saw %d calls: %r", len(ea), ea)
    check(wait_closed(a, t), "A's call not cancelled")


def t_coalescing():
    """cache on, 3 identical concurrent requests, A slow, B fast: all 3 get
    the same whole answer in well under 1.5 s (non-stream, then stream);
    A saw 1 call (cancelled), B saw 1."""
    a = fake("--latency-ms", "3000", name="a")
    b = fake(name="b")
    d = dsgate([("a", a.url, "300ms"), ("b", b.url, None)], "coalesce", cache=True)
    _coalesce(d, a, b, False)
    expect_hedges(d, {("b", "won"): 1})
    _coalesce(d, a, b, True)
    expect_hedges(d, {("b", "won"): 2})
    healthy(d)


def t_client_leaves():
    """The client leaves while A and B race: both upstream calls are
    cancelled at once; access log end client_closed_*; outcome cancelled."""
    a = fake("--latency-ms", "5000", name="a")
    b = fake("--latency-ms", "5000", name="b")
    d = dsgate([("a", a.url, "200ms"), ("b", b.url, None)], "client-leaves")
    for n, sse in ((1, False), (2, True)):
        t = tid()
        hs = [("X-Test-Id", t), ("Content-Type", "application/json")]
        if sse:
            hs.append(("Accept", "text/event-stream"))
        c = H.Conn(d.port, timeout=5.0)
        c.send(H.build_request("POST", CHAT, hs, chat_body("leaves %s %s" % (sse, t), sse),
                               port=d.port))
        check(b.find(t, timeout=2.0), "the hedge did not reach B within 2 s")
        check(a.find(t, timeout=0.5), "A has no entry")
        t_close = H.now_ms()
        c.close()
        ea = wait_closed(a, t, 2.0)
        eb = wait_closed(b, t, 2.0)
        note("client leaves (%s): A closed %+.0f ms, B closed %+.0f ms",
             "stream" if sse else "json", ea["t_closed_ms"] - t_close,
             eb["t_closed_ms"] - t_close)
        check(ea["t_closed_ms"] - t_close < 1000, "A closed %.0f ms after the client left",
              ea["t_closed_ms"] - t_close)
        check(eb["t_closed_ms"] - t_close < 1000, "B closed %.0f ms after the client left",
              eb["t_closed_ms"] - t_close)
        acc = wait_access(d, n)[n - 1]
        check(acc["end"].startswith("client_closed"), "access log end %r (%r)", acc["end"], acc)
        check(acc["attempts"] == 2, "access log attempts %r", acc)
        expect_hedges(d, {("b", "cancelled"): n})
        healthy(d)
    # and it still serves (both fakes are slow: the hedge does not help here)
    r = H.request(d.port, "GET", "/healthz", timeout=3.0)
    check(r.status == 200, "/healthz %s", r.status)
    healthy(d)


def t_hedge_off():
    """hedge_after 0s (and unset): A slow (1.2 s), B fast: no hedge, B sees
    no call, A's answer, attempts 1, no dsgate_hedges_total."""
    for hedge in ("0s", None):
        a = fake("--latency-ms", "1200", name="a")
        b = fake(name="b")
        d = dsgate([("a", a.url, hedge), ("b", b.url, None)], "off")
        t = tid()
        prompt = "hedge off %s %s" % (hedge, t)
        r = post(d.port, chat_body(prompt), {"X-Test-Id": t})
        dt = r.t_end - r.t_sent
        check(r.status == 200 and content_of(r) == "echo: " + prompt, "answer %r", r)
        check(dt >= 1.1, "the answer took %.3f s (A answers at 1.2 s)", dt)
        check(b.stats()["requests"] == 0, "hedge_after %s: B saw %d calls", hedge,
              b.stats()["requests"])
        acc = wait_access(d, 1)[0]
        check(acc["upstream"] == "a" and acc["attempts"] == 1, "access log %r", acc)
        expect_hedges(d, {})
        healthy(d)


def _leader_leaves(hedge):
    """HEDGE: A slow (3 s), B 1 s, hedge_after 300ms on A (B wins at
    ~1.3 s); else no hedging, A alone answers at 1.3 s (the control)."""
    if hedge:
        a = fake("--latency-ms", "3000", name="a")
        b = fake("--latency-ms", "1000", name="b")
        d = dsgate([("a", a.url, "300ms"), ("b", b.url, None)], "leader-leaves", cache=True)
    else:
        a = fake("--latency-ms", "1300", name="a")
        b = None
        d = dsgate([("a", a.url, None)], "leader-leaves-control", cache=True)
    what = "hedged" if hedge else "control"
    t = tid()
    prompt = "leader leaves %s %s" % (what, t)
    body = chat_body(prompt)
    hs = [("X-Test-Id", t), ("Content-Type", "application/json"), ("Connection", "close")]
    t0 = time.monotonic()
    lead = H.Conn(d.port, timeout=5.0)
    lead.send(H.build_request("POST", CHAT, hs, body, port=d.port))
    check(a.find(t, timeout=2.0), "%s: the leader did not reach A", what)
    res = {}

    def follow():
        try:
            res["r"] = H.request(d.port, "POST", CHAT, headers=hs, body=body, timeout=10.0)
        except Exception as e:                  # noqa: BLE001
            res["r"] = e
        res["t"] = time.monotonic()
    th = threading.Thread(target=follow, daemon=True)
    th.start()
    if hedge:
        check(b.find(t, timeout=2.0), "the hedge did not reach B within 2 s")
    else:
        time.sleep(0.4)                         # the follower has joined the flight
    lead.close()                                # the leader's client leaves (during the race)
    th.join(10.0)
    r = res.get("r")
    check(isinstance(r, H.Response), "%s: the follower got no answer: %r", what, r)
    dt = res["t"] - t0
    ea, eb = log_for(a, t), (log_for(b, t) if b else [])
    acc = wait_access(d, 2)
    note("leader leaves (%s): follower %s in %.3f s, X-Dsgate-Coalesced %r; A calls %d, B calls "
         "%d; access [(id, status, upstream, attempts, end)] %s", what, r.status, dt,
         r.header("x-dsgate-coalesced"), len(ea), len(eb),
         [(x["id"], x["status"], x["upstream"], x["attempts"], x["end"]) for x in acc])
    check(r.status == 200 and content_of(r) == "echo: " + prompt, "%s: follower %r", what, r)
    check(len(ea) == 1 and len(eb) == (1 if hedge else 0) and dt < 2.0
          and r.header("x-dsgate-coalesced") == "1",
          "%s: the follower was not served by the flight its leader ran: answer after %.3f s, "
          "X-Dsgate-Coalesced %r, A saw %d calls, B saw %d calls; access log %r",
          what, dt, r.header("x-dsgate-coalesced"), len(ea), len(eb), acc)
    lead_acc = [x for x in acc if x["end"] != "coalesced"]
    check(all(x["status"] == 200 for x in lead_acc), "%s: the leader's access log status: %r",
          what, lead_acc)
    r3 = post(d.port, body, {"X-Test-Id": t})
    check(r3.status == 200 and r3.header("x-cache") == "HIT",
          "%s: afterwards %s X-Cache %r (the answer was not cached)", what, r3.status,
          r3.header("x-cache"))
    healthy(d)


def t_leader_leaves_hedge_wins():
    """Coalescing: the leader's client leaves while A and B race (its
    follower still waits), then B wins: the follower gets B's answer from
    that one race (coalesced, at ~1.3 s), A and B saw one call each, the
    leader's access status is 200 and the answer is cached -- as in the
    control run without hedging (checked first)."""
    _leader_leaves(False)
    _leader_leaves(True)


def _retry_after_takeover(hedge):
    a = scripted({"action": "reset", "at": "start", "delay_ms": 800})
    b = fake("--latency-ms", "1500", "--status", "503", name="b")
    c = fake(name="c")
    d = dsgate([("a", a.url, "300ms" if hedge else None), ("b", b.url, None),
                ("c", c.url, None)], "retry-after-takeover", attempts=3)
    what = "hedged" if hedge else "control"
    t = tid()
    prompt = "retry after takeover %s %s" % (what, t)
    r = post(d.port, chat_body(prompt), {"X-Test-Id": t})
    dt = r.t_end - r.t_sent
    acc = wait_access(d, 1)[0]
    calls = (len(a.requests), len(log_for(b, t)), len(log_for(c, t)))
    note("retry after takeover (%s): %s in %.3f s, attempts %s (header %s), upstream %s; calls "
         "A %d B %d C %d; hedges %r", what, r.status, dt, acc["attempts"],
         r.header("x-dsgate-attempts"), acc["upstream"], calls[0], calls[1], calls[2], hedges(d))
    check(r.status == 200 and calls == (1, 1, 1) and acc["upstream"] == "c",
          "%s: want C's 200 after A (reset) and B (503): got %s %r after %.3f s; calls A %d B %d "
          "C %d; access log upstream %r attempts %r (retry.max_attempts 3)", what, r.status,
          r.body[:120], dt, calls[0], calls[1], calls[2], acc["upstream"], acc["attempts"])
    check(acc["attempts"] <= 3, "%s: access log attempts %d > retry.max_attempts 3", what,
          acc["attempts"])
    if hedge:
        expect_hedges(d, {("b", "won"): 1})
    healthy(d)


def t_retry_after_takeover():
    """A resets at 800 ms (hedge_after 300ms: its hedge B took over), then
    B answers 503; a third upstream C is fine, retry.max_attempts 3: the
    retry goes to C (not back to A, which already failed this request) and
    the client gets C's 200 -- as in the control run without hedging
    (checked first: A, B, C, 200, attempts 3)."""
    _retry_after_takeover(False)
    _retry_after_takeover(True)

# ---------------------------------------------------------------- runner

TESTS = [
    ("hedge_wins", t_hedge_wins),
    ("hedge_loses", t_hedge_loses),
    ("keepalives_then_hedge", t_keepalives_then_hedge),
    ("hedge_fails", t_hedge_fails),
    ("original_fails_hedge_takes_over", t_original_fails),
    ("coalescing_follows_winner", t_coalescing),
    ("client_leaves_during_race", t_client_leaves),
    ("hedge_off", t_hedge_off),
    ("leader_leaves_during_race", t_leader_leaves_hedge_wins),
    ("retry_after_takeover_moves_on", t_retry_after_takeover),
]


after_each = H.sanitizer_after_each(DSGATES)


def main():
    return H.main("test_hedge", TESTS, started=STARTED, after_each=after_each,
                  require=[(H.DSGATE, "build/asan/dsgate"),
                           (H.FAKE, "build/fake_upstream")])


if __name__ == "__main__":
    sys.exit(main())
