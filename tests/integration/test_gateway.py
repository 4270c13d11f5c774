#!/usr/bin/env python3
"""
test_gateway: the core gateway (issue 2) through the real daemon.

One fake upstream and one dsgate in front of it (api_key_env set to a canary
key), driven over real sockets: pass-through, byte-exact bodies, header
filtering, the upstream key, streaming (order, reassembly, incremental
arrival), client disconnect, slow-reader back-pressure, upstream errors and
resets, and at the end: still serving, the key never logged, clean SIGTERM.
"""

import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402

CANARY = "sk-dsgate-canary-" + uuid.uuid4().hex
KEY_ENV = "DSGATE_IT_API_KEY"

P = {}      # the pair: P["fake"], P["dsgate"]


def tid():
    return uuid.uuid4().hex[:12]


def chat_body(content="hello", model="deepseek-chat", stream=False):
    b = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return b


def port():
    return P["dsgate"].port


def fake():
    return P["fake"]


# ---------------------------------------------------------------- tests

def t_healthz():
    r = H.request(port(), "GET", "/healthz")
    check(r.status == 200, "status %s", r.status)


def t_readyz():
    r = H.request(port(), "GET", "/readyz")
    check(r.status == 200, "status %s body %r", r.status, r.body[:200])
    j = r.json()
    check(j.get("ready") is True, "ready is %r", j.get("ready"))
    ups = j.get("upstreams")
    check(isinstance(ups, list) and len(ups) == 1, "upstreams %r", ups)
    check(ups[0].get("name") == "fake", "upstream name %r", ups[0].get("name"))
    check(ups[0].get("state") in ("closed", "open", "half_open"), "state %r", ups[0].get("state"))
    check(CANARY not in r.body.decode("utf-8", "replace"), "key in /readyz")


def _normalise(j):
    """A chat.completion with the per-call fields (id, created) blanked."""
    j = dict(j)
    j.pop("id", None)
    j.pop("created", None)
    return j


def t_chat_nonstream():
    t = tid()
    r = H.request(port(), "POST", "/v1/chat/completions",
                  headers={"X-Test-Id": t}, body=chat_body("hello there"))
    check(r.status == 200, "status %s body %r", r.status, r.body[:200])
    ct = r.header("content-type") or ""
    check("application/json" in ct, "content-type %r", ct)
    j = r.json()
    check(j.get("object") == "chat.completion", "object %r", j.get("object"))
    msg = j["choices"][0]["message"]
    check(msg.get("content") == "echo: hello there", "content %r", msg.get("content"))
    check(j.get("model") == "deepseek-chat", "model %r", j.get("model"))
    check(isinstance(j.get("usage"), dict), "no usage")
    e = fake().find(t)
    check(e is not None, "request not in the fake's /_log")
    check(e["method"] == "POST" and e["path"] == "/v1/chat/completions",
          "fake saw %s %s", e["method"], e["path"])
    # The same request straight to the fake: identical but for id/created.
    d = H.request(fake().port, "POST", "/v1/chat/completions", body=chat_body("hello there"))
    check(d.status == 200, "direct status %s", d.status)
    check(_normalise(d.json()) == _normalise(j),
          "body differs from the fake's own answer:\n via %r\n direct %r", r.body[:400], d.body[:400])
    # Bytes, not just JSON: the fake's output with its id replaced.
    dj = d.json()
    expect = d.body.replace(dj["id"].encode(), j["id"].encode())
    if "created" in dj:
        expect = expect.replace(b'"created":%d' % dj["created"], b'"created":%d' % j["created"])
    check(expect == r.body, "body bytes differ from the fake's:\n via %r\n direct %r",
          r.body[:300], d.body[:300])


def t_response_headers_added():
    r = H.request(port(), "POST", "/v1/chat/completions", body=chat_body("hdr"))
    check(r.status == 200, "status %s", r.status)
    check(r.header("x-dsgate-upstream") == "fake", "X-Dsgate-Upstream %r", r.header("x-dsgate-upstream"))
    check(r.header("x-dsgate-attempts") == "1", "X-Dsgate-Attempts %r", r.header("x-dsgate-attempts"))
    q = r.header("x-dsgate-queue-ms")
    check(q is not None and q.isdigit(), "X-Dsgate-Queue-Ms %r", q)


def t_body_byte_exact():
    t = tid()
    body = ('{  "messages" :[ {"content":"caf\\u00e9 \xe2\x9c\x93 \\"q\\"",  "role":"user"}],\n'
            '\t"zeta" : 1.50e0 , "model":"deepseek-chat","alpha":null,"temperature":0.70}\r\n')
    raw = body.encode("latin-1")          # the \xe2\x9c\x93 above is UTF-8 already
    r = H.request(port(), "POST", "/v1/chat/completions",
                  headers={"X-Test-Id": t, "Content-Type": "application/json"}, body=raw)
    check(r.status == 200, "status %s body %r", r.status, r.body[:200])
    e = fake().find(t)
    check(e is not None, "not in /_log")
    got = e["body"].encode("utf-8")
    check(got == raw, "body changed on the way:\n sent %r\n got  %r", raw, got)


def t_chunked_request_body():
    t = tid()
    raw = b'{"model":"deepseek-chat",  "messages":[{"role":"user","content":"chunked body"}]}'
    chunked = b""
    for i in range(0, len(raw), 17):
        piece = raw[i:i + 17]
        chunked += b"%x\r\n%s\r\n" % (len(piece), piece)
    chunked += b"0\r\n\r\n"
    req = H.build_request("POST", "/v1/chat/completions",
                          [("X-Test-Id", t), ("Content-Type", "application/json"),
                           ("Transfer-Encoding", "chunked"), ("Connection", "close")],
                          port=port()) + chunked
    with H.Conn(port()) as c:
        c.send(req)
        r = c.read_response()
    check(r.status == 200, "status %s body %r", r.status, r.body[:200])
    check(r.json()["choices"][0]["message"]["content"] == "echo: chunked body", "content %r", r.body[:200])
    e = fake().find(t)
    check(e is not None and e["body"].encode() == raw, "fake got %r", e and e["body"])


def t_path_query():
    r = H.request(port(), "GET", "/v1/anything?x=1&y=2")
    check(r.status == 200, "status %s", r.status)
    j = r.json()
    check(j.get("path") == "/v1/anything", "path %r", j.get("path"))
    check(j.get("query") == "x=1&y=2", "query %r", j.get("query"))
    r = H.request(port(), "GET", "/v1/some/deeper/path?q=a%20b&empty=")
    j = r.json()
    check(j.get("path") == "/v1/some/deeper/path" and j.get("query") == "q=a%20b&empty=",
          "path %r query %r", j.get("path"), j.get("query"))


def t_chat_without_v1():
    t = tid()
    r = H.request(port(), "POST", "/chat/completions", headers={"X-Test-Id": t},
                  body=chat_body("no v1"))
    check(r.status == 200, "status %s", r.status)
    check(r.json()["choices"][0]["message"]["content"] == "echo: no v1", "body %r", r.body[:200])
    e = fake().find(t)
    check(e is not None and e["path"] == "/chat/completions", "fake path %r", e and e["path"])


def t_methods():
    for m in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        body = b'{"m":"%s"}' % m.encode() if m in ("POST", "PUT", "PATCH") else None
        hs = {"Content-Type": "application/json"} if body else {}
        r = H.request(port(), m, "/v1/echo-method", headers=hs, body=body)
        check(r.status == 200, "%s: status %s body %r", m, r.status, r.body[:200])
        j = r.json()
        check(j.get("method") == m, "%s: fake saw method %r", m, j.get("method"))
        if body:
            check(j.get("body") == body.decode(), "%s: fake saw body %r", m, j.get("body"))


HOP_REQ = [
    ("Connection", "keep-alive, X-Hop-Named"),
    ("X-Hop-Named", "named-by-connection"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Some-Trailer"),
    ("Upgrade", "h2c"),
    ("X-Priority", "low"),
    ("X-Custom", "custom-value"),
    ("X-Another", "a, b;c=d"),
    ("User-Agent", "dsgate-it/1"),
]


def t_hop_by_hop_request():
    with H.Conn(port()) as c:
        c.send(H.build_request("GET", "/v1/headers", HOP_REQ, port=port()))
        r = c.read_response()
    check(r.status == 200, "status %s body %r", r.status, r.body[:200])
    seen = {k.lower(): v for k, v in r.json().get("headers", {}).items()}
    bad = []
    for name, val in HOP_REQ[:8]:
        v = seen.get(name.lower())
        if v is not None and (v == val or "x-hop-named" in v.lower()):
            bad.append("%s: %s" % (name, v))
    if "x-hop-named" in seen:
        bad.append("X-Hop-Named (named in Connection)")
    conn = seen.get("connection", "")
    if "x-hop-named" in conn.lower():
        bad.append("Connection: " + conn)
    check(not bad, "hop-by-hop headers forwarded: %s", bad)
    check("x-priority" not in seen, "X-Priority forwarded (%r)", seen.get("x-priority"))
    check(seen.get("x-custom") == "custom-value", "X-Custom %r", seen.get("x-custom"))
    check(seen.get("x-another") == "a, b;c=d", "X-Another %r", seen.get("x-another"))
    host = "127.0.0.1:%d" % fake().port
    check(seen.get("host") == host, "Host %r, want %r", seen.get("host"), host)


def t_hop_by_hop_response():
    # What the fake sends back that is hop-by-hop must not reach the client.
    d = H.request(fake().port, "GET", "/v1/headers", headers={"Connection": "keep-alive"})
    r = H.request(port(), "GET", "/v1/headers", headers={"Connection": "keep-alive"})
    check(r.status == 200, "status %s", r.status)
    for name in ("keep-alive", "proxy-authenticate", "proxy-connection", "trailer", "upgrade", "te"):
        check(r.header(name) is None, "response has hop-by-hop %s: %r", name, r.header(name))
    check(len(r.header_all("transfer-encoding")) <= 1, "Transfer-Encoding repeated")
    check(not (r.header("transfer-encoding") and r.header("content-length")),
          "both Transfer-Encoding and Content-Length")
    # End-to-end headers of the fake's answer arrive (Content-Type at least).
    check((r.header("content-type") or "").split(";")[0] == (d.header("content-type") or "").split(";")[0],
          "content-type %r vs fake's %r", r.header("content-type"), d.header("content-type"))
    if d.header("x-fake-name"):
        check(r.header("x-fake-name") == d.header("x-fake-name"), "X-Fake-Name not passed back")


def t_auth_replaced():
    t = tid()
    r = H.request(port(), "POST", "/v1/chat/completions",
                  headers={"X-Test-Id": t, "Authorization": "Bearer client-secret-token"},
                  body=chat_body("auth"))
    check(r.status == 200, "status %s", r.status)
    e = fake().find(t)
    check(e is not None, "not in /_log")
    auth = (e.get("headers") or {}).get("authorization")
    check(auth == "Bearer " + CANARY, "fake saw Authorization %r, want the configured key",
          (auth or "")[:40])
    # Without a client Authorization the key is still sent.
    r = H.request(port(), "GET", "/v1/auth-echo")
    auth = (r.json().get("headers") or {}).get("authorization")
    check(auth == "Bearer " + CANARY, "no client auth: fake saw %r", (auth or "")[:40])


def t_keepalive_connection():
    with H.Conn(port()) as c:
        for i in range(3):
            c.send(H.build_request("POST", "/v1/chat/completions",
                                   [("Content-Type", "application/json")],
                                   json.dumps(chat_body("ka %d" % i)), port=port()))
            r = c.read_response()
            check(r.status == 200, "request %d: status %s", i, r.status)
            check(r.json()["choices"][0]["message"]["content"] == "echo: ka %d" % i,
                  "request %d: body %r", i, r.body[:200])


def t_stream_order_and_reassembly():
    for model in ("deepseek-chat", "deepseek-reasoner"):
        msg = "stream me please, " + model
        n = H.request(port(), "POST", "/v1/chat/completions", body=chat_body(msg, model))
        check(n.status == 200, "%s non-stream status %s", model, n.status)
        nm = n.json()["choices"][0]["message"]
        st = H.sse_request(port(), chat_body(msg, model, stream=True),
                           headers={"X-Fake-Events": "7"})
        check(st.error is None, "%s: %s", model, st.error)
        r = st.resp
        check(r.status == 200, "%s: status %s", model, r.status)
        check(r.chunked, "%s: response not chunked (headers %r)", model, r.headers)
        check(r.complete, "%s: no terminating chunk", model)
        check("text/event-stream" in (r.header("content-type") or ""), "content-type %r",
              r.header("content-type"))
        evs = st.data_events()
        check(evs and evs[-1]["data"] == "[DONE]", "%s: last event %r", model, evs and evs[-1])
        check(not any(H.is_error_event(e) for e in st.events), "%s: error event in stream", model)
        chunks = st.chunks()
        ids = {c.get("id") for c in chunks}
        check(len(ids) == 1, "%s: chunk ids %r", model, ids)
        check(chunks[-1]["choices"][0].get("finish_reason") == "stop", "%s: last chunk %r",
              model, chunks[-1])
        # reasoning deltas all come before content deltas
        kinds = []
        for c in chunks:
            d = c["choices"][0].get("delta") or {}
            if d.get("reasoning_content"):
                kinds.append("r")
            if d.get("content"):
                kinds.append("c")
        check("".join(kinds) == "".join(sorted(kinds, reverse=True)), "%s: order %s", model, kinds)
        check(st.joined("content") == nm["content"], "%s: content %r != %r", model,
              st.joined("content"), nm["content"])
        if "reasoner" in model:
            check(nm.get("reasoning_content"), "no reasoning_content in the non-stream answer")
            check(st.joined("reasoning_content") == nm["reasoning_content"],
                  "reasoning %r != %r", st.joined("reasoning_content"), nm["reasoning_content"])


def t_stream_incremental():
    st = H.sse_request(port(), chat_body("incremental", stream=True), headers={
        "X-Fake-Events": "5", "X-Fake-Event-Delay-Ms": "200"}, timeout=15)
    check(st.error is None, "%s", st.error)
    evs = st.data_events()
    check(len(evs) >= 6, "only %d events", len(evs))
    first, last = evs[0]["t"], evs[-1]["t"]
    check(last - first >= 0.6, "events not incremental: first %.3fs, last %.3fs after sending",
          first - st.t_sent, last - st.t_sent)
    check(first - st.t_sent < 0.6, "first event only after %.3fs", first - st.t_sent)
    # arrival times spread out: at least 4 distinct arrival moments 100 ms apart
    moments = []
    for e in evs:
        if not moments or e["t"] - moments[-1] >= 0.1:
            moments.append(e["t"])
    check(len(moments) >= 4, "events arrived in %d bursts", len(moments))


def t_client_disconnect():
    t = tid()
    st = H.sse_request(port(), chat_body("disconnect", stream=True), headers={
        "X-Test-Id": t, "X-Fake-Events": "500", "X-Fake-Event-Delay-Ms": "20"},
        timeout=10, stop_after=3)
    check(st.error is None, "%s", st.error)
    check(st.resp.status == 200, "status %s", st.resp.status)
    check(len(st.data_events()) >= 3, "got %d events", len(st.data_events()))
    t_close = H.now_ms()
    st.conn.close()
    e = fake().find(t, timeout=3.0, pred=lambda e: e.get("client_closed"))
    check(e is not None, "the fake never saw the upstream connection close (3 s)")
    dt = e["t_closed_ms"] - t_close
    print("# client disconnect: the fake saw the upstream close %.1f ms after the client "
          "closed" % dt, flush=True)
    check(dt <= 100, "upstream closed %.0f ms after the client left (limit 100 ms)", dt)


def t_client_disconnect_before_data():
    # The client leaves while the upstream is still thinking (no data yet).
    t = tid()
    c = H.Conn(port(), timeout=5)
    c.send(H.build_request("POST", "/v1/chat/completions",
                           [("X-Test-Id", t), ("Content-Type", "application/json"),
                            ("X-Fake-Delay-Ms", "3000")],
                           json.dumps(chat_body("leave early", stream=True)), port=port()))
    check(fake().find(t, timeout=3.0) is not None, "request did not reach the fake")
    t_close = H.now_ms()
    c.close()
    e = fake().find(t, timeout=3.0, pred=lambda e: e.get("client_closed"))
    check(e is not None, "the fake never saw the upstream connection close")
    dt = e["t_closed_ms"] - t_close
    check(dt <= 1000, "upstream closed %.0f ms after the client left", dt)


MIB = 1024
# RSS growth allowed over the value before the request.  What dsgate relays
# before the stall (the kernel's socket buffers fill: a few MB) passes through
# ASan's allocator, whose redzones and quarantine (freed memory stays resident)
# inflate it; a stream of small events costs more than a few large writes.
# Without back-pressure the whole answer (50 MB / ~45 MB) would be resident.
RSS_LIMIT_MIB = 16          # 50 MB non-stream answer (measured: ~5 MiB)
RSS_LIMIT_STREAM_MIB = 32   # ~45 MB stream of 200000 events (measured: ~18 MiB)
RSS_LATE_MIB = 2            # growth allowed once the stall has settled


def _warm_up():
    """One request of each kind first, so that the RSS baseline is not
    inflated by one-time allocations (curl, first connection, ...)."""
    r = H.request(port(), "POST", "/v1/chat/completions", body=chat_body("warm up"))
    check(r.status == 200, "warm-up: status %s", r.status)
    st = H.sse_request(port(), chat_body("warm up", stream=True))
    check(st.resp is not None and st.resp.status == 200, "warm-up stream: %s", st.error)


def _stall(d, t, seconds=2.0):
    """Sample dsgate's RSS while the client does not read.  Returns
    (rss before, peak, growth during the last part of the stall) in KiB."""
    check(fake().find(t, timeout=5.0) is not None, "request did not reach the fake")
    samples = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        samples.append((time.monotonic(), d.rss_kib()))
        time.sleep(0.05)
    peak = max(s[1] for s in samples)
    late = [s[1] for s in samples if s[0] >= samples[0][0] + 0.7]
    return peak, (max(late) - min(late)) if late else 0


def _check_rss(what, rss0, peak, late, limit=RSS_LIMIT_MIB):
    growth = (peak - rss0) / MIB
    print("# %s: RSS before %.1f MiB, peak while stalled %.1f MiB (+%.1f MiB), "
          "+%.1f MiB in the last 1.3 s" % (what, rss0 / MIB, peak / MIB, growth, late / MIB),
          flush=True)
    check(growth <= limit, "RSS grew by %.1f MiB while the client was stalled "
          "(%.1f -> %.1f MiB, limit %d MiB)", growth, rss0 / MIB, peak / MIB, limit)
    check(late / MIB <= RSS_LATE_MIB, "RSS still growing during the stall (+%.1f MiB in the "
          "last 1.3 s)", late / MIB)


def t_slow_reader():
    d = P["dsgate"]
    t = tid()
    size = 50 * 1000 * 1000
    _warm_up()
    rss0 = d.rss_kib()
    c = H.Conn(port(), timeout=60, rcvbuf=4096)
    try:
        c.send(H.build_request("POST", "/v1/chat/completions",
                               [("X-Test-Id", t), ("Content-Type", "application/json"),
                                ("X-Fake-Body-Bytes", str(size)), ("Connection", "close")],
                               json.dumps(chat_body("big")), port=port()))
        peak, late = _stall(d, t)
        r = c.read_response(timeout=60)
    finally:
        c.close()
    check(r.status == 200, "status %s", r.status)
    check(r.complete, "body incomplete")
    j = r.json()
    content = j["choices"][0]["message"]["content"]
    check(content.startswith("echo: big"), "content starts %r", content[:40])
    check(len(r.body) >= size * 0.9, "body %d bytes, expected about %d", len(r.body), size)
    cl = r.header("content-length")
    if cl is not None:
        check(int(cl) == len(r.body), "Content-Length %s, got %d", cl, len(r.body))
    _check_rss("slow reader, 50 MB answer", rss0, peak, late)


def t_slow_reader_stream():
    d = P["dsgate"]
    t = tid()
    n = 200000                   # ~230 bytes each: a ~45 MB stream
    _warm_up()
    rss0 = d.rss_kib()
    c = H.Conn(port(), timeout=60, rcvbuf=4096)
    try:
        c.send(H.build_request("POST", "/v1/chat/completions",
                               [("X-Test-Id", t), ("Content-Type", "application/json"),
                                ("X-Fake-Events", str(n)), ("Connection", "close")],
                               json.dumps(chat_body("many events", stream=True)), port=port()))
        peak, late = _stall(d, t)
        r = c.read_response(timeout=90)
    finally:
        c.close()
    check(r.status == 200 and r.complete, "status %s complete %s", r.status, r.complete)
    evs = H.parse_sse(r.body)
    check(evs and evs[-1]["data"] == "[DONE]", "stream did not end with [DONE]")
    content = ""
    pieces = 0
    for e in evs[:-1]:
        ch = json.loads(e["data"])
        c0 = (ch["choices"][0].get("delta") or {}).get("content") or ""
        content += c0
        pieces += 1 if c0 else 0
    check(content.startswith("echo: many events"), "content starts %r", content[:40])
    check(pieces >= n * 0.99, "%d content events, want %d", pieces, n)
    _check_rss("slow reader, %d-event stream (%.1f MB)" % (n, len(r.body) / 1e6), rss0, peak, late,
               RSS_LIMIT_STREAM_MIB)


def t_upstream_errors():
    for status in (400, 404, 422, 503):
        t = tid()
        hs = {"X-Fake-Status": str(status), "X-Test-Id": t}
        r = H.request(port(), "POST", "/v1/chat/completions", headers=hs, body=chat_body("err"))
        d = H.request(fake().port, "POST", "/v1/chat/completions",
                      headers={"X-Fake-Status": str(status)}, body=chat_body("err"))
        check(d.status == status, "the fake itself answered %s", d.status)
        check(r.status == status, "X-Fake-Status %d: client got %s (%r)", status, r.status, r.body[:200])
        check(r.body == d.body, "%d: body %r differs from the fake's %r", status, r.body[:200], d.body[:200])
        check((r.header("content-type") or "") == (d.header("content-type") or ""),
              "%d: content-type %r vs %r", status, r.header("content-type"), d.header("content-type"))
        n = sum(1 for e in fake().log() if (e.get("headers") or {}).get("x-test-id") == t)
        check(n == 1, "%d: upstream called %d times (retry max_attempts is 1)", status, n)
    # and on a non-chat path (echo honours X-Fake-Status too)
    r = H.request(port(), "GET", "/v1/whatever", headers={"X-Fake-Status": "404"})
    check(r.status == 404, "echo path: status %s", r.status)


def t_reset_mid_stream():
    t0 = time.monotonic()
    st = H.sse_request(port(), chat_body("reset me", stream=True), headers={
        "X-Fake-Events": "10", "X-Fake-Event-Delay-Ms": "100", "X-Fake-Reset-After": "2"},
        timeout=10)
    dt = time.monotonic() - t0
    check(st.error is None, "transport: %s (after %.1fs)", st.error, dt)
    check(st.resp.status == 200, "status %s", st.resp.status)
    check(st.resp.complete, "no terminating chunk")
    check(dt < 4.0, "stream took %.1fs to end", dt)
    data = [e for e in st.events if e["data"] is not None]
    check(data and H.is_error_event(data[-1]) or (st.events and st.events[-1]["event"] == "error"),
          "stream did not end with an SSE error event: %r", st.raw[-300:])
    good = [e for e in data if not H.is_error_event(e)]
    check(len(good) == 2, "%d data events before the error, want the 2 sent before the reset",
          len(good))
    check(all(e["data"] != "[DONE]" for e in good), "[DONE] after a reset")
    for e in good:
        json.loads(e["data"])


def t_still_serving():
    r = H.request(port(), "GET", "/healthz")
    check(r.status == 200, "healthz %s", r.status)
    r = H.request(port(), "POST", "/v1/chat/completions", body=chat_body("still here"))
    check(r.status == 200 and r.json()["choices"][0]["message"]["content"] == "echo: still here",
          "chat %s %r", r.status, r.body[:200])
    st = H.sse_request(port(), chat_body("still streaming", stream=True))
    check(st.error is None and st.resp.status == 200 and st.joined("content") == "echo: still streaming",
          "stream %r", st.error or st.raw[-200:])


def t_sigterm_and_logs():
    d = P["dsgate"]
    rc = d.stop(15.0)
    log = d.log_text()
    check(CANARY not in log, "the API key appears in dsgate's log %s", d.log_path)
    check(CANARY[len("sk-dsgate-canary-"):] not in log, "part of the API key appears in the log")
    for pat in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer"):
        check(pat not in log, "%r in %s", pat, d.log_path)
    check(rc == 0, "dsgate exited %s after SIGTERM (log %s)", rc, d.log_path)
    check(log.strip(), "dsgate wrote no log line at all")


TESTS = [
    ("healthz", t_healthz),
    ("readyz", t_readyz),
    ("chat_nonstream_passthrough", t_chat_nonstream),
    ("response_headers_added", t_response_headers_added),
    ("request_body_byte_exact", t_body_byte_exact),
    ("chunked_request_body", t_chunked_request_body),
    ("path_and_query_forwarded", t_path_query),
    ("chat_completions_without_v1", t_chat_without_v1),
    ("methods_pass_through", t_methods),
    ("hop_by_hop_request_headers", t_hop_by_hop_request),
    ("hop_by_hop_response_headers", t_hop_by_hop_response),
    ("authorization_replaced_by_key", t_auth_replaced),
    ("keepalive_connection_reuse", t_keepalive_connection),
    ("stream_order_and_reassembly", t_stream_order_and_reassembly),
    ("stream_incremental", t_stream_incremental),
    ("client_disconnect_mid_stream_100ms", t_client_disconnect),
    ("client_disconnect_before_data", t_client_disconnect_before_data),
    ("slow_reader_backpressure", t_slow_reader),
    ("slow_reader_backpressure_stream", t_slow_reader_stream),
    ("upstream_errors_pass_through", t_upstream_errors),
    ("upstream_reset_mid_stream", t_reset_mid_stream),
    ("still_serving_after_all", t_still_serving),
    ("sigterm_exit_0_no_key_no_sanitizer", t_sigterm_and_logs),
]


def _setup():
    P["fake"] = H.Fake(name="gw")
    P["dsgate"] = H.Dsgate(tag="gateway", upstream_url=P["fake"].url,
                           api_key_env=KEY_ENV, env={KEY_ENV: CANARY})


def main():
    return H.main("test_gateway", [H.Pair(TESTS, _setup, P,
                                          final={"sigterm_exit_0_no_key_no_sanitizer"})])


if __name__ == "__main__":
    sys.exit(main())
