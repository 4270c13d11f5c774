#!/usr/bin/env python3
"""
test_errors: errors dsgate makes itself, request-line hygiene, client
timeouts, the client's Authorization without a key, hop-by-hop response
headers and an unreachable upstream.

Pair "limits": a fake upstream behind a dsgate with small limits
(max_body 1KB, max_headers 8KB, header_timeout 1s), first_data 1s and an
api_key_env naming a variable that is not set.
Pair "raw": a dsgate in front of a canned upstream (harness.ScriptedUpstream)
that sends hop-by-hop response headers; it is then closed, which makes the
upstream unreachable (502).
"""

import json
import os
import socket
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402

P = {}
FIRST_DATA_S = 1.0
HEADER_TIMEOUT_S = 1.0
MAX_BODY = 1024
MAX_HEADERS = 8 * 1024


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


def requests_seen():
    return fake().stats()["requests"]


# ---------------------------------------------------------------- limits pair

def t_auth_forwarded_without_key():
    t = tid()
    r = H.request(port(), "POST", "/v1/chat/completions",
                  headers={"X-Test-Id": t, "Authorization": "Bearer client-own-token"},
                  body=chat_body("auth"))
    check(r.status == 200, "status %s body %r", r.status, r.body[:200])
    e = fake().find(t)
    check(e is not None, "not in /_log")
    auth = (e.get("headers") or {}).get("authorization")
    check(auth == "Bearer client-own-token", "fake saw Authorization %r", auth)


def t_413():
    before = requests_seen()
    body = json.dumps(chat_body("x" * (4 * MAX_BODY)))
    r = H.raw_exchange(port(), H.build_request(
        "POST", "/v1/chat/completions",
        [("Content-Type", "application/json"), ("Connection", "close")], body, port=port()))
    check(r is not None, "no response (connection closed)")
    check(r.status == 413, "status %s body %r", r.status, r.body[:200])
    why = H.openai_error_shape(r)
    check(why is None, "413 %s", why)
    check(requests_seen() == before, "the request reached the upstream")
    # a body just under the limit still passes
    small = json.dumps(chat_body("y" * (MAX_BODY // 2)))
    r = H.request(port(), "POST", "/v1/chat/completions",
                  headers={"Content-Type": "application/json"}, body=small)
    check(r.status == 200, "body of %d bytes (< max_body): status %s", len(small), r.status)


def t_413_chunked():
    body = json.dumps(chat_body("z" * (4 * MAX_BODY))).encode()
    chunked = b""
    for i in range(0, len(body), 500):
        p = body[i:i + 500]
        chunked += b"%x\r\n%s\r\n" % (len(p), p)
    chunked += b"0\r\n\r\n"
    r = H.raw_exchange(port(), H.build_request(
        "POST", "/v1/chat/completions",
        [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked"),
         ("Connection", "close")], port=port()) + chunked)
    check(r is not None, "no response (connection closed)")
    check(r.status == 413, "status %s body %r", r.status, r.body[:200])
    check(H.openai_error_shape(r) is None, "413 %s", H.openai_error_shape(r))


def t_431():
    before = requests_seen()
    hs = [("Content-Type", "application/json"), ("Connection", "close")]
    hs += [("X-Big-%02d" % i, "v" * 1000) for i in range(2 * MAX_HEADERS // 1000)]
    r = H.raw_exchange(port(), H.build_request(
        "POST", "/v1/chat/completions", hs, json.dumps(chat_body("h")), port=port()))
    check(r is not None, "no response (connection closed)")
    check(r.status == 431, "status %s body %r", r.status, r.body[:200])
    check(H.openai_error_shape(r) is None, "431 %s", H.openai_error_shape(r))
    check(requests_seen() == before, "the request reached the upstream")


def t_400_invalid_json():
    before = requests_seen()
    for bad in (b'{"model":"deepseek-chat","messages":[', b"not json at all", b""):
        r = H.request(port(), "POST", "/v1/chat/completions",
                      headers={"Content-Type": "application/json"}, body=bad)
        check(r.status == 400, "body %r: status %s %r", bad, r.status, r.body[:200])
        check(H.openai_error_shape(r) is None, "body %r: %s", bad, H.openai_error_shape(r))
    r = H.request(port(), "POST", "/chat/completions",
                  headers={"Content-Type": "application/json"}, body=b"{,}")
    check(r.status == 400, "/chat/completions: status %s", r.status)
    check(requests_seen() == before, "invalid JSON reached the upstream")


def t_400_bad_priority():
    before = requests_seen()
    for bad in ("urgent", "1", "high,low"):
        r = H.request(port(), "POST", "/v1/chat/completions",
                      headers={"X-Priority": bad}, body=chat_body("p"))
        check(r.status == 400, "X-Priority %r: status %s", bad, r.status)
        check(H.openai_error_shape(r) is None, "X-Priority %r: %s", bad, H.openai_error_shape(r))
    check(requests_seen() == before, "a bad X-Priority reached the upstream")
    for good in ("high", "Medium", "LOW"):
        r = H.request(port(), "POST", "/v1/chat/completions",
                      headers={"X-Priority": good}, body=chat_body("p"))
        check(r.status == 200, "X-Priority %r: status %s", good, r.status)


def t_504_never():
    t0 = time.monotonic()
    r = H.request(port(), "POST", "/v1/chat/completions",
                  headers={"X-Fake-Never": "1"}, body=chat_body("never"), timeout=10)
    dt = time.monotonic() - t0
    check(r.status == 504, "status %s body %r", r.status, r.body[:200])
    check(H.openai_error_shape(r) is None, "504 %s", H.openai_error_shape(r))
    check(FIRST_DATA_S * 0.8 <= dt <= FIRST_DATA_S + 2, "answered after %.2fs (first_data %.0fs)",
          dt, FIRST_DATA_S)


def t_504_keepalive_nonstream():
    t0 = time.monotonic()
    r = H.request(port(), "POST", "/v1/chat/completions",
                  headers={"X-Fake-Delay-Ms": "6000", "X-Fake-Keepalive-Ms": "100"},
                  body=chat_body("busy"), timeout=10)
    dt = time.monotonic() - t0
    check(r.status == 504, "status %s after %.2fs, body %r", r.status, dt, r.body[:200])
    check(H.openai_error_shape(r) is None, "504 %s", H.openai_error_shape(r))
    check(dt <= FIRST_DATA_S + 2, "answered after %.2fs", dt)


def t_504_keepalive_stream():
    st = H.sse_request(port(), chat_body("busy stream", stream=True),
                       headers={"X-Fake-Delay-Ms": "6000", "X-Fake-Keepalive-Ms": "100"},
                       timeout=10)
    dt = st.t_end - st.t_sent
    check(st.resp is not None, "no response: %s", st.error)
    check(dt <= FIRST_DATA_S + 2, "the stream ended only after %.2fs (first_data %.0fs)",
          dt, FIRST_DATA_S)
    r = st.resp
    if r.status == 504:
        r.body = st.raw
        check(H.openai_error_shape(r) is None, "504 %s", H.openai_error_shape(r))
        return
    check(r.status == 200, "status %s", r.status)
    check(st.error is None, "transport: %s", st.error)
    check(r.complete, "no terminating chunk")
    evs = [e for e in st.events if e["data"] is not None or e["event"]]
    check(evs and (H.is_error_event(evs[-1]) or evs[-1]["event"] == "error"),
          "200 stream did not end with an SSE error event: %r", st.raw[-300:])
    check(not [e for e in evs if e["data"] and not H.is_error_event(e)],
          "data events in a stream that had no data")


def t_first_data_only_until_data():
    # Events 400 ms apart (2.4 s in all) with first_data 1s: first_data ends at
    # the first data byte, so the stream completes.
    st = H.sse_request(port(), chat_body("slow but steady", stream=True),
                       headers={"X-Fake-Events": "5", "X-Fake-Event-Delay-Ms": "400"}, timeout=15)
    check(st.error is None, "%s", st.error)
    check(st.resp.status == 200 and st.resp.complete, "status %s", st.resp.status)
    evs = st.data_events()
    check(evs and evs[-1]["data"] == "[DONE]", "stream cut: %r", st.raw[-300:])
    check(st.joined("content") == "echo: slow but steady", "content %r", st.joined("content"))
    r = H.request(port(), "POST", "/v1/chat/completions",
                  headers={"X-Fake-Delay-Ms": "500"}, body=chat_body("half a second"))
    check(r.status == 200, "non-stream with 500 ms delay: %s", r.status)


HYGIENE = [
    ("absolute_form", b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
                      b"Connection: close\r\n\r\n", 400),
    ("absolute_form_self", b"GET http://127.0.0.1:%(port)d/v1/models HTTP/1.1\r\n"
                           b"Host: 127.0.0.1:%(port)d\r\nConnection: close\r\n\r\n", 400),
    ("asterisk_form", b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    ("dotdot", b"GET /v1/../x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("dotdot_end", b"GET /v1/models/.. HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("dot", b"GET /v1/./x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("enc_dotdot", b"GET /v1/%2e%2e/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("enc_dotdot_upper", b"GET /v1/%2E%2E/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("enc_slash", b"GET /v1%2fx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("enc_slash_upper", b"GET /v1%2Fmodels HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("enc_backslash", b"GET /v1/%5cx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    ("enc_dot_query_ok", b"GET /v1/echo?a=%2e%2e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200),
]


def t_request_line_hygiene():
    before = requests_seen()
    bad = []
    for name, raw, want in HYGIENE:
        raw = raw % {b"port": port()} if b"%(port)d" in raw else raw
        r = H.raw_exchange(port(), raw, timeout=5)
        got = r.status if r else "no answer"
        if got != want:
            bad.append("%s: %s (want %s)" % (name, got, want))
        elif want >= 400 and H.openai_error_shape(r) is not None:
            bad.append("%s: %s" % (name, H.openai_error_shape(r)))
    check(not bad, "; ".join(bad))
    n_ok = sum(1 for _, _, w in HYGIENE if w == 200)
    after = requests_seen()
    check(after - before == n_ok, "%d requests reached the upstream, want %d", after - before, n_ok)


def _wait_closed(sock, timeout):
    """Seconds until the peer closes SOCK (EOF or reset), or None."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    got = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            d = sock.recv(4096)
        except socket.timeout:
            break
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0, got
        if not d:
            return time.monotonic() - t0, got
        got += d
    return None, got


def t_header_timeout_silent():
    s = socket.create_connection(("127.0.0.1", port()), timeout=5)
    try:
        dt, got = _wait_closed(s, HEADER_TIMEOUT_S + 4)
    finally:
        s.close()
    check(dt is not None, "a silent client was not disconnected within %.0fs", HEADER_TIMEOUT_S + 4)
    check(dt >= HEADER_TIMEOUT_S * 0.5, "disconnected too early (%.2fs)", dt)


def t_header_timeout_slowloris():
    s = socket.create_connection(("127.0.0.1", port()), timeout=5)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        closed = None
        # one header line every 300 ms: each byte resets a naive idle timer
        while time.monotonic() - t0 < HEADER_TIMEOUT_S + 4:
            try:
                s.sendall(b"X-Slow-%d: y\r\n" % int((time.monotonic() - t0) * 1000))
            except OSError:
                closed = time.monotonic() - t0
                break
            s.settimeout(0.3)
            try:
                d = s.recv(4096)
                if not d:
                    closed = time.monotonic() - t0
                    break
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed = time.monotonic() - t0
                break
    finally:
        s.close()
    check(closed is not None, "a client trickling its head was not cut within %.0fs",
          HEADER_TIMEOUT_S + 4)


def t_still_serving():
    r = H.request(port(), "GET", "/healthz")
    check(r.status == 200, "healthz %s", r.status)
    r = H.request(port(), "POST", "/v1/chat/completions", body=chat_body("still here"))
    check(r.status == 200, "chat %s", r.status)


def t_stop_limits():
    d = P["dsgate"]
    rc = d.stop(15.0)
    log = d.log_text()
    for pat in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer"):
        check(pat not in log, "%r in %s", pat, d.log_path)
    check(rc == 0, "dsgate exited %s after SIGTERM (log %s)", rc, d.log_path)


# ---------------------------------------------------------------- raw pair

RAW_BODY = b'{"ok":true,"from":"raw"}'
RAW_ANSWER = {                   # every header sent as it is, hop-by-hop ones included
    "headers": [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(RAW_BODY))),
        ("Connection", "close, X-Hop-Resp"),
        ("X-Hop-Resp", "must-not-pass"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("Proxy-Authenticate", 'Basic realm="x"'),
        ("Proxy-Connection", "keep-alive"),
        ("Trailer", "X-Some-Trailer"),
        ("Upgrade", "h2c"),
        ("X-End-To-End", "kept"),
    ],
    "body": RAW_BODY,
}


def t_hop_by_hop_response_raw():
    r = H.request(P["raw_dsgate"].port, "GET", "/v1/raw", headers={"Connection": "keep-alive"})
    check(r.status == 200, "status %s body %r", r.status, r.body[:200])
    check(r.body == RAW_BODY, "body %r", r.body)
    check(r.header("x-end-to-end") == "kept", "end-to-end header lost")
    bad = [n for n in ("x-hop-resp", "keep-alive", "proxy-authenticate", "proxy-connection",
                       "trailer", "upgrade") if r.header(n) is not None]
    conn = r.header("connection") or ""
    if "x-hop-resp" in conn.lower():
        bad.append("connection: " + conn)
    check(not bad, "hop-by-hop response headers passed back: %s", bad)
    # the upstream saw its own Host
    head = P["raw"].requests[-1].head if P["raw"].requests else ""
    want = "host: 127.0.0.1:%d" % P["raw"].port
    check(want in head.lower(), "upstream saw head %r", head[:300])


def t_502_unreachable():
    P["raw"].close()
    t0 = time.monotonic()
    r = H.request(P["raw_dsgate"].port, "POST", "/v1/chat/completions",
                  body=chat_body("anyone there"), timeout=10)
    dt = time.monotonic() - t0
    check(r.status == 502, "status %s body %r", r.status, r.body[:200])
    check(H.openai_error_shape(r) is None, "502 %s", H.openai_error_shape(r))
    check(dt < 4, "502 after %.1fs", dt)
    st = H.sse_request(P["raw_dsgate"].port, chat_body("anyone there", stream=True), timeout=10)
    check(st.resp is not None and st.resp.status == 502, "stream: status %s (%s)",
          st.resp and st.resp.status, st.error)
    r = H.request(P["raw_dsgate"].port, "GET", "/healthz")
    check(r.status == 200, "healthz %s after 502", r.status)


def t_stop_raw():
    d = P["raw_dsgate"]
    rc = d.stop(15.0)
    log = d.log_text()
    for pat in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer"):
        check(pat not in log, "%r in %s", pat, d.log_path)
    check(rc == 0, "dsgate exited %s after SIGTERM (log %s)", rc, d.log_path)


LIMITS_TESTS = [
    ("authorization_forwarded_without_key", t_auth_forwarded_without_key),
    ("error_413_body_too_large", t_413),
    ("error_413_chunked_body_too_large", t_413_chunked),
    ("error_431_headers_too_large", t_431),
    ("error_400_invalid_json", t_400_invalid_json),
    ("error_400_bad_priority", t_400_bad_priority),
    ("error_504_upstream_never_answers", t_504_never),
    ("error_504_keepalive_only_nonstream", t_504_keepalive_nonstream),
    ("error_504_keepalive_only_stream", t_504_keepalive_stream),
    ("first_data_ends_at_first_data", t_first_data_only_until_data),
    ("request_line_hygiene", t_request_line_hygiene),
    ("header_timeout_silent_client", t_header_timeout_silent),
    ("header_timeout_slowloris", t_header_timeout_slowloris),
    ("limits_still_serving", t_still_serving),
    ("limits_sigterm_exit_0_no_sanitizer", t_stop_limits),
]

RAW_TESTS = [
    ("hop_by_hop_response_headers_stripped", t_hop_by_hop_response_raw),
    ("error_502_upstream_unreachable", t_502_unreachable),
    ("raw_sigterm_exit_0_no_sanitizer", t_stop_raw),
]


def _setup_limits():
    P["fake"] = H.Fake(name="limits")
    P["dsgate"] = H.Dsgate(
        tag="limits", upstream_url=P["fake"].url,
        api_key_env="DSGATE_IT_UNSET_KEY_VARIABLE",
        timeouts={"connect": "1s", "first_data": "1s", "idle": "5s"},
        limits={"max_body": "1KB", "max_headers": "8KB", "header_timeout": "1s",
                "body_timeout": "2s", "idle_timeout": "2s"})


def _setup_raw():
    P["raw"] = H.ScriptedUpstream(RAW_ANSWER)
    P["raw_dsgate"] = H.Dsgate(tag="raw", upstream_url=P["raw"].url,
                               timeouts={"connect": "1s", "first_data": "2s"})


def main():
    return H.main("test_errors", [
        H.Pair(LIMITS_TESTS, _setup_limits, P, "dsgate",
               final={"limits_sigterm_exit_0_no_sanitizer"}),
        H.Pair(RAW_TESTS, _setup_raw, P, "raw_dsgate", final={"raw_sigterm_exit_0_no_sanitizer"}),
    ])


if __name__ == "__main__":
    sys.exit(main())
