#!/usr/bin/env python3
"""
test_anthropic: the Anthropic Messages path (/anthropic/... and
/v1/messages) as a first-class citizen (issue 15), through the real daemon
against build/fake_upstream's Anthropic endpoint (tests/fake/README.md).

What the path's dialect decides, checked by behaviour:

  * dsgate's own errors (400 bad JSON / bad X-Priority, 413, 429 queue full,
    504 queue wait) on Anthropic paths are Anthropic-shaped
    {"type":"error","error":{"type","message"}} with the same status as on
    the OpenAI path (which stays OpenAI-shaped);
  * keep-alives of a held Anthropic stream are `event: ping` +
    `data: {"type": "ping"}`, never `: keep-alive` comments; an SSE error
    event after the head is `event: error` with Anthropic JSON;
  * /anthropic/v1/messages and /v1/messages are in the default cache.paths:
    non-stream and stream answers (with and without DeepSeek's trailing
    data: [DONE]) are cached and replayed; a cut stream is not stored;
  * 529 is retried by default;
  * count_tokens is passed through and never queued behind completions;
  * usage (input_tokens, output_tokens over message_start and
    message_delta) reaches dsgate_tokens_total and the access log;
  * x-api-key scopes the cache (unless cache.shared);
  * upstreams[].dialects: an upstream listing only openai never gets an
    Anthropic request; none taking it: 404 in Anthropic's shape; an upstream
    that is not api.deepseek.com takes only openai by default;
  * models aliases rewrite Anthropic bodies; X-Priority orders this path too.

Shared dsgates: "main" (cache on with the default paths, 3 quick attempts,
keepalive {after: 400ms, every: 300ms}, max_body 64KB) and "queue" (one
request at a time upstream, max_queued 2, max_wait 1s, no keep-alives);
the tests of other configs start their own.  The shared dsgates' upstream
lists dialects [openai, anthropic] when the dsgate under test knows the key.
`test_anthropic.py NAME...` runs only those tests.
"""

import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402

CHAT = "/v1/chat/completions"
MSGS = "/anthropic/v1/messages"
MSGS2 = "/v1/messages"
COUNT = "/anthropic/v1/messages/count_tokens"
COUNT2 = "/v1/messages/count_tokens"
KEY_A = "sk-ant-it-key-a"
KEY_B = "sk-ant-it-key-b"

P = {}              # the shared fake and dsgates
STARTED = []        # what one test started for itself, stopped after it
ANSWER_TYPES = ["message_start", "content_block_start"] + ["content_block_delta"] * 5 + [
    "content_block_stop", "message_delta", "message_stop"]


def tid():
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- requests

def anth_body(text, stream=False, model="deepseek-chat", **more):
    b = {"model": model, "max_tokens": 256, "messages": [{"role": "user", "content": text}]}
    if stream:
        b["stream"] = True
    b.update(more)
    return b


def anth_headers(t=None, key=KEY_A, more=None, ctype=True):
    """CTYPE False: without Content-Type (H.Pending adds its own)."""
    hs = [("Content-Type", "application/json")] if ctype else []
    hs.append(("anthropic-version", "2023-06-01"))
    if key:
        hs.append(("x-api-key", key))
    if t:
        hs.append(("X-Test-Id", t))
    return hs + list(more or [])


def post(port, path, body, t=None, key=KEY_A, more=None, timeout=10.0):
    """POST BODY (dict, or bytes sent as they are) with Anthropic headers."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return H.request(port, "POST", path, anth_headers(t, key, more), raw, timeout=timeout)


def stream(port, path, body, t=None, key=KEY_A, more=None, timeout=10.0):
    return H.sse_request(port, body, anth_headers(t, key, more), timeout=timeout, path=path)


def anthropic_error(resp, status, etype=None):
    """RESP is STATUS with an Anthropic-shaped JSON error body (type ETYPE
    when given); returns its error object."""
    check(resp.status == status, "status %s, want %s: %r", resp.status, status, resp.body[:300])
    ct = (resp.header("content-type") or "").lower()
    check("application/json" in ct, "content-type %r", ct)
    try:
        j = resp.json()
    except ValueError:
        raise AssertionError("error body is not JSON: %r" % resp.body[:300])
    e = j.get("error") if isinstance(j, dict) else None
    check(isinstance(j, dict) and j.get("type") == "error" and isinstance(e, dict)
          and isinstance(e.get("type"), str) and e["type"]
          and isinstance(e.get("message"), str) and e["message"],
          "%d body is not Anthropic-shaped {\"type\":\"error\",\"error\":{\"type\",\"message\"}}: %r",
          status, resp.body[:300])
    if etype:
        check(e["type"] == etype, "error.type %r, want %r", e["type"], etype)
    return e


def openai_error(resp, status):
    check(resp.status == status, "OpenAI path: status %s, want %s: %r", resp.status, status,
          resp.body[:300])
    why = H.openai_error_shape(resp)
    check(why is None, "OpenAI path: %s", why)


def anthropic_error_event(ev):
    """EV is `event: error` with Anthropic JSON; returns its error object."""
    check(ev["event"] == "error", "last event is %r, not `event: error`: %r", ev["event"], ev)
    try:
        j = json.loads(ev["data"] or "")
    except ValueError:
        raise AssertionError("error event data is not JSON: %r" % ev["data"])
    e = j.get("error") if isinstance(j, dict) else None
    check(isinstance(j, dict) and j.get("type") == "error" and isinstance(e, dict)
          and isinstance(e.get("type"), str) and isinstance(e.get("message"), str),
          "error event data is not Anthropic-shaped: %r", ev["data"])
    return e


def types(st):
    return [e["event"] for e in st.events]


def text_of_stream(st):
    s = ""
    for e in st.events:
        if e["event"] == "content_block_delta":
            d = json.loads(e["data"]).get("delta") or {}
            if d.get("type") == "text_delta":
                s += d.get("text", "")
    return s


def fake_calls(t, f=None):
    return H.log_for(f or P["fake"], t)


def queue_depth(port):
    return sum(v for n, _, v in H.scrape(port) if n == "dsgate_queue_depth")


def metric(port, name, **labels):
    return sum(v for n, lb, v in H.scrape(port)
               if n == name and all(lb.get(k) == w for k, w in labels.items()))


# ---------------------------------------------------------------- configs

def upstream_lines(name, url, max_inflight=8, dialects="both", models=None):
    """DIALECTS: "both" (the line when the dsgate knows the key), None (no
    line: the default), or a list (the line, always)."""
    lines = [
        "  - name: %s" % name,
        "    url: %s" % H.yaml_quote(url),
        '    api_key_env: ""',
        "    max_inflight: %d" % max_inflight,
        "    adaptive: false",
        "    timeouts: {connect: 2s, first_data: 20s, idle: 20s, total: 0}",
    ]
    if dialects == "both":
        d = H.dialects_line()
        if d:
            lines.append(d)
    elif dialects is not None:
        lines.append("    dialects: [%s]" % ", ".join(dialects))
    if models:
        lines.append("    models: {%s}" % ", ".join(
            "%s: %s" % (H.yaml_quote(k), H.yaml_quote(v)) for k, v in models.items()))
    return lines


def config(port, ups, cache="{enabled: true}", retry="{max_attempts: 3, base: 50ms, cap: 200ms}",
           queue="{max_queued: 100, max_wait: 20s}", keepalive="{after: 0s}", extra=()):
    lines = ["# written by tests/integration/test_anthropic.py",
             "listen: 127.0.0.1:%d" % port, "upstreams:"]
    for u in ups:
        lines += u
    lines += ["queue: %s" % queue, "retry: %s" % retry, "cache: %s" % cache,
              "keepalive: %s" % keepalive, "shutdown_timeout: 3s",
              "log: {level: info, format: json}"]
    lines += list(extra)
    return "\n".join(lines) + "\n"


def dsgate(text_for, tag):
    """A dsgate of this test (stopped after it)."""
    return H.start_dsgate(text_for, tag, STARTED)


def _main_config(port):
    return config(port, [upstream_lines("fake", P["fake"].url)],
                  keepalive="{after: 400ms, every: 300ms}", extra=["limits: {max_body: 64KB}"])


def _queue_config(port):
    return config(port, [upstream_lines("fake", P["fake"].url, max_inflight=1)],
                  cache="{enabled: false}", retry="{max_attempts: 1}",
                  queue="{max_queued: 2, max_wait: 1s}")


SHARED_CONFIGS = {"main": _main_config, "queue": _queue_config}


def shared_dsgate(key):
    """The shared dsgate KEY, started on first use (again after a crash,
    which the test that saw it reported)."""
    if "fake" not in P:
        P["fake"] = H.Fake(name="anth")
    d = P.get(key)
    if d is None or not d.alive():
        port = H.free_port()
        P[key] = d = H.Dsgate(config_text=SHARED_CONFIGS[key](port), tag="anth-" + key, port=port)
    return d


def main_port():
    return shared_dsgate("main").port


def queue_port():
    return shared_dsgate("queue").port


def shared(fn):
    """FN, then: no shared dsgate died during it."""
    def run():
        try:
            fn()
        finally:
            for k in SHARED_CONFIGS:
                d = P.get(k)
                if d is not None and H.wait_until(lambda: not d.alive(), 0.1, 0.01):
                    raise AssertionError("dsgate %s died during this test (exit %s): %s; log %s"
                                         % (k, d.proc.returncode, d.crash_summary(), d.log_path))
    return run


def occupy(port, ms, path=MSGS):
    """A request that holds PORT's one upstream slot for MS ms (a Pending),
    once the fake has it."""
    t = tid()
    p = H.Pending(port, json.dumps(anth_body("occupant " + t)).encode(),
                  headers=anth_headers(t, more=[("X-Fake-Delay-Ms", str(ms))], ctype=False), path=path)
    check(P["fake"].find(t, timeout=3.0), "the occupying request did not reach the fake")
    return p


def wait_depth(port, n):
    check(H.wait_until(lambda: queue_depth(port) >= n, 3.0, 0.02),
          "dsgate_queue_depth did not reach %d (is %s)", n, queue_depth(port))


# ---------------------------------------------------------------- passthrough

def t_passthrough_nonstream():
    for path in (MSGS, MSGS2):
        t = tid()
        raw = json.dumps(anth_body("plain passthrough %s" % t), indent=1).encode()
        r = post(main_port(), path, raw, t)
        check(r.status == 200, "%s: status %s %r", path, r.status, r.body[:300])
        j = r.json()
        check(j.get("type") == "message" and j["content"][0]["text"] == "echo: plain passthrough %s" % t,
              "%s: answer %r", path, r.body[:300])
        e = P["fake"].find(t)
        check(e is not None, "%s: not at the fake", path)
        check(e["path"] == path, "the fake saw path %r", e["path"])
        check(e["body"].encode() == raw, "%s: body not byte-identical: %r", path, e["body"][:200])
        hs = e["headers"]
        check(hs.get("x-api-key") == KEY_A and hs.get("anthropic-version") == "2023-06-01",
              "%s: the fake saw x-api-key %r anthropic-version %r", path, hs.get("x-api-key"),
              hs.get("anthropic-version"))


def t_passthrough_stream():
    t = tid()
    st = stream(main_port(), MSGS, anth_body("stream passthrough " + t, stream=True), t)
    check(st.error is None and st.resp.status == 200, "stream: %s %r", st.error, st.resp)
    check(types(st) == ANSWER_TYPES, "events %r", types(st))
    for e in st.events:
        check(json.loads(e["data"])["type"] == e["event"], "event %r data %r", e["event"], e["data"])
    check(text_of_stream(st) == "echo: stream passthrough " + t, "text %r", text_of_stream(st))


# ---------------------------------------------------------------- dsgate's own errors

def t_own_400_413():
    port = main_port()
    for path in (MSGS, MSGS2):
        t = tid()
        r = post(port, path, b'{"model": "deepseek-chat", "messages": [', t)
        check(not fake_calls(t), "%s: a body that is not JSON went upstream (%s): dsgate did not "
              "read it as a cacheable completion", path, r.status)
        anthropic_error(r, 400, "invalid_request_error")
        anthropic_error(post(port, path, anth_body("bad priority"), more=[("X-Priority", "urgent")]),
                        400, "invalid_request_error")
        big = anth_body("x" * (100 * 1024))
        anthropic_error(post(port, path, big), 413, "request_too_large")
    openai_error(H.request(port, "POST", CHAT, [("Content-Type", "application/json")],
                           b'{"model": "deepseek-chat", "messages": ['), 400)
    openai_error(H.request(port, "POST", CHAT, [("Content-Type", "application/json")],
                           json.dumps(H.chat_request("x" * (100 * 1024))).encode()), 413)


def t_own_429_504():
    port = queue_port()
    occ = occupy(port, 2000)
    fillers = [H.Pending(port, json.dumps(anth_body("filler %d %s" % (i, tid()))).encode(),
                         headers=anth_headers(ctype=False), path=MSGS) for i in range(2)]
    wait_depth(port, 2)
    r = post(port, MSGS, anth_body("rejected " + tid()))
    anthropic_error(r, 429, "rate_limit_error")
    check(r.header("retry-after"), "429 without Retry-After")
    anthropic_error(post(port, MSGS2, anth_body("rejected " + tid())), 429, "rate_limit_error")
    openai_error(H.request(port, "POST", CHAT, [("Content-Type", "application/json")],
                           json.dumps(H.chat_request("rejected " + tid())).encode()), 429)
    for f in fillers:
        anthropic_error(f.wait(), 504)
    check(occ.wait().status == 200, "occupant %r", occ.resp)


# ---------------------------------------------------------------- keep-alives and SSE errors

def t_keepalive_ping():
    t = tid()
    st = stream(main_port(), MSGS, anth_body("held " + t, stream=True), t,
                more=[("X-Fake-First-Token-Ms", "1600")])
    check(st.error is None and st.resp.status == 200, "stream: %s %r", st.error, st.resp)
    check(st.comments == 0, "%d `:` comment keep-alives on an Anthropic stream: %r", st.comments,
          st.raw[:300])
    pings = [e for e in st.events if e["event"] == "ping"]
    rest = [e for e in st.events if e["event"] != "ping"]
    check(len(pings) >= 2, "%d ping events before the answer (keepalive after 400ms every 300ms): %r",
          len(pings), st.raw[:300])
    for e in pings:
        check(json.loads(e["data"] or "null") == {"type": "ping"}, "ping data %r", e["data"])
    check(rest and st.events.index(rest[0]) > st.events.index(pings[0]),
          "the pings did not come before the answer: %r", types(st))
    check([e["event"] for e in rest] == ANSWER_TYPES, "the answer's events %r", [e["event"] for e in rest])


def t_keepalive_openai_unchanged():
    t = tid()
    st = H.sse_request(main_port(), H.chat_request("held " + t, stream=True),
                       [("X-Test-Id", t), ("X-Fake-First-Token-Ms", "1000")])
    check(st.error is None and st.resp.status == 200, "stream: %s %r", st.error, st.resp)
    check(not any(e["event"] == "ping" for e in st.events), "ping events on the OpenAI path")
    check(st.events[-1]["data"] == "[DONE]", "OpenAI stream did not end with [DONE]")


def t_keepalive_nonstream_parses():
    t = tid()
    r = post(main_port(), MSGS, anth_body("held nonstream " + t), t,
             more=[("X-Fake-First-Token-Ms", "1000")])
    check(r.status == 200, "status %s", r.status)
    j = json.loads(r.body.decode().strip())
    check(j.get("type") == "message" and j["content"][0]["text"] == "echo: held nonstream " + t,
          "body %r", r.body[:300])


def t_sse_error_after_data():
    t = tid()
    st = stream(main_port(), MSGS, anth_body("cut " + t, stream=True), t,
                more=[("X-Fake-Reset-After", "4"), ("Cache-Control", "no-store")])
    check(st.resp is not None and st.resp.status == 200, "head %r (%s)", st.resp, st.error)
    check(st.events, "no events at all")
    check(types(st)[:4] == ANSWER_TYPES[:4], "events before the cut %r", types(st))
    anthropic_error_event(st.events[-1])
    for e in st.events:
        check(e["event"] is not None, "an event without `event:` (OpenAI-style error chunk?): %r", e)


def t_sse_error_after_early_head():
    t = tid()
    st = stream(main_port(), MSGS, anth_body("late 400 " + t, stream=True), t,
                more=[("X-Fake-Delay-Ms", "1200"), ("X-Fake-Status", "400")])
    check(st.resp is not None, "no answer (%s)", st.error)
    check(st.resp.status == 200, "status %s: no early head after keepalive.after 400ms (%r)",
          st.resp.status, st.raw[:200])
    check(any(e["event"] == "ping" for e in st.events), "no ping before the error: %r", st.raw[:300])
    e = anthropic_error_event(st.events[-1])
    check(e["type"] == "invalid_request_error", "error type %r", e["type"])


# ---------------------------------------------------------------- cache

def t_cache_nonstream():
    for path in (MSGS, MSGS2):
        t = tid()
        body = anth_body("cache me %s" % t)
        a = post(main_port(), path, body, t)
        b = post(main_port(), path, body, t)
        check(a.status == 200 and b.status == 200, "%s: statuses %s %s", path, a.status, b.status)
        n = len(fake_calls(t))
        check(n == 1, "%s: the fake saw %d calls, want 1 (X-Cache %s, %s)", path, n,
              a.header("x-cache"), b.header("x-cache"))
        check(a.header("x-cache") == "MISS" and b.header("x-cache") == "HIT",
              "%s: X-Cache %s, %s", path, a.header("x-cache"), b.header("x-cache"))
        check(a.body == b.body, "%s: replayed body differs", path)


def _cache_stream(done):
    t = tid()
    body = anth_body("cache this stream %s %s" % (t, done), stream=True)
    more = [("X-Fake-Anthropic-Done", "1" if done else "0")]
    a = stream(main_port(), MSGS, body, t, more=more)
    b = stream(main_port(), MSGS, body, t, more=more)
    check(a.error is None and b.error is None, "errors %s %s", a.error, b.error)
    want = ANSWER_TYPES + ([None] if done else [])
    check(types(a) == want, "first stream's events %r", types(a))
    n = len(fake_calls(t))
    check(n == 1, "the fake saw %d calls, want 1 (X-Cache %s, %s)", n, a.resp.header("x-cache"),
          b.resp.header("x-cache"))
    check(b.resp.header("x-cache") == "HIT", "second X-Cache %s", b.resp.header("x-cache"))
    check((b.resp.header("content-type") or "").startswith("text/event-stream"),
          "replay content-type %r", b.resp.header("content-type"))

    def evs(st):     # a trailing [DONE] may be kept or dropped by the replay
        return [(e["event"], e["data"]) for e in st.events if e["data"] != "[DONE]"]
    check(evs(a) == evs(b), "replayed events differ: %r", b.raw[:400])


def t_cache_stream():
    _cache_stream(False)


def t_cache_stream_trailing_done():
    _cache_stream(True)


def t_cache_cut_stream_not_stored():
    t = tid()
    body = anth_body("cut stream " + t, stream=True)
    for _ in range(2):
        stream(main_port(), MSGS, body, t, more=[("X-Fake-Truncate", "1")])
    n = len(fake_calls(t))
    check(n == 2, "the fake saw %d calls: a stream without message_stop was stored", n)


# ---------------------------------------------------------------- retries

def t_529_retried_by_default():
    main_port()
    f = P["fake"]
    t = tid()
    r = H.request(f.port, "POST", "/_config", body={"fail_next": 1, "fail_status": 529})
    check(r.status == 200, "/_config %s", r.status)
    try:
        r = post(main_port(), MSGS, anth_body("survive 529 " + t), t, more=[("Cache-Control", "no-store")])
    finally:
        H.request(f.port, "POST", "/_config", body={"fail_next": 0})
    calls = [e["status"] for e in fake_calls(t)]
    check(r.status == 200, "status %s (fake saw %r): 529 not retried: %r", r.status, calls, r.body[:200])
    check(calls == [529, 200], "fake saw %r", calls)
    check(r.header("x-dsgate-attempts") == "2", "X-Dsgate-Attempts %s", r.header("x-dsgate-attempts"))


# ---------------------------------------------------------------- count_tokens

def t_count_tokens_not_queued():
    port = queue_port()
    occ = occupy(port, 1500)
    fillers = [H.Pending(port, json.dumps(anth_body("filler %d %s" % (i, tid()))).encode(),
                         headers=anth_headers(ctype=False), path=MSGS) for i in range(2)]
    wait_depth(port, 2)
    for path in (COUNT, COUNT2):
        t = tid()
        t0 = time.monotonic()
        r = post(port, path, anth_body("count these tokens " + t), t)
        dt = time.monotonic() - t0
        check(r.status == 200, "%s behind a full queue: status %s %r", path, r.status, r.body[:200])
        check(dt < 0.5, "%s took %.2fs: it waited for the queue", path, dt)
        check(isinstance(r.json().get("input_tokens"), int), "%s: %r", path, r.body[:200])
        check(len(fake_calls(t)) == 1, "%s: not passed to the fake", path)
    for f in fillers:
        f.wait()
    occ.wait()


# ---------------------------------------------------------------- usage

def _tokens(port):
    return (metric(port, "dsgate_tokens_total", upstream="fake", kind="prompt"),
            metric(port, "dsgate_tokens_total", upstream="fake", kind="completion"))


def t_usage_nonstream():
    port = main_port()
    n = len(H.access_lines(shared_dsgate("main"), MSGS))
    p0, c0 = _tokens(port)
    r = post(port, MSGS, anth_body("count my usage please, %s" % ("word " * 40)),
             more=[("Cache-Control", "no-store")])
    check(r.status == 200, "status %s", r.status)
    u = r.json()["usage"]
    acc = H.wait_access(shared_dsgate("main"), n + 1, MSGS)[-1]
    check(acc.get("tokens_prompt") == u["input_tokens"] and
          acc.get("tokens_completion") == u["output_tokens"],
          "access log tokens %s/%s, the answer's usage %r", acc.get("tokens_prompt"),
          acc.get("tokens_completion"), u)
    p1, c1 = _tokens(port)
    check((p1 - p0, c1 - c0) == (u["input_tokens"], u["output_tokens"]),
          "dsgate_tokens_total grew by prompt %s completion %s, usage %r", p1 - p0, c1 - c0, u)


def t_usage_stream():
    port = main_port()
    n = len(H.access_lines(shared_dsgate("main"), MSGS))
    p0, c0 = _tokens(port)
    st = stream(port, MSGS, anth_body("count my streamed usage, %s" % ("word " * 40), stream=True),
                more=[("Cache-Control", "no-store")])
    check(st.error is None and types(st) == ANSWER_TYPES, "stream %s %r", st.error, types(st))
    start = json.loads(st.events[0]["data"])["message"]["usage"]
    delta = json.loads(st.events[-2]["data"])["usage"]
    want = (start["input_tokens"], delta["output_tokens"])     # message_delta's count is the final one
    check(want[1] > 1, "fake output_tokens %r", delta)
    acc = H.wait_access(shared_dsgate("main"), n + 1, MSGS)[-1]
    check((acc.get("tokens_prompt"), acc.get("tokens_completion")) == want,
          "access log tokens %s/%s, want %s/%s (message_start input, message_delta output)",
          acc.get("tokens_prompt"), acc.get("tokens_completion"), *want)
    p1, c1 = _tokens(port)
    check((p1 - p0, c1 - c0) == want, "dsgate_tokens_total grew by %s/%s, want %s/%s",
          p1 - p0, c1 - c0, *want)


# ---------------------------------------------------------------- cache scope

def t_x_api_key_scopes_cache():
    t = tid()
    body = anth_body("scoped by x-api-key " + t)
    a1 = post(main_port(), MSGS, body, t, key=KEY_A)
    a2 = post(main_port(), MSGS, body, t, key=KEY_A)
    b1 = post(main_port(), MSGS, body, t, key=KEY_B)
    hdrs = [x.header("x-cache") for x in (a1, a2, b1)]
    check(a2.header("x-cache") == "HIT", "same x-api-key twice: X-Cache %r (cached at all?)", hdrs)
    check(b1.header("x-cache") != "HIT", "another x-api-key got A's entry: X-Cache %r", hdrs)
    check(len(fake_calls(t)) == 2, "fake saw %d calls, want 2", len(fake_calls(t)))
    keys = [e["headers"].get("x-api-key") for e in fake_calls(t)]
    check(keys == [KEY_A, KEY_B], "the fake saw keys %r", keys)


def t_x_api_key_shared_cache():
    shared_dsgate("main")
    f = P["fake"]
    d = dsgate(lambda p: config(p, [upstream_lines("fake", f.url)],
                                cache="{enabled: true, shared: true}"), "anth-shared")
    t = tid()
    body = anth_body("shared cache " + t)
    post(d.port, MSGS, body, t, key=KEY_A)
    b = post(d.port, MSGS, body, t, key=KEY_B)
    check(b.header("x-cache") == "HIT", "cache.shared: another key's X-Cache %r", b.header("x-cache"))
    check(len(fake_calls(t)) == 1, "fake saw %d calls", len(fake_calls(t)))


# ---------------------------------------------------------------- upstreams[].dialects

def t_dialects_route_anthropic_past_openai_only():
    oai = H.start_fake(STARTED, name="oai")
    both = H.start_fake(STARTED, name="both")
    d = dsgate(lambda p: config(p, [
        upstream_lines("oai", oai.url, dialects=["openai"]),
        upstream_lines("both", both.url, dialects=["openai", "anthropic"])]), "anth-dialects")
    for path in (MSGS, MSGS2, COUNT):
        t = tid()
        r = post(d.port, path, anth_body("which upstream " + t), t)
        check(r.status == 200, "%s: status %s %r", path, r.status, r.body[:200])
        if path != COUNT:
            check(r.header("x-dsgate-upstream") == "both", "%s: X-Dsgate-Upstream %r", path,
                  r.header("x-dsgate-upstream"))
        check(not fake_calls(t, oai), "%s: the openai-only upstream got an Anthropic request", path)
        check(len(fake_calls(t, both)) == 1, "%s: 'both' saw %d", path, len(fake_calls(t, both)))
    t = tid()
    r = H.request(d.port, "POST", CHAT, [("X-Test-Id", t), ("Content-Type", "application/json")],
                  H.chat_body("openai " + t))
    check(r.status == 200 and r.header("x-dsgate-upstream") == "oai",
          "OpenAI request: %s via %r", r.status, r.header("x-dsgate-upstream"))


def _no_anthropic_upstream(dialects, tag):
    f = H.start_fake(STARTED, name=tag)
    d = dsgate(lambda p: config(p, [upstream_lines("oai", f.url, dialects=dialects)]), tag)
    for path, body in ((MSGS, anth_body("nowhere")), (MSGS2, anth_body("nowhere", stream=True)),
                       (COUNT, anth_body("nowhere"))):
        r = post(d.port, path, body)
        anthropic_error(r, 404, "not_found_error")
    check(f.stats()["requests"] == 0, "the openai-only upstream got %d requests",
          f.stats()["requests"])
    r = H.request(d.port, "POST", CHAT, [("Content-Type", "application/json")], H.chat_body("ok"))
    check(r.status == 200, "OpenAI request: %s", r.status)


def t_dialects_none_takes_anthropic_404():
    _no_anthropic_upstream(["openai"], "anth-oai-only")


def t_dialects_default_not_deepseek_is_openai_only():
    _no_anthropic_upstream(None, "anth-default-dialects")


# ---------------------------------------------------------------- aliases, priority

def t_alias_rewrites_anthropic_body():
    shared_dsgate("main")
    f = P["fake"]
    d = dsgate(lambda p: config(p, [upstream_lines(
        "fake", f.url, models={"claude-sonnet-4": "deepseek-chat"})]), "anth-alias")
    t = tid()
    sent = anth_body("alias " + t, model="claude-sonnet-4", system="be brief")
    r = post(d.port, MSGS, sent, t, more=[("Cache-Control", "no-store")])
    check(r.status == 200, "status %s %r", r.status, r.body[:200])
    check(r.json().get("model") == "claude-sonnet-4", "answer model %r", r.json().get("model"))
    got = json.loads(fake_calls(t)[0]["body"])
    check(got.get("model") == "deepseek-chat", "the fake saw model %r", got.get("model"))
    got["model"] = sent["model"]
    check(got == sent, "the rest of the body changed: %r", got)
    t = tid()
    st = stream(d.port, MSGS, anth_body("alias stream " + t, model="claude-sonnet-4", stream=True), t)
    check(st.error is None and st.events, "stream %s", st.error)
    m = json.loads(st.events[0]["data"])["message"]["model"]
    check(m == "claude-sonnet-4", "message_start model %r", m)
    check(json.loads(fake_calls(t)[0]["body"])["model"] == "deepseek-chat", "stream: fake's model")
    anthropic_error(post(d.port, MSGS, anth_body("unknown", model="claude-opus-9")), 404)


def t_priority_orders_anthropic():
    port = queue_port()
    occ = occupy(port, 400)
    tl, th = tid(), tid()
    low = H.Pending(port, json.dumps(anth_body("low " + tl)).encode(),
                    headers=anth_headers(tl, more=[("X-Priority", "low")], ctype=False), path=MSGS)
    wait_depth(port, 1)
    high = H.Pending(port, json.dumps(anth_body("high " + th)).encode(),
                     headers=anth_headers(th, more=[("X-Priority", "high")], ctype=False), path=MSGS2)
    wait_depth(port, 2)
    check(low.wait().status == 200 and high.wait().status == 200 and occ.wait().status == 200,
          "statuses %s %s", low.resp.status, high.resp.status)
    el, eh = fake_calls(tl)[0], fake_calls(th)[0]
    check(eh["seq"] < el["seq"], "high (seq %d) went upstream after low (seq %d)", eh["seq"], el["seq"])
    check("x-priority" not in eh["headers"], "X-Priority forwarded")


# ---------------------------------------------------------------- end

def t_stop_clean():
    H.check_stopped_clean({k: P.get(k) for k in SHARED_CONFIGS})


TESTS = [
    ("passthrough_nonstream", t_passthrough_nonstream),
    ("passthrough_stream", t_passthrough_stream),
    ("own_errors_400_413_anthropic_shaped", t_own_400_413),
    ("own_errors_429_504_anthropic_shaped", t_own_429_504),
    ("keepalive_held_stream_is_event_ping", t_keepalive_ping),
    ("keepalive_openai_path_unchanged", t_keepalive_openai_unchanged),
    ("keepalive_held_nonstream_parses", t_keepalive_nonstream_parses),
    ("sse_error_after_data_is_event_error", t_sse_error_after_data),
    ("sse_error_after_early_head_is_event_error", t_sse_error_after_early_head),
    ("cache_nonstream_default_paths", t_cache_nonstream),
    ("cache_stream_default_paths", t_cache_stream),
    ("cache_stream_trailing_done", t_cache_stream_trailing_done),
    ("cache_cut_stream_not_stored", t_cache_cut_stream_not_stored),
    ("retry_529_by_default", t_529_retried_by_default),
    ("count_tokens_not_queued", t_count_tokens_not_queued),
    ("usage_nonstream_tokens", t_usage_nonstream),
    ("usage_stream_tokens", t_usage_stream),
    ("x_api_key_scopes_cache", t_x_api_key_scopes_cache),
    ("x_api_key_shared_cache", t_x_api_key_shared_cache),
    ("dialects_anthropic_past_openai_only_upstream", t_dialects_route_anthropic_past_openai_only),
    ("dialects_none_takes_anthropic_404", t_dialects_none_takes_anthropic_404),
    ("dialects_default_not_deepseek_is_openai_only", t_dialects_default_not_deepseek_is_openai_only),
    ("alias_rewrites_anthropic_body", t_alias_rewrites_anthropic_body),
    ("priority_orders_anthropic", t_priority_orders_anthropic),
    ("shared_dsgates_exit_0_no_sanitizer", t_stop_clean),
]


def main():
    tests = [(n, fn if fn is t_stop_clean else shared(fn)) for n, fn in TESTS]
    return H.main("test_anthropic", tests, started=STARTED,
                  require=[(H.DSGATE, "build/asan/dsgate"), (H.FAKE, "build/fake_upstream")])


if __name__ == "__main__":
    sys.exit(main())
