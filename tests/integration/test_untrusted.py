#!/usr/bin/env python3
"""
test_untrusted: upstream answers are untrusted input.  A misbehaving
upstream (harness.ScriptedUpstream: verbatim heads, hand-made framing,
trickled bodies) must not split the client's connection, smuggle header
bytes through, be retried as if it had not answered, hand a follower
encoded bytes without their encoding, or hold a client forever.

Each test starts its own dsgate and ScriptedUpstream.

Run: python3 tests/integration/test_untrusted.py [test names...]
(needs build/asan/dsgate).
"""

import gzip
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import CHAT, check, note                           # noqa: E402

STARTED = []


def tid():
    return H.test_id()


def chat(content="hello", stream=False):
    return H.chat_request(content, stream)


def start(script, **cfg):
    up = H.ScriptedUpstream(script)
    STARTED.append(up)
    # two attempts: a scripted answer that closes its connection can race the next
    # request onto that dying pooled connection (a counted, never silent, retry);
    # invalid answers are never retried, so their one-call checks hold
    cfg.setdefault("retry_attempts", 2)
    d = H.Dsgate(upstream_url=up.url, **cfg)
    STARTED.append(d)
    return d, up


def stop_now(d, up):
    """Stop D and UP now (a loop's dsgate); D must exit 0 on SIGTERM."""
    alive = d.alive()
    rc = d.stop()
    up.stop()
    STARTED.remove(d)
    STARTED.remove(up)
    check(alive and rc == 0, "dsgate %s (status %s); log %s",
          "exited badly" if alive else "died", rc, d.log_path)


def post(port, body, headers=None, timeout=10.0):
    return H.request(port, "POST", CHAT, headers or {}, body, timeout=timeout)


def req_bytes(port, body, close=False):
    hs = [("Content-Type", "application/json")]
    if close:
        hs.append(("Connection", "close"))
    return H.build_request("POST", CHAT, hs, json.dumps(body), port=port)


GOOD = b'{"id":"second","object":"chat.completion","choices":[]}'
GOOD_ANSWER = {"headers": [("Content-Type", "application/json")], "body": GOOD}


# ---------------------------------------------------------------- 1. framing

# curl decodes the chunked body (EVIL, 80 bytes); the upstream's Content-Length
# says 2: a client trusting it would read the rest as its next answer.
EVIL = (b'{}HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
        b'Content-Length: 15\r\n\r\n{"smuggled":1}\n')


def _two_on_one_connection(first, pipelined):
    """The first answer FIRST, the second a good one; both requests on one
    keep-alive connection.  Each must come back exactly once, well framed."""
    d, up = start([first, GOOD_ANSWER])
    r1b = req_bytes(d.port, chat("one " + tid()))
    r2b = req_bytes(d.port, chat("two " + tid()), close=True)
    with H.Conn(d.port, timeout=10) as c:
        if pipelined:
            c.send(r1b + r2b)
            a1 = c.read_response(10)
        else:
            c.send(r1b)
            a1 = c.read_response(10)
            c.send(r2b)
        a2 = c.read_response(10)
        # nothing after the second answer: the connection ends
        rest = b""
        try:
            while c._fill(time.monotonic() + 3):
                pass
        except H.HTTPError:
            pass
        rest = bytes(c.buf)
    return a1, a2, rest, up


def _check_framing(first, want_body, pipelined):
    a1, a2, rest, up = _two_on_one_connection(first, pipelined)
    check(a1.status == 200, "first status %r", a1.status)
    check(a1.complete, "first answer incomplete")
    check(a1.body == want_body, "first answer is %r, not the %d bytes curl decoded",
          a1.body[:120], len(want_body))
    cl = a1.header_all("content-length")
    te = a1.header_all("transfer-encoding")
    check(len(cl) + len(te) == 1, "first answer framed by %r + %r", cl, te)
    check(not cl or int(cl[0]) == len(a1.body), "Content-Length %r for %d bytes", cl,
          len(a1.body))
    check(a2.status == 200 and a2.body == GOOD, "second answer is %r (%r)", a2.status,
          a2.body[:120])
    check(rest == b"", "bytes after the second answer: %r", rest[:120])
    check(len(up.requests) == 2, "upstream saw %d requests", len(up.requests))


def t_framing_cl_and_chunked_sequential():
    """Content-Length: 2 and Transfer-Encoding: chunked: the client gets the
    decoded body, chunked (no upstream Content-Length); the next answer on its
    keep-alive connection is dsgate's, not the smuggled one."""
    first = {"headers": [("Content-Type", "application/json"), ("Content-Length", "2"),
                         ("Transfer-Encoding", "chunked")],
             "framing": "chunked", "body": [EVIL[:30], EVIL[30:]]}
    _check_framing(first, EVIL, pipelined=False)


def t_framing_cl_and_chunked_pipelined():
    """As above, both requests pipelined on one connection."""
    first = {"headers": [("Transfer-Encoding", "chunked"), ("Content-Type", "application/json"),
                         ("Content-Length", "2")],
             "framing": "chunked", "body": [EVIL]}
    _check_framing(first, EVIL, pipelined=True)


def t_framing_cl_and_te_identity_chunked():
    """Transfer-Encoding other than one chunked (identity, chunked) with a
    Content-Length: framing no reader agrees on is a 502 (RFC 9112 6.3), and
    the client's connection stays in step."""
    first = {"headers": [("Content-Type", "application/json"), ("Content-Length", "2"),
                         ("Transfer-Encoding", "identity, chunked")],
             "framing": "chunked", "body": [EVIL], "action": "keep"}
    a1, a2, rest, up = _two_on_one_connection(first, pipelined=False)
    check(a1.status == 502 and H.openai_error_shape(a1) is None, "first: %s %r", a1.status,
          a1.body[:200])
    check(a2.status == 200 and a2.body == GOOD, "second answer %r", a2.body[:100])
    check(rest == b"", "bytes after the second answer: %r", rest[:120])


def t_framing_bad_content_length():
    """A Content-Length that is not a number (a sign) is an invalid answer:
    502 (RFC 9112 6.3); a list of the same number is that number, and the
    reply is framed by dsgate."""
    for cl, want in (("+3", 502), ("3, 3", 200)):
        raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
               + cl.encode() + b"\r\n\r\n{}x")
        # the upstream keeps its connection: the second request may reuse it
        a1, a2, rest, up = _two_on_one_connection({"raw": raw, "action": "keep"},
                                                  pipelined=False)
        check(a1.status == want, "%s: status %r %r", cl, a1.status, a1.body[:120])
        if want == 200:
            check(a1.header("content-length") in (None, str(len(a1.body))),
                  "%s: Content-Length %r for %r", cl, a1.header("content-length"), a1.body)
        check(a2.body == GOOD, "%s: second answer %r", cl, a2.body[:100])


def t_framing_plain_length_kept():
    """The usual answer (one Content-Length, no Transfer-Encoding) keeps its length."""
    body = b'{"id":"x","object":"chat.completion"}'
    a1, a2, rest, up = _two_on_one_connection(
        {"headers": [("Content-Type", "application/json")], "body": body}, pipelined=False)
    check(a1.body == body and a1.header("content-length") == str(len(body)),
          "Content-Length %r, body %r", a1.header("content-length"), a1.body)
    check(a1.header("transfer-encoding") is None, "chunked: %r", a1.header("transfer-encoding"))
    check(a2.body == GOOD, "second answer %r", a2.body[:100])


def t_framing_httpx():
    """The CL+TE answer through httpx (a real client) on one keep-alive connection."""
    try:
        import httpx
    except ImportError:
        print("# SKIP t_framing_httpx: python3-httpx not installed", flush=True)
        return
    first = {"headers": [("Content-Type", "application/json"), ("Content-Length", "2"),
                         ("Transfer-Encoding", "chunked")],
             "framing": "chunked", "body": [EVIL]}
    d, up = start([first, GOOD_ANSWER])
    with httpx.Client(base_url="http://127.0.0.1:%d" % d.port, timeout=10) as cl:
        r1 = cl.post(CHAT, json=chat("one"))
        r2 = cl.post(CHAT, json=chat("two"))
    check(r1.content == EVIL, "httpx first answer %r", r1.content[:100])
    check(r2.content == GOOD, "httpx second answer %r", r2.content[:100])


# ---------------------------------------------------------------- 2. header bytes

HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
BODY = b'{"id":"bad","object":"chat.completion"}'
TAIL = b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)

BAD_HEADS = [
    ("bare CR in a value", HEAD_OK + b"X-A: foo\rbar\r\n" + TAIL),
    ("bare CR before CRLF", HEAD_OK + b"X-A: foo\r\r\n" + TAIL),
    ("NUL in a value", HEAD_OK + b"X-A: foo\x00bar\r\n" + TAIL),
    ("control byte in a value", HEAD_OK + b"X-A: foo\x01bar\r\n" + TAIL),
    ("obs-fold (space)", HEAD_OK + b"X-A: foo\r\n  Set-Cookie: x=1\r\n" + TAIL),
    ("obs-fold (tab)", HEAD_OK + b"X-A: foo\r\n\tbar\r\n" + TAIL),
    ("space before the colon", HEAD_OK + b"X-A : foo\r\n" + TAIL),
    ("non-token name", HEAD_OK + b"X(A): foo\r\n" + TAIL),
    ("non-token name @", HEAD_OK + b"X@A: foo\r\n" + TAIL),
    ("empty name", HEAD_OK + b": foo\r\n" + TAIL),
    ("no colon", HEAD_OK + b"garbage line\r\n" + TAIL),
]


def _one_bad(d, up, what, expect_n):
    t0 = time.monotonic()
    r = post(d.port, chat("bad " + tid()), timeout=15)
    dt = time.monotonic() - t0
    check(r.status == 502, "%s: status %r (%r)", what, r.status, r.body[:150])
    why = H.openai_error_shape(r)
    check(why is None, "%s: %s", what, why)
    e = r.json()["error"]
    check(e["type"] == "upstream_error", "%s: error type %r", what, e["type"])
    check(b"bad" not in r.body and r.header("x-a") is None, "%s: the answer was forwarded",
          what)
    check(up.wait_requests(expect_n, 1) and len(up.requests) == expect_n,
          "%s: the upstream saw %d requests, not %d (retried?)", what, len(up.requests),
          expect_n)
    return dt, e


def t_bad_header_bytes_502_no_retry():
    """Each malformed upstream head: a 502 upstream_error, never forwarded,
    never retried (retry.max_attempts 3)."""
    for what, raw in BAD_HEADS:
        d, up = start({"raw": raw, "action": "close"}, retry_attempts=3)
        try:
            _, e = _one_bad(d, up, what, 1)
            note("%s: 502 %s", what, e["code"])
        finally:
            stop_now(d, up)


def t_unsolicited_101_at_once():
    """101 Switching Protocols (never asked for), then the upstream stays open:
    a 502 at once, not a wait for timeouts.first_data; no retry."""
    for st in (b"101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade",
               b"199 Odd"):
        raw = b"HTTP/1.1 " + st + b"\r\n\r\n"
        d, up = start({"raw": raw, "action": "hold", "hold_ms": 20000}, retry_attempts=3,
                      timeouts={"first_data": "15s"})
        try:
            dt, e = _one_bad(d, up, st.decode()[:3], 1)
            check(dt < 3.0, "%s: the answer took %.1fs", st[:3], dt)
            note("%s: 502 %s in %.2fs", st.decode()[:3], e["code"], dt)
        finally:
            stop_now(d, up)


def t_interim_103_then_200():
    """A 103 Early Hints before the answer is an interim answer: the 200 is
    passed on (the hint's headers are not)."""
    raw = (b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + HEAD_OK + TAIL)
    d, up = start({"raw": raw})
    r = post(d.port, chat("hints"))
    check(r.status == 200 and r.body == BODY, "status %r body %r", r.status, r.body[:100])
    check(r.header("link") is None, "the 103's Link went out")


# ---------------------------------------------------------------- 3. retry safety

def t_head_too_large_no_retry():
    """Heads too large (one 200 KB header line, which curl rejects; 100 KB in
    100 lines; 300 small headers): a 502 at once; the POST reached the
    upstream once (retry.max_attempts 3)."""
    cases = [
        ("one 200 KB line", HEAD_OK + b"X-Big: " + b"a" * 200000 + b"\r\n" + TAIL),
        ("100 KB in 100 lines",
         HEAD_OK + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(100)) + TAIL),
        ("300 headers", HEAD_OK + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + TAIL),
    ]
    for what, raw in cases:
        d, up = start({"raw": raw}, retry_attempts=3)
        try:
            _, e = _one_bad(d, up, what, 1)
            note("%s: 502 %s", what, e["code"])
        finally:
            stop_now(d, up)


def t_truncated_head_still_retried():
    """A head cut by the connection (no blank line) is a transport failure:
    it is retried as before (the next attempt answers)."""
    d, up = start([{"raw": HEAD_OK + b"X-A: b", "action": "reset"}, GOOD_ANSWER],
                  retry_attempts=3)
    r = post(d.port, chat("cut"))
    check(r.status == 200 and r.body == GOOD, "status %r body %r", r.status, r.body[:100])
    check(len(up.requests) == 2, "upstream saw %d requests", len(up.requests))


# ---------------------------------------------------------------- 4. Content-Encoding

def t_encoded_answer_not_shared():
    """Two identical cacheable requests at once; the upstream answers
    Content-Encoding: gzip (slowly).  Each client gets gzip bytes with their
    Content-Encoding (none is a follower of the other's encoded bytes), and
    nothing is cached: a third request reaches the upstream."""
    payload = b'{"id":"gz","object":"chat.completion","choices":[]}'
    gz = gzip.compress(payload)
    ans = {"headers": [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
           "body": [(600, gz)]}
    d, up = start(ans, cache=True)
    body = chat("encoded " + tid())
    out = [None, None]

    def one(i):
        try:
            out[i] = post(d.port, body, timeout=15)
        except Exception as e:          # noqa: BLE001
            out[i] = e
    ths = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    ths[0].start()
    time.sleep(0.2)
    ths[1].start()
    for th in ths:
        th.join(20)
    for i, r in enumerate(out):
        check(isinstance(r, H.Response) and r.status == 200, "request %d: %r", i, r)
        check((r.header("content-encoding") or "").lower() == "gzip",
              "request %d: %d bytes without Content-Encoding (coalesced %r, X-Cache %r)", i,
              len(r.body), r.header("x-dsgate-coalesced"), r.header("x-cache"))
        check(gzip.decompress(r.body) == payload, "request %d: body does not gunzip", i)
    n = len(up.requests)
    r3 = post(d.port, body, timeout=15)
    check(r3.status == 200 and (r3.header("content-encoding") or "").lower() == "gzip",
          "third: %r Content-Encoding %r X-Cache %r", r3.status, r3.header("content-encoding"),
          r3.header("x-cache"))
    check(r3.header("x-cache") != "HIT" and len(up.requests) == n + 1,
          "the encoded answer was cached (X-Cache %r, upstream requests %d -> %d)",
          r3.header("x-cache"), n, len(up.requests))


def t_identity_encoding_still_shared():
    """Content-Encoding: identity is no encoding: the answer is cached."""
    payload = b'{"id":"id","object":"chat.completion","choices":[]}'
    ans = {"headers": [("Content-Type", "application/json"), ("Content-Encoding", "identity")],
           "body": payload}
    d, up = start(ans, cache=True)
    body = chat("identity " + tid())
    r1 = post(d.port, body)
    r2 = post(d.port, body)
    check(r1.body == payload and r2.body == payload, "bodies %r %r", r1.body, r2.body)
    check(r2.header("x-cache") == "HIT" and len(up.requests) == 1,
          "not cached: X-Cache %r, upstream saw %d", r2.header("x-cache"), len(up.requests))


# ---------------------------------------------------------------- 5. bounded time

def t_body_timeout_cuts_trickle():
    """A non-stream answer trickling a byte every 300 ms (timeouts.body 1s,
    idle 30s, total none): the connection is cut about 1 s after the first
    byte, not held for the whole 12 s."""
    payload = b'{"id":"slow","object":"chat.completion","x":"' + b"a" * 20 + b'"}'
    ans = {"headers": [("Content-Type", "application/json")],
           "body": [(300, payload[i:i + 1]) for i in range(len(payload))]}
    d, up = start(ans, timeouts={"body": "1s", "idle": "30s"})
    t0 = time.monotonic()
    with H.Conn(d.port, timeout=20) as c:
        c.send(req_bytes(d.port, chat("trickle"), close=True))
        r = c.read_head(20)
        got = b""
        err = None
        try:
            for piece in c.iter_body(r, 20):
                got += piece
        except H.HTTPError as e:
            err = str(e)
    dt = time.monotonic() - t0
    note("trickle: status %r, %d of %d bytes in %.1fs (%s)", r.status, len(got), len(payload),
         dt, err)
    check(dt < 4.0, "the trickle went on for %.1fs", dt)
    check(not r.complete, "a cut answer looks complete")
    check(len(got) < len(payload), "the whole answer came")


def t_body_timeout_504_before_data():
    """Keep-alive white space trickling forever (framing none), timeouts.body
    1s, first_data 15s: a 504 once the bound passes, before any data byte."""
    ans = {"headers": [("Content-Type", "application/json")], "framing": "none",
           "body": [(300, b" ")] * 100}
    d, up = start(ans, timeouts={"body": "1s", "first_data": "15s"}, retry_attempts=1)
    t0 = time.monotonic()
    r = post(d.port, chat("ws"), timeout=20)
    dt = time.monotonic() - t0
    check(r.status == 504, "status %r (%r) after %.1fs", r.status, r.body[:100], dt)
    check(H.openai_error_shape(r) is None, "%s", H.openai_error_shape(r))
    check(dt < 4.0, "the 504 came after %.1fs", dt)


def t_stream_slow_event_not_idle():
    """A stream whose second event arrives a byte every 300 ms (idle 1s,
    ~6 s in all) is not cut as idle while its bytes flow."""
    ev1 = b'data: {"id":"s","object":"chat.completion.chunk","choices":[]}\n\n'
    ev2 = b'data: {"c":"xyz"}\n\n'
    pieces = [ev1] + [(300, ev2[i:i + 1]) for i in range(len(ev2))] + [
        b"data: [DONE]\n\n"]
    ans = {"headers": [("Content-Type", "text/event-stream")], "framing": "chunked",
           "body": pieces}
    d, up = start(ans, timeouts={"idle": "1s"})
    st = H.sse_request(d.port, chat("slow event", stream=True), timeout=20)
    check(st.error is None and st.resp and st.resp.status == 200, "error %r", st.error)
    datas = [e["data"] for e in st.data_events()]
    check(datas and datas[-1] == "[DONE]", "events %r", datas)
    check(not any(H.is_error_event(e) for e in st.events), "an error event: %r", st.events)
    check(st.raw.count(b"data:") == 3, "stream %r", st.raw[:300])


TESTS = [
    ("t_framing_cl_and_chunked_sequential", t_framing_cl_and_chunked_sequential),
    ("t_framing_cl_and_chunked_pipelined", t_framing_cl_and_chunked_pipelined),
    ("t_framing_cl_and_te_identity_chunked", t_framing_cl_and_te_identity_chunked),
    ("t_framing_bad_content_length", t_framing_bad_content_length),
    ("t_framing_plain_length_kept", t_framing_plain_length_kept),
    ("t_framing_httpx", t_framing_httpx),
    ("t_bad_header_bytes_502_no_retry", t_bad_header_bytes_502_no_retry),
    ("t_unsolicited_101_at_once", t_unsolicited_101_at_once),
    ("t_interim_103_then_200", t_interim_103_then_200),
    ("t_head_too_large_no_retry", t_head_too_large_no_retry),
    ("t_truncated_head_still_retried", t_truncated_head_still_retried),
    ("t_encoded_answer_not_shared", t_encoded_answer_not_shared),
    ("t_identity_encoding_still_shared", t_identity_encoding_still_shared),
    ("t_body_timeout_cuts_trickle", t_body_timeout_cuts_trickle),
    ("t_body_timeout_504_before_data", t_body_timeout_504_before_data),
    ("t_stream_slow_event_not_idle", t_stream_slow_event_not_idle),
]

if __name__ == "__main__":
    sys.exit(H.main("test_untrusted", TESTS, started=STARTED,
                    require=[(H.DSGATE, "build/asan/dsgate")]))
