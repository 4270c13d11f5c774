#!/usr/bin/env python3
"""
test_dialect: the Anthropic Messages dialect (paths under /anthropic/ and
/v1/messages) through the real daemon, against a scripted upstream that
answers as DeepSeek's Anthropic API does:

  * streams ending with message_stop (with and without DeepSeek's trailing
    data: [DONE]) are cached and replayed byte for byte as Anthropic SSE;
    a stream cut before message_stop is not; non-stream messages are;
  * usage: dsgate_tokens_total kinds prompt/completion/prompt_cache_hit/
    prompt_cache_write from message_start + message_delta and from a
    non-stream usage object; the access log's tokens_* fields;
  * 529 overloaded_error is retried by default (and with a retry.on that
    lists 503 but not 529); with neither listed it goes back unchanged;
  * dsgate's own errors are Anthropic-shaped on this path ({"type":"error",
    "error":{"type":...}}: invalid JSON, unknown client token, bad
    X-Priority, queue full, upstream unreachable) and stay OpenAI-shaped on
    the OpenAI path; a stream broken after data ends with an Anthropic
    `event: error`;
  * dsgate's own keep-alives on a stream are `event: ping` events;
  * an upstream that does not take the dialect (upstreams[].dialects, and
    the default for a non-DeepSeek host) gets no Anthropic request: 404
    not_found_error in the Anthropic shape; the OpenAI path still works;
  * count_tokens is answered at once while the only slot is busy and the
    queue full, and is not cached;
  * a models alias renames claude-* names upstream and back in the answer
    (non-stream body, message_start.message.model of a stream);
  * a client token in x-api-key gives its class (no X-Priority needed) and
    is replaced by dsgate's key upstream; X-Priority works on the path.

After each test dsgate must have no sanitizer line in its log and exit 0
on SIGTERM.  About 15 s.  `test_dialect.py NAME...` runs only those tests.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402

STARTED = []
DSGATES = []
MSGS = "/anthropic/v1/messages"
COUNT = "/anthropic/v1/messages/count_tokens"
SSE_CT = ("Content-Type", "text/event-stream; charset=utf-8")
JSON_CT = ("Content-Type", "application/json")


# ---------------------------------------------------------------- answers as DeepSeek writes them

def ev(name, obj):
    return ("event: %s\ndata: %s\n\n" % (name, json.dumps(obj, separators=(",", ":")))).encode()


def anth_stream(text, model="deepseek-v4-pro", done=True, stop=True, usage=None):
    """An Anthropic Messages stream, in pieces (one event each)."""
    u = usage or {"input_tokens": 21, "output_tokens": 1, "cache_read_input_tokens": 8,
                  "cache_creation_input_tokens": 3}
    out = [
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": u}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        ev("ping", {"type": "ping"}),
    ]
    for piece in (text[:len(text) // 2], text[len(text) // 2:]):
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": piece}}))
    out.append(ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(ev("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                    "usage": {"output_tokens": 17}}))
    if stop:
        out.append(ev("message_stop", {"type": "message_stop"}))
        if done:
            out.append(b"data: [DONE]\n\n")
    return out


def anth_message(text, model="deepseek-v4-pro"):
    return json.dumps({
        "id": "msg_2", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 6, "cache_read_input_tokens": 100,
                  "cache_creation_input_tokens": 0}}, separators=(",", ":")).encode()


def overloaded(status=529):
    return {"status": status, "headers": [JSON_CT], "body": json.dumps(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}).encode()}


def answer(req, **kw):
    """The upstream's answer to REQ: a stream or a message echoing its model."""
    try:
        body = json.loads(req.body or b"{}")
    except ValueError:
        body = {}
    if req.path.endswith("/count_tokens"):
        return {"headers": [JSON_CT], "body": b'{"input_tokens":42}'}
    model = body.get("model", "deepseek-v4-pro")
    text = "echo: " + str(body.get("messages", [{}])[-1].get("content", ""))
    if body.get("stream"):
        return {"headers": [SSE_CT], "body": anth_stream(text, model, **kw), "framing": "chunked"}
    return {"headers": [JSON_CT], "body": anth_message(text, model)}


def msg_body(content, stream=False, model="claude-sonnet-4-5"):
    b = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


# ---------------------------------------------------------------- processes

def config(port, url, dialects="[openai, anthropic]", cache=True, attempts=3, retry_on=None,
           max_inflight=16, max_queued=100, upstream_extra=(), extra=(), key_env=None,
           keepalive="{after: 0, every: 1s}"):
    lines = ["# written by tests/integration/test_dialect.py",
             "listen: 127.0.0.1:%d" % port, "upstreams:"]
    lines += H.upstream_yaml("up", url, max_inflight)
    if dialects is not None:
        lines.append("    dialects: %s" % dialects)
    if key_env:
        lines.append("    api_key_env: %s" % key_env)
    lines += list(upstream_extra)
    lines += ["queue: {max_queued: %d, max_wait: 10s}" % max_queued,
              "retry:", "  max_attempts: %d" % attempts, "  base: 20ms", "  cap: 100ms"]
    if retry_on is not None:
        lines.append("  on: %s" % retry_on)
    lines += ["cache:", "  enabled: %s" % ("true" if cache else "false"),
              "keepalive: %s" % keepalive,
              "shutdown_timeout: 3s", "log: {level: info, format: json}"]
    lines += list(extra)
    return "\n".join(lines) + "\n"


def dsgate(url, tag, env=None, **cfg):
    return H.start_dsgate(lambda port: config(port, url, **cfg), "dialect-" + tag,
                          STARTED, DSGATES, env=env)


def scripted(script):
    return H.start_scripted(STARTED, script)


def post(d, path, body, headers=None, timeout=10.0):
    hs = [("Content-Type", "application/json"), ("anthropic-version", "2023-06-01")]
    hs += list((headers or {}).items())
    return H.request(d.port, "POST", path, hs, body, timeout=timeout)


def anth_error(r, status, etype):
    """R is STATUS with an Anthropic error body of type ETYPE; returns its message."""
    check(r.status == status, "status %s, want %s: %r", r.status, status, r.body[:300])
    j = json.loads(r.body)
    check(j.get("type") == "error" and set(j) == {"type", "error"},
          "not an Anthropic error: %r", r.body[:300])
    check(j["error"].get("type") == etype, "error type %r, want %r: %r",
          j["error"].get("type"), etype, r.body[:300])
    check(isinstance(j["error"].get("message"), str) and j["error"]["message"],
          "no message: %r", r.body)
    return j["error"]["message"]


def tokens(d, kind):
    for name, labels, v in H.scrape(d.port):
        if name == "dsgate_tokens_total" and labels.get("kind") == kind:
            return v
    return 0.0


# ---------------------------------------------------------------- tests

def t_stream_cached():
    up = scripted(lambda req: answer(req))
    d = dsgate(up.url, "stream-cached")
    body = msg_body(H.test_id("s-"), stream=True)
    a = H.sse_request(d.port, body, path=MSGS)
    check(a.resp.status == 200 and a.resp.header("X-Cache") == "MISS", "first: %s %s",
          a.resp.status, a.resp.header("X-Cache"))
    names = [e["event"] for e in a.events]
    check(names[0] == "message_start" and "message_stop" in names, "events %r", names)
    b = H.sse_request(d.port, body, path=MSGS)
    check(b.resp.status == 200 and b.resp.header("X-Cache") == "HIT", "second: %s %s",
          b.resp.status, b.resp.header("X-Cache"))
    check(b.raw == a.raw, "replay differs:\n%r\n%r", b.raw[:300], a.raw[:300])
    check(b.resp.header("Content-Type").startswith("text/event-stream"), "replay type %r",
          b.resp.header("Content-Type"))
    check(len(up.requests) == 1, "upstream called %d times", len(up.requests))
    # without DeepSeek's trailing [DONE] too
    up.script = lambda req: answer(req, done=False)
    body = msg_body(H.test_id("s-"), stream=True)
    H.sse_request(d.port, body, path=MSGS)
    c = H.sse_request(d.port, body, path=MSGS)
    check(c.resp.header("X-Cache") == "HIT", "no [DONE]: second %s", c.resp.header("X-Cache"))
    check(len(up.requests) == 2, "upstream called %d times", len(up.requests))
    # a stream that ends before message_stop is never stored
    up.script = lambda req: answer(req, stop=False)
    body = msg_body(H.test_id("s-"), stream=True)
    H.sse_request(d.port, body, path=MSGS)
    c = H.sse_request(d.port, body, path=MSGS)
    check(c.resp.header("X-Cache") == "MISS", "cut stream: second %s", c.resp.header("X-Cache"))
    check(len(up.requests) == 4, "upstream called %d times", len(up.requests))
    H.check_healthy(d)


def t_nonstream_cached_and_usage():
    up = scripted(lambda req: answer(req))
    d = dsgate(up.url, "nonstream")
    body = msg_body(H.test_id("n-"))
    r1 = post(d, MSGS, body)
    r2 = post(d, MSGS, body)
    check(r1.status == 200 and r1.header("X-Cache") == "MISS", "first %s %s", r1.status,
          r1.header("X-Cache"))
    check(r2.header("X-Cache") == "HIT" and r2.body == r1.body, "second %s", r2.header("X-Cache"))
    check(len(up.requests) == 1, "upstream called %d times", len(up.requests))
    check(tokens(d, "prompt") == 12 and tokens(d, "completion") == 6 and
          tokens(d, "prompt_cache_hit") == 100, "tokens %r",
          [tokens(d, k) for k in ("prompt", "completion", "prompt_cache_hit")])
    # a stream: input from message_start, the final output from message_delta
    H.sse_request(d.port, msg_body(H.test_id("n-"), stream=True), path=MSGS)
    check(tokens(d, "prompt") == 12 + 21, "prompt %s", tokens(d, "prompt"))
    check(tokens(d, "completion") == 6 + 17, "completion %s", tokens(d, "completion"))
    check(tokens(d, "prompt_cache_hit") == 100 + 8, "hit %s", tokens(d, "prompt_cache_hit"))
    check(tokens(d, "prompt_cache_write") == 3, "write %s", tokens(d, "prompt_cache_write"))
    acc = H.wait_access(d, 3, MSGS)
    last = acc[-1]
    check(last["tokens_prompt"] == 21 and last["tokens_completion"] == 17 and
          last["tokens_cache_hit"] == 8, "access log %r", last)
    H.check_healthy(d)


def t_529_retried():
    def script(req):
        return overloaded() if req.n % 2 == 0 else answer(req)
    up = scripted(script)
    d = dsgate(up.url, "529", cache=False)
    r = post(d, MSGS, msg_body("x"))
    check(r.status == 200 and r.header("X-Dsgate-Attempts") == "2", "default: %s attempts %s",
          r.status, r.header("X-Dsgate-Attempts"))
    # retry.on lists 503, not 529: on this path 529 is the same busy signal
    d = dsgate(up.url, "529-503", cache=False, retry_on="[503, connect]")
    r = post(d, MSGS, msg_body("y"))
    check(r.status == 200 and r.header("X-Dsgate-Attempts") == "2", "on [503]: %s attempts %s",
          r.status, r.header("X-Dsgate-Attempts"))
    # neither: the upstream's answer goes back unchanged
    d = dsgate(up.url, "529-off", cache=False, retry_on="[429]")
    r = post(d, MSGS, msg_body("z"))
    check(r.status == 529 and json.loads(r.body)["error"]["type"] == "overloaded_error",
          "on [429]: %s %r", r.status, r.body[:200])
    H.check_healthy(d)


def t_own_errors_shaped():
    up = scripted(lambda req: answer(req))
    d = dsgate(up.url, "errors", max_queued=0, max_inflight=1)
    m = anth_error(post(d, MSGS, b'{"model":"x","messages":['), 400, "invalid_request_error")
    check("JSON" in m, "message %r", m)
    anth_error(post(d, MSGS, msg_body("p"), {"X-Priority": "urgent"}), 400,
               "invalid_request_error")
    anth_error(post(d, "/v1/messages", b"[1,2", {}), 400, "invalid_request_error")
    # the OpenAI path keeps OpenAI errors
    r = post(d, H.CHAT, b'{"model":')
    check(r.status == 400 and "error" in json.loads(r.body) and
          json.loads(r.body)["error"].get("code") == "invalid_json", "openai %r", r.body[:200])
    # queue full (max_queued 0, the slot taken): 429 rate_limit_error
    up.script = lambda req: dict(answer(req), delay_ms=1500)
    slow = H.Pending(d.port, msg_body(H.test_id("q-")), path=MSGS)
    time.sleep(0.3)
    anth_error(post(d, MSGS, msg_body(H.test_id("q-"))), 429, "rate_limit_error")
    slow.wait()
    # upstream unreachable: 502, an Anthropic api_error
    port = H.free_port()
    d = dsgate("http://127.0.0.1:%d" % port, "unreachable", attempts=1)
    anth_error(post(d, MSGS, msg_body("u")), 502, "api_error")
    # unknown client token (clients configured): 401 authentication_error
    d = dsgate(up.url, "clients", env={"DIALECT_T1": "tok-one"},
               extra=["clients:", "  - {token_env: DIALECT_T1, priority: high}"])
    anth_error(post(d, MSGS, msg_body("c"), {"x-api-key": "wrong"}), 401, "authentication_error")
    H.check_healthy(d)


def t_stream_error_event():
    pieces = anth_stream("broken answer")[:4]
    up = scripted({"headers": [SSE_CT], "body": pieces, "framing": "chunked",
                   "action": "reset", "at": 4})
    d = dsgate(up.url, "stream-error", attempts=1)
    st = H.sse_request(d.port, msg_body("b", stream=True), path=MSGS)
    errs = [e for e in st.events if e["event"] == "error"]
    check(errs, "no error event: %r", st.raw[-300:])
    j = json.loads(errs[-1]["data"])
    check(j.get("type") == "error" and j["error"].get("type") in ("api_error", "overloaded_error"),
          "error event %r", errs[-1]["data"])
    check(st.events[0]["event"] == "message_start", "first event %r", st.events[0])
    H.check_healthy(d)


def t_keepalive_ping():
    up = scripted(lambda req: dict(answer(req), delay_ms=1200))
    d = dsgate(up.url, "ping", cache=False, keepalive="{after: 200ms, every: 300ms}")
    st = H.sse_request(d.port, msg_body("k", stream=True), path=MSGS)
    check(st.resp.status == 200, "status %s", st.resp.status)
    pings = [e for e in st.events if e["event"] == "ping" and e["data"] == '{"type": "ping"}']
    check(len(pings) >= 2, "dsgate's pings: %d; %r", len(pings), st.raw[:400])
    check(b": keep-alive" not in st.raw, "an OpenAI keep-alive on the Anthropic path")
    names = [e["event"] for e in st.events if e["event"] not in ("ping", None)]
    check(names[0] == "message_start" and names[-1] == "message_stop", "events %r", names)
    # a non-stream answer after dsgate's head: blank lines, then the message
    r = post(d, MSGS, msg_body("k2"))
    check(r.status == 200 and json.loads(r.body)["type"] == "message", "non-stream %s %r",
          r.status, r.body[:200])
    # an upstream error after dsgate's head: an Anthropic event: error
    up.script = lambda req: dict(overloaded(400), delay_ms=800)
    st = H.sse_request(d.port, msg_body("k3", stream=True), path=MSGS)
    errs = [e for e in st.events if e["event"] == "error"]
    check(errs and json.loads(errs[-1]["data"])["type"] == "error", "late error %r", st.raw[-300:])
    H.check_healthy(d)


def t_dialect_not_served():
    up = scripted(lambda req: answer(req))
    for tag, dialects in (("listed", "[openai]"), ("default", None)):
        d = dsgate(up.url, "not-served-" + tag, dialects=dialects)
        m = anth_error(post(d, MSGS, msg_body("n")), 404, "not_found_error")
        check("dialects" in m, "message %r", m)
        anth_error(post(d, COUNT, msg_body("n")), 404, "not_found_error")
        r = post(d, H.CHAT, H.chat_body("openai still"))
        check(r.status == 200, "openai path: %s", r.status)
    check(all(not r.path.startswith("/anthropic") for r in up.requests),
          "an Anthropic request went upstream: %r", [r.path for r in up.requests])
    acc = [a for a in H.access_lines(d, MSGS)]
    check(acc and acc[-1]["end"] == "no_dialect", "access log %r", acc[-1:])


def t_count_tokens_cheap():
    def script(req):
        if req.path.endswith("/count_tokens"):
            return answer(req)
        return dict(answer(req), delay_ms=2500)
    up = scripted(script)
    d = dsgate(up.url, "count", max_inflight=1, max_queued=1)
    busy = H.Pending(d.port, msg_body(H.test_id("c-")), path=MSGS)
    time.sleep(0.3)
    queued = H.Pending(d.port, msg_body(H.test_id("c-")), path=MSGS)
    time.sleep(0.2)
    t0 = time.monotonic()
    r = post(d, COUNT, msg_body("count me"), {"X-Priority": "low"})
    dt = time.monotonic() - t0
    check(r.status == 200 and json.loads(r.body) == {"input_tokens": 42}, "count: %s %r",
          r.status, r.body)
    check(dt < 1.0, "count_tokens took %.2fs behind completions", dt)
    check(r.header("X-Cache") is None, "count_tokens X-Cache %r", r.header("X-Cache"))
    r2 = post(d, COUNT, msg_body("count me"))
    check(r2.status == 200, "second count %s", r2.status)
    ups = [q for q in up.requests if q.path == COUNT]
    check(len(ups) == 2, "count_tokens upstream calls %d (not cached)", len(ups))
    check(ups[0].header("X-Priority") is None, "X-Priority went upstream")
    check(busy.wait().status == 200 and queued.wait().status == 200, "completions")
    H.check_healthy(d)


def t_alias():
    up = scripted(lambda req: answer(req))
    d = dsgate(up.url, "alias", cache=False,
               upstream_extra=["    models: {claude-sonnet-4-5: deepseek-v4-pro, "
                               "claude-haiku-4-5: deepseek-v4-flash}"])
    r = post(d, MSGS, msg_body("a", model="claude-haiku-4-5"))
    check(r.status == 200 and json.loads(r.body)["model"] == "claude-haiku-4-5",
          "non-stream model %r", r.body[:200])
    check(json.loads(up.requests[-1].body)["model"] == "deepseek-v4-flash",
          "upstream got %r", up.requests[-1].body[:120])
    st = H.sse_request(d.port, msg_body("a", stream=True), path=MSGS)
    start = json.loads(st.events[0]["data"])
    check(start["message"]["model"] == "claude-sonnet-4-5", "message_start %r", start)
    check(json.loads(up.requests[-1].body)["model"] == "deepseek-v4-pro",
          "upstream got %r", up.requests[-1].body[:120])
    anth_error(post(d, MSGS, msg_body("a", model="claude-opus-9")), 404, "not_found_error")
    H.check_healthy(d)


def t_client_token_x_api_key():
    up = scripted(lambda req: answer(req))
    d = dsgate(up.url, "x-api-key", cache=False, key_env="DIALECT_UPKEY",
               env={"DIALECT_T1": "tok-one", "DIALECT_UPKEY": "sk-up"},
               extra=["clients:", "  - {token_env: DIALECT_T1, priority: low}"])
    r = post(d, MSGS, msg_body("t"), {"x-api-key": "tok-one"})
    check(r.status == 200, "x-api-key token: %s %r", r.status, r.body[:200])
    u = up.requests[-1]
    check(u.header("x-api-key") is None, "the client token went upstream")
    check(u.header("Authorization") == "Bearer sk-up", "upstream Authorization %r",
          u.header("Authorization"))
    r = post(d, MSGS, msg_body("t2"), {"Authorization": "Bearer tok-one"})
    check(r.status == 200, "bearer token: %s", r.status)
    acc = H.wait_access(d, 2, MSGS)
    check(all(a["priority"] == "low" for a in acc), "priorities %r", [a["priority"] for a in acc])
    # X-Priority on this path: within the client's class, not forwarded
    r = post(d, MSGS, msg_body("t3"), {"x-api-key": "tok-one", "X-Priority": "high"})
    check(r.status == 200 and up.requests[-1].header("X-Priority") is None, "X-Priority")
    check(H.wait_access(d, 3, MSGS)[-1]["priority"] == "low", "a header raised the class")
    # the OpenAI path does not read x-api-key
    r = post(d, H.CHAT, H.chat_body("o"), {"x-api-key": "tok-one"})
    check(r.status == 401 and "error" in json.loads(r.body), "openai x-api-key: %s", r.status)
    H.check_healthy(d)


TESTS = [
    ("stream_cached", t_stream_cached),
    ("nonstream_cached_and_usage", t_nonstream_cached_and_usage),
    ("529_retried", t_529_retried),
    ("own_errors_shaped", t_own_errors_shaped),
    ("stream_error_event", t_stream_error_event),
    ("keepalive_ping", t_keepalive_ping),
    ("dialect_not_served", t_dialect_not_served),
    ("count_tokens_cheap", t_count_tokens_cheap),
    ("alias", t_alias),
    ("client_token_x_api_key", t_client_token_x_api_key),
]

after_each = H.sanitizer_after_each(DSGATES)


def main():
    return H.main("test_dialect", TESTS, started=STARTED, after_each=after_each,
                  require=[(H.DSGATE, "build/asan/dsgate")])


if __name__ == "__main__":
    sys.exit(main())
