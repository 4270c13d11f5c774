#!/usr/bin/env python3
"""
test_cache: the response cache and the coalescing of identical requests
(issue 4) through the real daemon.

Memory LRU and Redis tiers, X-Cache HIT/MISS/BYPASS, per-credential scope,
Cache-Control no-store / no-cache, TTL and LRU eviction, streamed replay,
what must never be stored (errors, partial streams, oversized answers),
coalescing of 50 identical concurrent requests (non-stream and stream, and
when the leader's client leaves or the leader fails), and a Redis that is
killed under load, paused with SIGSTOP or holds garbage.

Every test starts what it needs on free loopback ports: the fake upstream,
dsgate, and a private redis-server (tests/integration/redis_helper.py), and
stops it at its end.  Upstream calls are counted in the fake's /_log by an
X-Test-Id header (not part of the cache key).  The whole file runs in well
under two minutes.  Usage: test_cache.py [test names...]
"""

import concurrent.futures
import gzip
import json
import os
import re
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check, note, scrape                         # noqa: E402
import redis_helper as R                                        # noqa: E402

CHAT = "/v1/chat/completions"
STARTED = []        # objects with .stop() started by the running test
SHARED = {}         # the memory-only dsgate and fake most tests share


def tid():
    return uuid.uuid4().hex[:12]


def chat(content, stream=False, model="deepseek-chat"):
    b = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


# ---------------------------------------------------------------- processes

def config(port, url, name="fake", max_entries=1024, max_bytes="64MB", ttl="24h",
           redis_url="", prefix="dsgate-test:", redis_timeout="50ms", shared=False,
           attempts=1, enabled=True):
    lines = [
        "# written by tests/integration/test_cache.py",
        "listen: 127.0.0.1:%d" % port,
        "upstreams:",
        "  - name: %s" % name,
        "    url: %s" % H.yaml_quote(url),
        "    api_key_env: DSGATE_IT_UNSET_KEY_VARIABLE",
        "    max_inflight: 64",
        "    adaptive: false",
        "    timeouts: {connect: 2s, first_data: 30s, idle: 30s, total: 0}",
        "retry:",
        "  max_attempts: %d" % attempts,
        "  base: 20ms",
        "  cap: 100ms",
        "cache:",
        "  enabled: %s" % ("true" if enabled else "false"),
        "  ttl: %s" % ttl,
        "  memory: {max_entries: %d, max_bytes: %s}" % (max_entries, max_bytes),
        "  redis: {url: %s, prefix: %s, timeout: %s}" % (H.yaml_quote(redis_url),
                                                         H.yaml_quote(prefix), redis_timeout),
        "  shared: %s" % ("true" if shared else "false"),
        "shutdown_timeout: 3s",
        "log: {level: info, format: json}",
    ]
    return "\n".join(lines) + "\n"


def fake(*args, name="cache"):
    f = H.Fake(*args, name=name)
    STARTED.append(f)
    return f


def dsgate(url, tag, **cfg):
    port = H.free_port()
    d = H.Dsgate(config_text=config(port, url, **cfg), tag="cache-" + tag, port=port)
    STARTED.append(d)
    return d


def redis():
    r = R.Redis()
    STARTED.append(r)
    return r


def shared():
    """The memory-only pair most tests use (each with its own prompts)."""
    if "d" not in SHARED or not SHARED["d"].alive():
        if "f" not in SHARED:
            SHARED["f"] = H.Fake(name="cache-shared")
        port = H.free_port()
        SHARED["d"] = H.Dsgate(config_text=config(port, SHARED["f"].url), tag="cache-shared",
                               port=port)
    return SHARED["d"], SHARED["f"]


# ---------------------------------------------------------------- helpers

def post(port, body, headers=None, path=CHAT, timeout=15.0):
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    hs.append(("Content-Type", "application/json"))
    return H.request(port, "POST", path, headers=hs, body=body, timeout=timeout)


def stream(port, body, headers=None, timeout=15.0):
    st = H.sse_request(port, body, headers=headers, timeout=timeout)
    check(st.error is None, "stream transport error: %s", st.error)
    check(st.resp is not None and st.resp.status == 200, "stream status %s",
          st.resp and st.resp.status)
    return st


def xcache(r):
    return r.header("x-cache")


def expect(r, status=200, cache=None, what=""):
    check(r.status == status, "%s: status %s (want %s) %r", what, r.status, status, r.body[:200])
    if cache is not None:
        check(xcache(r) == cache, "%s: X-Cache %r (want %r)", what, xcache(r), cache)


def calls(f, test_id):
    """How many requests with this X-Test-Id the fake has seen."""
    return len([e for e in f.log() if (e.get("headers") or {}).get("x-test-id") == test_id])


def content_of(r):
    return r.json()["choices"][0]["message"]["content"]


def sse_done(st):
    data = [e["data"] for e in st.events if e["data"] is not None]
    return bool(data) and data[-1] == "[DONE]"


def metric(samples, name, **labels):
    """Sum of NAME's samples whose labels include LABELS (0 if none)."""
    return sum(v for n, ls, v in samples
               if n == name and all(ls.get(k) == str(x) for k, x in labels.items()))


class Metrics:
    """Counters now, to compare with later: m.delta(name, **labels)."""

    def __init__(self, port):
        self.port = port
        self.before = scrape(port)
        self.after = None

    def update(self):
        self.after = scrape(self.port)
        return self

    def delta(self, name, **labels):
        if self.after is None:
            self.update()
        return metric(self.after, name, **labels) - metric(self.before, name, **labels)


def parallel(fns, concurrency):
    """Run the callables FNS at CONCURRENCY; their results or exceptions."""
    def one(fn):
        try:
            return fn()
        except Exception as e:                  # noqa: BLE001
            return e
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(one, fns))


def together(port, n, body, headers, path=CHAT, timeout=20.0, sse=False):
    """N identical requests sent at the same moment (connections opened
    first, then a barrier); [Response or Stream or exception]."""
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    hs += [("Content-Type", "application/json"), ("Connection", "close")]
    if sse:
        hs.append(("Accept", "text/event-stream"))
    barrier = threading.Barrier(n)

    def one(i):
        c = H.Conn(port, timeout=timeout)
        try:
            data = H.build_request("POST", path, hs, body, port=port)
            try:
                barrier.wait(10)
            except threading.BrokenBarrierError:
                pass
            c.send(data)
            return c.read_response(timeout)
        finally:
            c.close()
    return parallel([lambda i=i: one(i) for i in range(n)], n)


def gzip_upstream(delay=0.4):
    """An upstream that compresses its JSON answer when the request says
    Accept-Encoding: gzip, as HTTP servers and CDNs do (the openai SDKs send
    it by default).  Waits DELAY s before answering; .requests counts."""
    def answer(req):
        payload = json.dumps({"id": "chatcmpl-gz-%d" % (req.n + 1), "object": "chat.completion",
                              "choices": [{"index": 0, "message": {
                                  "role": "assistant", "content": "x" * 200},
                                  "finish_reason": "stop"}]}).encode()
        hs = [("Content-Type", "application/json")]
        if "gzip" in (req.header("accept-encoding") or ""):
            payload = gzip.compress(payload)
            hs.append(("Content-Encoding", "gzip"))
        hs += [("Content-Length", str(len(payload))), ("Connection", "close")]
        return {"headers": hs, "body": payload, "delay_ms": delay * 1000}
    g = H.ScriptedUpstream(answer)
    STARTED.append(g)
    return g


def decoded_json(r):
    """The body as its own headers say to read it (Content-Encoding)."""
    b = r.body
    if (r.header("content-encoding") or "").lower() == "gzip":
        b = gzip.decompress(b)
    return json.loads(b)


def redis_keys(r, prefix):
    return sorted(k.decode() for k in r.cmd("KEYS", prefix + "*"))


def wait_key(r, prefix, n=1, timeout=3.0):
    got = H.wait_until(lambda: len(redis_keys(r, prefix)) >= n, timeout, 0.01)
    check(got, "no %d key(s) under %r in Redis within %.0fs (has %r)", n, prefix, timeout,
          redis_keys(r, prefix))
    return redis_keys(r, prefix)


# ---------------------------------------------------------------- memory tier

def t_miss_then_hit():
    """MISS, then HIT with the same id and body; one upstream call;
    X-Dsgate-Attempts: 0 on the hit; memory hit / miss / store counted."""
    d, f = shared()
    t = tid()
    body = chat("remember me " + t)
    m = Metrics(d.port)
    r1 = post(d.port, body, {"X-Test-Id": t})
    expect(r1, 200, "MISS", "first")
    check(r1.header("x-dsgate-attempts") == "1", "first: attempts %r",
          r1.header("x-dsgate-attempts"))
    r2 = post(d.port, body, {"X-Test-Id": t})
    expect(r2, 200, "HIT", "second")
    check(r2.json()["id"] == r1.json()["id"], "ids differ: %r %r", r1.json()["id"],
          r2.json()["id"])
    check(r2.body == r1.body, "hit body differs from the first answer")
    check(r2.header("x-dsgate-attempts") == "0", "hit: X-Dsgate-Attempts %r",
          r2.header("x-dsgate-attempts"))
    check("application/json" in (r2.header("content-type") or ""), "hit content-type %r",
          r2.header("content-type"))
    check(r2.header("x-dsgate-coalesced") is None, "a hit says it was coalesced")
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))
    m.update()
    check(m.delta("dsgate_cache_hits_total", tier="memory") == 1, "hits{memory} +%s",
          m.delta("dsgate_cache_hits_total", tier="memory"))
    check(m.delta("dsgate_cache_hits_total", tier="redis") == 0, "hits{redis} moved")
    check(m.delta("dsgate_cache_misses_total") == 1, "misses +%s",
          m.delta("dsgate_cache_misses_total"))
    check(m.delta("dsgate_cache_stores_total", tier="memory") == 1, "stores{memory} +%s",
          m.delta("dsgate_cache_stores_total", tier="memory"))
    check(m.delta("dsgate_requests_total", cache="hit") == 1, "requests_total{cache=hit} +%s",
          m.delta("dsgate_requests_total", cache="hit"))
    check(m.delta("dsgate_requests_total", cache="miss") == 1, "requests_total{cache=miss} +%s",
          m.delta("dsgate_requests_total", cache="miss"))


def t_variants_hit():
    """Key order, white space, escapes and number spellings do not matter."""
    d, f = shared()
    t = tid()
    content = "caf\u00e9 a/b " + t
    base = {"model": "deepseek-chat", "temperature": 0.5,
            "messages": [{"role": "user", "content": content}]}
    r1 = post(d.port, json.dumps(base).encode(), {"X-Test-Id": t})
    expect(r1, 200, "MISS", "first")
    esc = json.dumps(content)[1:-1].replace("/", "\\/")          # \u00e9 and \/
    variants = [
        json.dumps(base, sort_keys=True).encode(),
        json.dumps(base, separators=(",", ":")).encode(),
        json.dumps(base, indent=2).encode(),
        ('\r\n\t{ "messages" : [ { "content" : "%s" , "role" : "user" } ] ,\n'
         '  "temperature" : 5e-1 , "model" : "deepseek-chat" }\n  ' % esc).encode(),
        json.dumps(base, ensure_ascii=False).encode("utf-8"),
        ('{"temperature":0.50,"model":"deepseek\\u002dchat","messages":[{"role":"user",'
         '"content":%s}]}' % json.dumps(content)).encode(),
    ]
    for i, v in enumerate(variants):
        r = post(d.port, v, {"X-Test-Id": t})
        expect(r, 200, "HIT", "variant %d %r" % (i, v[:80]))
        check(r.json()["id"] == r1.json()["id"], "variant %d: another id", i)
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))


def t_different_requests_miss():
    """Other prompt, model, parameters, stream flag, path: another entry.
    Not cached at all: GET, and POST to a path outside cache.paths."""
    d, f = shared()
    t = tid()
    base = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "q " + t}]}
    expect(post(d.port, json.dumps(base).encode(), {"X-Test-Id": t}), 200, "MISS", "base")
    others = [
        dict(base, messages=[{"role": "user", "content": "q " + t + " "}]),
        dict(base, messages=[{"role": "user", "content": "Q " + t}]),
        dict(base, model="deepseek-reasoner"),
        dict(base, temperature=0.1),
        dict(base, messages=[{"role": "system", "content": "q " + t}]),
        dict(base, messages=base["messages"] * 2),
    ]
    n = 1
    for i, o in enumerate(others):
        r = post(d.port, json.dumps(o).encode(), {"X-Test-Id": t})
        expect(r, 200, "MISS", "variant %d" % i)
        n += 1
    st = stream(d.port, dict(base, stream=True), {"X-Test-Id": t})
    check(st.resp.header("x-cache") == "MISS", "stream: X-Cache %r", st.resp.header("x-cache"))
    n += 1
    r = post(d.port, json.dumps(base).encode(), {"X-Test-Id": t}, path="/chat/completions")
    expect(r, 200, "MISS", "path /chat/completions")
    n += 1
    check(calls(f, t) == n, "upstream saw %d calls, want %d", calls(f, t), n)
    # and each of them is now a hit
    expect(post(d.port, json.dumps(others[2]).encode(), {"X-Test-Id": t}), 200, "HIT",
           "model variant again")
    expect(post(d.port, json.dumps(base).encode(), {"X-Test-Id": t}, path="/chat/completions"),
           200, "HIT", "path variant again")
    # outside the cache: no X-Cache, every request goes upstream
    for _ in range(2):
        r = H.request(d.port, "GET", CHAT, headers={"X-Test-Id": t + "g"})
        check(r.status == 200 and xcache(r) is None, "GET: %s X-Cache %r", r.status, xcache(r))
        r = post(d.port, json.dumps(base).encode(), {"X-Test-Id": t + "o"}, path="/v1/other")
        check(r.status == 200 and xcache(r) is None, "POST /v1/other: %s X-Cache %r",
              r.status, xcache(r))
    check(calls(f, t + "g") == 2, "GET: %d upstream calls", calls(f, t + "g"))
    check(calls(f, t + "o") == 2, "other path: %d upstream calls", calls(f, t + "o"))
    r = post(d.port, b'["not", "an object"]', {"X-Test-Id": t})
    check(r.status == 400, "array body on a cache path: %s", r.status)


def t_query_in_key():
    """The query string goes upstream (base URL + path + query), so two
    requests that differ only in it must not share an entry."""
    d, f = shared()
    t = tid()
    body = chat("query " + t)
    r1 = post(d.port, body, {"X-Test-Id": t}, path=CHAT + "?variant=1")
    expect(r1, 200, "MISS", "?variant=1")
    r2 = post(d.port, body, {"X-Test-Id": t}, path=CHAT + "?variant=2")
    check(r2.status == 200, "status %s", r2.status)
    check(xcache(r2) == "MISS", "?variant=2 was answered with the entry of ?variant=1 "
          "(X-Cache %r); the upstream never saw this URL", xcache(r2))
    expect(post(d.port, body, {"X-Test-Id": t}, path=CHAT + "?variant=1"), 200, "HIT",
           "?variant=1 again")


def t_embeddings_cached():
    """/v1/embeddings and /v1/completions are cache paths too."""
    d, f = shared()
    t = tid()
    for path, body in (("/v1/embeddings", {"model": "deepseek-embed", "input": "e " + t}),
                       ("/v1/completions", {"model": "deepseek-chat", "prompt": "c " + t})):
        b = json.dumps(body).encode()
        r1 = post(d.port, b, {"X-Test-Id": t}, path=path)
        expect(r1, 200, "MISS", path)
        r2 = post(d.port, b, {"X-Test-Id": t}, path=path)
        expect(r2, 200, "HIT", path)
        check(r2.body == r1.body, "%s: hit body differs", path)
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_credentials_scoped():
    """Different Authorization values never share an entry."""
    d, f = shared()
    t = tid()
    body = chat("secret " + t)
    a1 = post(d.port, body, {"X-Test-Id": t, "Authorization": "Bearer sk-A"})
    expect(a1, 200, "MISS", "A")
    a2 = post(d.port, body, {"X-Test-Id": t, "Authorization": "Bearer sk-A"})
    expect(a2, 200, "HIT", "A again")
    check(a2.json()["id"] == a1.json()["id"], "A: ids differ")
    ids = {a1.json()["id"]}
    for who in ("Bearer sk-B", "Bearer sk-a", "bearer sk-A", None):
        hs = {"X-Test-Id": t}
        if who:
            hs["Authorization"] = who
        r = post(d.port, body, hs)
        expect(r, 200, "MISS", "credential %r" % who)
        check(r.json()["id"] not in ids, "credential %r got another's answer", who)
        ids.add(r.json()["id"])
    b2 = post(d.port, body, {"X-Test-Id": t, "Authorization": "Bearer sk-B"})
    expect(b2, 200, "HIT", "B again")
    n2 = post(d.port, body, {"X-Test-Id": t})
    expect(n2, 200, "HIT", "no credential again")
    check(calls(f, t) == 5, "upstream saw %d calls, want 5", calls(f, t))


def t_credentials_never_coalesce():
    """Identical concurrent requests from two credentials: two upstream calls."""
    d, f = shared()
    t = tid()
    body = chat("two users " + t)
    hs = {"X-Test-Id": t, "X-Fake-Delay-Ms": "400"}
    res = parallel([lambda: post(d.port, body, dict(hs, Authorization="Bearer sk-one")),
                    lambda: post(d.port, body, dict(hs, Authorization="Bearer sk-two"))], 2)
    for r in res:
        check(isinstance(r, H.Response), "request failed: %r", r)
        expect(r, 200, "MISS")
        check(r.header("x-dsgate-coalesced") is None, "coalesced across credentials")
    check(res[0].json()["id"] != res[1].json()["id"], "same answer for two credentials")
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_shared_cache():
    """cache.shared: true: one entry for every credential."""
    f = fake(name="shared")
    d = dsgate(f.url, "shared-scope", shared=True)
    t = tid()
    body = chat("for everyone " + t)
    r1 = post(d.port, body, {"X-Test-Id": t, "Authorization": "Bearer sk-A"})
    expect(r1, 200, "MISS", "A")
    for who in ("Bearer sk-B", None):
        hs = {"X-Test-Id": t}
        if who:
            hs["Authorization"] = who
        r = post(d.port, body, hs)
        expect(r, 200, "HIT", "credential %r" % who)
        check(r.json()["id"] == r1.json()["id"], "%r: another id", who)
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))


def t_no_store_bypass():
    """Cache-Control: no-store: BYPASS, no read, no write."""
    d, f = shared()
    t = tid()
    body = chat("private " + t)
    m = Metrics(d.port)
    ids = set()
    for cc in ("no-store", "No-Store", "max-age=0, no-store"):
        r = post(d.port, body, {"X-Test-Id": t, "Cache-Control": cc})
        expect(r, 200, "BYPASS", cc)
        ids.add(r.json()["id"])
    check(len(ids) == 3, "no-store answers shared an id: %r", ids)
    r = post(d.port, body, {"X-Test-Id": t})
    expect(r, 200, "MISS", "normal after no-store (nothing was stored)")
    stored = r.json()["id"]
    r = post(d.port, body, {"X-Test-Id": t, "Cache-Control": "no-store"})
    expect(r, 200, "BYPASS", "no-store with an entry present")
    check(r.json()["id"] != stored, "no-store read the cache")
    r = post(d.port, body, {"X-Test-Id": t})
    expect(r, 200, "HIT", "normal again")
    check(r.json()["id"] == stored, "no-store replaced the entry")
    check(calls(f, t) == 5, "upstream saw %d calls, want 5", calls(f, t))
    m.update()
    check(m.delta("dsgate_requests_total", cache="bypass") == 4, "requests{cache=bypass} +%s",
          m.delta("dsgate_requests_total", cache="bypass"))
    check(m.delta("dsgate_cache_stores_total", tier="memory") == 1, "stores{memory} +%s",
          m.delta("dsgate_cache_stores_total", tier="memory"))


def t_no_store_not_coalesced():
    """A no-store request does not join an identical one in flight."""
    d, f = shared()
    t = tid()
    body = chat("in flight " + t)
    hs = {"X-Test-Id": t, "X-Fake-Delay-Ms": "500"}
    out = {}
    lead = threading.Thread(target=lambda: out.__setitem__("lead", post(d.port, body, hs)))
    lead.start()
    check(H.wait_until(lambda: calls(f, t) == 1, 3.0), "leader not upstream")
    r = post(d.port, body, dict(hs, **{"Cache-Control": "no-store"}))
    lead.join(10)
    expect(r, 200, "BYPASS", "no-store")
    check(r.header("x-dsgate-coalesced") is None, "no-store was coalesced")
    expect(out["lead"], 200, "MISS", "leader")
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_no_cache_refreshes():
    """Cache-Control: no-cache skips the lookup but stores its answer."""
    d, f = shared()
    t = tid()
    body = chat("fresh please " + t)
    r1 = post(d.port, body, {"X-Test-Id": t})
    expect(r1, 200, "MISS", "first")
    r2 = post(d.port, body, {"X-Test-Id": t, "Cache-Control": "no-cache"})
    expect(r2, 200, "MISS", "no-cache")
    check(r2.json()["id"] != r1.json()["id"], "no-cache was answered from the cache")
    r3 = post(d.port, body, {"X-Test-Id": t})
    expect(r3, 200, "HIT", "after no-cache")
    check(r3.json()["id"] == r2.json()["id"], "the no-cache answer was not stored")
    # no-cache first on a new prompt: stored too
    b2 = chat("fresh first " + t)
    r4 = post(d.port, b2, {"X-Test-Id": t, "Cache-Control": "no-cache"})
    expect(r4, 200, "MISS", "no-cache first")
    r5 = post(d.port, b2, {"X-Test-Id": t})
    expect(r5, 200, "HIT", "after no-cache first")
    check(r5.json()["id"] == r4.json()["id"], "ids differ")
    check(calls(f, t) == 3, "upstream saw %d calls, want 3", calls(f, t))


def t_no_cache_during_flight():
    """no-cache while an identical request is in flight: not joined, own
    upstream call, and its (later) answer is still stored."""
    d, f = shared()
    t = tid()
    body = chat("fresh while busy " + t)
    out = {}
    lead = threading.Thread(target=lambda: out.__setitem__(
        "lead", post(d.port, body, {"X-Test-Id": t, "X-Fake-Delay-Ms": "300"})))
    lead.start()
    check(H.wait_until(lambda: calls(f, t) == 1, 3.0), "leader not upstream")
    r = post(d.port, body, {"X-Test-Id": t, "X-Fake-Delay-Ms": "800",
                            "Cache-Control": "no-cache"})
    lead.join(10)
    expect(out["lead"], 200, "MISS", "leader")
    expect(r, 200, "MISS", "no-cache")
    check(r.header("x-dsgate-coalesced") is None, "no-cache joined the flight")
    check(r.json()["id"] != out["lead"].json()["id"], "no-cache got the leader's answer")
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))
    h = post(d.port, body, {"X-Test-Id": t})
    expect(h, 200, "HIT", "afterwards")
    check(h.json()["id"] == r.json()["id"],
          "the cache holds the leader's answer %s, not the later no-cache answer %s "
          "(no-cache must store its result)", h.json()["id"], r.json()["id"])


def t_ttl_expiry():
    """cache.ttl 1s: hits until about 1 s after the store, then a miss."""
    f = fake(name="ttl")
    d = dsgate(f.url, "ttl", ttl="1s")
    t = tid()
    body = chat("short lived " + t)
    r1 = post(d.port, body, {"X-Test-Id": t})
    t_store = time.monotonic()
    expect(r1, 200, "MISS", "first")
    hits = 0
    first_miss = None
    deadline = t_store + 4.0
    while time.monotonic() < deadline:
        r = post(d.port, body, {"X-Test-Id": t})
        check(r.status == 200, "status %s", r.status)
        if xcache(r) == "HIT":
            check(r.json()["id"] == r1.json()["id"], "hit with another id")
            hits += 1
        else:
            check(xcache(r) == "MISS", "X-Cache %r", xcache(r))
            first_miss = time.monotonic() - t_store
            break
        time.sleep(0.05)
    note("ttl 1s: %d hits, first miss %.2fs after the store", hits, first_miss or -1)
    check(first_miss is not None, "still a hit 4 s after the store")
    check(hits >= 3, "only %d hits before expiry", hits)
    check(0.85 <= first_miss <= 1.6, "expired after %.2fs (ttl 1s)", first_miss)
    expect(post(d.port, body, {"X-Test-Id": t}), 200, "HIT", "stored again")
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_lru_by_count():
    """max_entries 2: the least recently used entry goes."""
    f = fake(name="lru")
    d = dsgate(f.url, "lru-count", max_entries=2)
    t = tid()
    A, B, C = (chat("%s %s" % (x, t)) for x in "ABC")

    def q(b, want, what):
        expect(post(d.port, b, {"X-Test-Id": t + what[0]}), 200, want, what)
    q(A, "MISS", "A")
    q(B, "MISS", "B")
    q(A, "HIT", "A hit")              # [A, B]
    q(C, "MISS", "C evicts B")        # [C, A]
    q(A, "HIT", "A kept")             # [A, C]
    q(C, "HIT", "C kept")             # [C, A]
    q(B, "MISS", "B evicted")         # [B, C]
    q(C, "HIT", "C still")            # [C, B]
    q(A, "MISS", "A evicted")         # [A, C]
    check([calls(f, t + x) for x in "ABC"] == [2, 2, 1], "upstream calls A,B,C = %r",
          [calls(f, t + x) for x in "ABC"])


def t_lru_by_bytes():
    """max_bytes 50KB, answers of about 20 KB: two fit; a 60 KB answer is
    never kept and evicts nothing."""
    f = fake(name="lrub")
    d = dsgate(f.url, "lru-bytes", max_entries=1000, max_bytes="50KB")
    t = tid()
    P, Q, S, B = (chat("%s %s" % (x, t)) for x in ("P", "Q", "S", "Big"))
    big = {"X-Fake-Body-Bytes": "20000"}

    def q(b, want, what, size=big):
        r = post(d.port, b, dict(size, **{"X-Test-Id": t + what[0]}))
        expect(r, 200, want, what)
        return r
    r = q(P, "MISS", "P")
    check(len(r.body) > 20000, "answer only %d bytes", len(r.body))
    q(Q, "MISS", "Q")
    q(P, "HIT", "P hit")              # [P, Q]
    q(S, "MISS", "S evicts Q")        # [S, P]
    q(P, "HIT", "P kept")             # [P, S]
    q(S, "HIT", "S kept")             # [S, P]
    q(Q, "MISS", "Q evicted")         # [Q, S]
    huge = {"X-Fake-Body-Bytes": "60000"}
    q(B, "MISS", "Big", huge)
    q(B, "MISS", "Big never kept", huge)
    q(Q, "HIT", "Q not evicted by Big")
    q(S, "HIT", "S not evicted by Big")
    check([calls(f, t + x) for x in "PQSB"] == [1, 2, 1, 2], "upstream calls P,Q,S,Big = %r",
          [calls(f, t + x) for x in "PQSB"])


def t_memory_off_no_redis():
    """max_entries 0 and no Redis: nothing is cached (X-Cache MISS)."""
    f = fake(name="nomem")
    d = dsgate(f.url, "nomem", max_entries=0)
    t = tid()
    body = chat("nowhere " + t)
    for i in range(2):
        expect(post(d.port, body, {"X-Test-Id": t}), 200, "MISS", "request %d" % i)
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_cache_disabled():
    """cache.enabled: false: no X-Cache header, no coalescing."""
    f = fake(name="off")
    d = dsgate(f.url, "off", enabled=False)
    t = tid()
    body = chat("off " + t)
    for i in range(2):
        r = post(d.port, body, {"X-Test-Id": t})
        check(r.status == 200 and xcache(r) is None, "request %d: %s X-Cache %r", i, r.status,
              xcache(r))
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


# ---------------------------------------------------------------- what is stored

def t_stream_replay():
    """A streamed entry replays as the same SSE, ending with [DONE]; the
    same prompt without stream is another entry."""
    d, f = shared()
    t = tid()
    content = "stream me " + t
    body = chat(content, stream=True)
    s1 = stream(d.port, body, {"X-Test-Id": t, "X-Fake-Events": "8"})
    check(s1.resp.header("x-cache") == "MISS", "first: X-Cache %r", s1.resp.header("x-cache"))
    s2 = stream(d.port, body, {"X-Test-Id": t, "X-Fake-Events": "8"})
    check(s2.resp.header("x-cache") == "HIT", "second: X-Cache %r", s2.resp.header("x-cache"))
    check((s2.resp.header("content-type") or "").startswith("text/event-stream"),
          "hit content-type %r", s2.resp.header("content-type"))
    check(s2.resp.header("x-dsgate-attempts") == "0", "hit attempts %r",
          s2.resp.header("x-dsgate-attempts"))
    check(s2.raw == s1.raw, "replayed bytes differ (%d vs %d)", len(s2.raw), len(s1.raw))
    check(sse_done(s2), "replay does not end with [DONE]")
    check(s2.joined("content") == "echo: " + content, "content %r", s2.joined("content"))
    check(len(s2.chunks()) == len(s1.chunks()) >= 8, "chunks %d vs %d", len(s2.chunks()),
          len(s1.chunks()))
    check(len({c["id"] for c in s2.chunks()}) == 1, "chunk ids differ")
    r = post(d.port, chat(content), {"X-Test-Id": t})
    expect(r, 200, "MISS", "non-stream of the same prompt")
    check(content_of(r) == s2.joined("content"), "stream and non-stream content differ")
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_keepalive_trimmed():
    """Leading keep-alives (SSE comments; white space before JSON) are not
    part of the entry: a hit starts with data / with the JSON object."""
    d, f = shared()
    t = tid()
    hs = {"X-Test-Id": t, "X-Fake-Delay-Ms": "300", "X-Fake-Keepalive-Ms": "50"}
    body = chat("slow stream " + t, stream=True)
    s1 = stream(d.port, body, hs)
    check(s1.resp.header("x-cache") == "MISS", "first: %r", s1.resp.header("x-cache"))
    check(s1.comments >= 1, "the fake sent no keep-alive comments")
    s2 = stream(d.port, body, hs)
    check(s2.resp.header("x-cache") == "HIT", "second: %r", s2.resp.header("x-cache"))
    check(s2.raw.startswith(b"data: "), "replay starts with %r", s2.raw[:40])
    check(s2.comments == 0, "replay has %d keep-alive comments", s2.comments)
    check([e["data"] for e in s2.data_events()] == [e["data"] for e in s1.data_events()],
          "replayed events differ")
    check(sse_done(s2), "replay does not end with [DONE]")
    body = chat("slow json " + t)
    r1 = post(d.port, body, hs)
    expect(r1, 200, "MISS", "json first")
    r2 = post(d.port, body, hs)
    expect(r2, 200, "HIT", "json second")
    check(r2.body[:1] == b"{", "hit body starts with %r", r2.body[:20])
    check(r2.json() == r1.json(), "hit JSON differs")
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_errors_not_cached():
    """Upstream errors (max_attempts 1) are never stored."""
    d, f = shared()
    t = tid()
    for st in ("500", "503", "429", "400", "404"):
        body = chat("fail %s %s" % (st, t))
        for i in range(2):
            r = post(d.port, body, {"X-Test-Id": t + st, "X-Fake-Status": st})
            check(r.status == int(st), "%s #%d: status %s", st, i, r.status)
            check(xcache(r) != "HIT", "%s #%d: an error was a hit", st, i)
        r = post(d.port, body, {"X-Test-Id": t + st})
        expect(r, 200, "MISS", "after %s" % st)
        expect(post(d.port, body, {"X-Test-Id": t + st}), 200, "HIT", "after %s, again" % st)
        check(calls(f, t + st) == 3, "%s: upstream saw %d calls", st, calls(f, t + st))
    # a streamed error
    body = chat("fail stream " + t, stream=True)
    st = H.sse_request(d.port, body, {"X-Test-Id": t + "s", "X-Fake-Status": "500"})
    check(st.resp is not None and st.resp.status == 500, "stream error status %s",
          st.resp and st.resp.status)
    s = stream(d.port, body, {"X-Test-Id": t + "s"})
    check(s.resp.header("x-cache") == "MISS", "after a stream error: %r",
          s.resp.header("x-cache"))


def t_truncated_not_cached():
    """A non-stream body cut short (X-Fake-Truncate) is not stored."""
    d, f = shared()
    t = tid()
    body = chat("cut " + t)
    try:
        r = post(d.port, body, {"X-Test-Id": t, "X-Fake-Truncate": "1"}, timeout=10.0)
        check(r.status != 200 or not r.complete or xcache(r) != "HIT", "truncated: a hit")
    except H.HTTPError:
        pass                            # the connection closed: also fine
    r = post(d.port, body, {"X-Test-Id": t})
    expect(r, 200, "MISS", "after a truncated answer")
    r.json()
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_partial_stream_not_cached():
    """A stream the upstream breaks (X-Fake-Reset-After) is not stored."""
    d, f = shared()
    t = tid()
    body = chat("broken stream " + t, stream=True)
    st = H.sse_request(d.port, body, {"X-Test-Id": t, "X-Fake-Reset-After": "2",
                                      "X-Fake-Events": "6"})
    check(not sse_done(st), "a broken stream ended with [DONE]")
    s = stream(d.port, body, {"X-Test-Id": t})
    check(s.resp.header("x-cache") == "MISS", "after a broken stream: %r",
          s.resp.header("x-cache"))
    check(sse_done(s), "no [DONE]")
    s = stream(d.port, body, {"X-Test-Id": t})
    check(s.resp.header("x-cache") == "HIT", "complete stream not stored: %r",
          s.resp.header("x-cache"))
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))


def t_200_error_or_junk_not_cached():
    """A 200 whose body is an error object, not JSON, or not an object, and
    an event stream without [DONE], are not stored."""
    cases = [
        ("error", "application/json", b'{"error":{"message":"busy","type":"x","code":"y"}}'),
        ("error_after_ws", "application/json", b'\n\n{"id":"x","error":{"message":"m"}}'),
        ("junk", "application/json", b"this is not json"),
        ("array", "application/json", b'[{"id":"x"}]'),
        ("half", "application/json", b'{"id":"chatcmpl-half","choices":['),
        ("no_done", "text/event-stream", b'data: {"id":"x","choices":[]}\n\n'),
    ]
    for name, ctype, payload in cases:
        raw = H.ScriptedUpstream({"headers": [("Content-Type", ctype),
                                              ("Content-Length", str(len(payload))),
                                              ("Connection", "close")],
                                  "body": payload})
        try:
            d = dsgate(raw.url, "raw-" + name)
            body = chat("raw %s" % name, stream=ctype.startswith("text/"))
            for i in range(2):
                r = post(d.port, body)
                expect(r, 200, "MISS", "%s #%d" % (name, i))
            check(len(raw.requests) == 2, "%s: upstream saw %d requests", name,
                  len(raw.requests))
        finally:
            raw.close()


def t_oversized_not_cached():
    """Answers over 2 MiB are neither stored nor shared, and still reach
    every client complete (non-stream and stream)."""
    d, f = shared()
    t = tid()
    body = chat("huge " + t)
    hs = {"X-Test-Id": t, "X-Fake-Body-Bytes": "2300000"}
    r1 = post(d.port, body, hs, timeout=30.0)
    expect(r1, 200, "MISS", "first")
    check(len(r1.body) > 2300000, "body only %d bytes", len(r1.body))
    r2 = post(d.port, body, hs, timeout=30.0)
    expect(r2, 200, "MISS", "second")
    check(calls(f, t) == 2, "upstream saw %d calls", calls(f, t))
    # three at once: not shared, every one complete
    res = parallel([lambda: post(d.port, body, dict(hs, **{"X-Fake-Delay-Ms": "300"}),
                                 timeout=30.0)] * 3, 3)
    for r in res:
        check(isinstance(r, H.Response), "failed: %r", r)
        check(r.status == 200 and len(r.body) > 2300000, "status %s, %d bytes", r.status,
              len(r.body))
        r.json()
    check(calls(f, t) == 5, "upstream saw %d calls, want 5", calls(f, t))
    # a stream over 2 MiB
    sb = chat("huge stream " + t, stream=True)
    shs = {"X-Test-Id": t + "s", "X-Fake-Events": "12000"}
    s1 = stream(d.port, sb, shs, timeout=30.0)
    check(len(s1.raw) > 2200000 and sse_done(s1), "stream: %d bytes, done %s", len(s1.raw),
          sse_done(s1))
    s2 = stream(d.port, sb, shs, timeout=30.0)
    check(s2.resp.header("x-cache") == "MISS", "big stream was stored: %r",
          s2.resp.header("x-cache"))
    check(calls(f, t + "s") == 2, "stream: upstream saw %d calls", calls(f, t + "s"))


# ---------------------------------------------------------------- coalescing

def _coalesce(sse):
    d, f = shared()
    t = tid()
    body = chat("all at once %s %s" % (sse, t), stream=sse)
    if sse:
        hs = {"X-Test-Id": t, "X-Fake-Events": "10", "X-Fake-Event-Delay-Ms": "80"}
    else:
        hs = {"X-Test-Id": t, "X-Fake-Delay-Ms": "800"}
    m = Metrics(d.port)
    res = together(d.port, 50, body, hs, sse=sse)
    bad = [r for r in res if not isinstance(r, H.Response)]
    check(not bad, "%d requests failed: %r", len(bad), bad[:3])
    check(all(r.status == 200 and r.complete for r in res), "statuses %r",
          sorted({(r.status, r.complete) for r in res}))
    bodies = {r.body for r in res}
    check(len(bodies) == 1, "%d different bodies", len(bodies))
    n = calls(f, t)
    coalesced = [r for r in res if r.header("x-dsgate-coalesced") == "1"]
    hits = [r for r in res if xcache(r) == "HIT"]
    note("coalesce %s: upstream calls %d, coalesced %d, hits %d", "stream" if sse else "json",
         n, len(coalesced), len(hits))
    check(n == 1, "upstream saw %d calls for 50 identical requests", n)
    check(len(coalesced) + len(hits) == 49, "coalesced %d + hits %d != 49", len(coalesced),
          len(hits))
    check(all(xcache(r) == "MISS" for r in coalesced), "a follower's X-Cache is not MISS")
    m.update()
    check(m.delta("dsgate_coalesced_total") == len(coalesced), "dsgate_coalesced_total +%s",
          m.delta("dsgate_coalesced_total"))
    b = bodies.pop()
    if sse:
        evs = H.parse_sse(b)
        check(evs and evs[-1]["data"] == "[DONE]", "the stream does not end with [DONE]")
        check(len(evs) >= 11, "only %d events", len(evs))
    else:
        json.loads(b)
    r = post(d.port, body, {"X-Test-Id": t})
    check(xcache(r) == "HIT" and r.body == b, "afterwards: X-Cache %r", xcache(r))


def t_coalesce_50_json():
    """50 identical concurrent non-stream requests: one upstream call."""
    _coalesce(False)


def t_coalesce_50_stream():
    """50 identical concurrent streamed requests: one upstream call."""
    _coalesce(True)


def t_late_follower_streams():
    """A follower that arrives mid-stream gets the events already sent,
    then the rest as they come (not all at the end)."""
    d, f = shared()
    t = tid()
    body = chat("join late " + t, stream=True)
    hs = {"X-Test-Id": t, "X-Fake-Events": "16", "X-Fake-Event-Delay-Ms": "80"}
    lead = H.sse_request(d.port, body, hs, stop_after=5, timeout=15.0)
    check(lead.resp is not None and lead.resp.status == 200, "leader status")
    out = {}
    th = threading.Thread(target=lambda: out.__setitem__("s", H.sse_request(d.port, body, hs)))
    th.start()
    # read the rest of the leader's stream
    rest = []
    for piece in lead.conn.iter_body(lead.resp, 15.0):
        rest.append(piece)
    lead.conn.close()
    t_leader_end = time.monotonic()
    th.join(15)
    fol = out.get("s")
    check(fol is not None and fol.error is None and fol.resp.status == 200, "follower: %s",
          fol and (fol.error or fol.resp.status))
    check(fol.resp.header("x-dsgate-coalesced") == "1", "follower not coalesced (X-Cache %r)",
          fol.resp.header("x-cache"))
    full = lead.raw + b"".join(rest)
    check(fol.raw == full, "follower's stream differs from the leader's (%d vs %d bytes)",
          len(fol.raw), len(full))
    first = fol.data_events()[0]["t"]
    check(first < t_leader_end - 0.2, "follower's first event came only %.2fs before the end",
          t_leader_end - first)
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))


def _leader_leaves(sse):
    d, f = shared()
    t = tid()
    body = chat("leader leaves %s %s" % (sse, t), stream=sse)
    if sse:
        hs = {"X-Test-Id": t, "X-Fake-Events": "12", "X-Fake-Event-Delay-Ms": "80"}
    else:
        hs = {"X-Test-Id": t, "X-Fake-Delay-Ms": "1000"}
    m = Metrics(d.port)
    hl = list(hs.items()) + [("Content-Type", "application/json")]
    leader = H.Conn(d.port, timeout=15.0)
    leader.send(H.build_request("POST", CHAT, hl, body, port=d.port))
    try:
        check(H.wait_until(lambda: calls(f, t) == 1, 3.0), "leader not upstream")
        if sse:
            r = leader.read_head(5.0)
            check(r.status == 200, "leader status %s", r.status)
            it = leader.iter_body(r, 5.0)
            next(it)
        results = {}

        def follower(i):
            if sse:
                results[i] = H.sse_request(d.port, body, hs, timeout=15.0)
            else:
                results[i] = post(d.port, body, hs)
        ths = [threading.Thread(target=follower, args=(i,)) for i in range(10)]
        for th in ths:
            th.start()
        ok = H.wait_until(lambda: scrape(d.port) and
                          metric(scrape(d.port), "dsgate_coalesced_total") -
                          metric(m.before, "dsgate_coalesced_total") >= 10, 5.0, 0.02)
        check(ok, "the followers did not all join")
    finally:
        leader.close()
    for th in ths:
        th.join(20)
    check(len(results) == 10, "only %d followers answered", len(results))
    bodies = set()
    for i, r in results.items():
        if sse:
            check(r.error is None and r.resp.status == 200, "follower %d: %s", i,
                  r.error or r.resp.status)
            check(sse_done(r), "follower %d: no [DONE]", i)
            check(not [e for e in r.events if H.is_error_event(e)], "follower %d: error event",
                  i)
            bodies.add(r.raw)
        else:
            expect(r, 200, None, "follower %d" % i)
            r.json()
            bodies.add(r.body)
    n = calls(f, t)
    note("leader left (%s): upstream calls %d, distinct bodies %d", "stream" if sse else "json",
         n, len(bodies))
    check(n <= 2, "upstream saw %d calls", n)
    check(len(bodies) <= n, "%d different bodies from %d upstream calls", len(bodies), n)
    check(d.alive(), "dsgate died")
    # the headless leader's complete answer was stored
    if sse:
        st = stream(d.port, body, hs)
        check(st.resp.header("x-cache") == "HIT" and st.raw in bodies, "afterwards: X-Cache %r",
              st.resp.header("x-cache"))
    else:
        r = post(d.port, body, hs)
        check(xcache(r) == "HIT" and r.body in bodies, "afterwards: X-Cache %r", xcache(r))


def t_leader_leaves_json():
    """The leader's client leaves while 10 followers wait: they all get
    the answer (at most two upstream calls)."""
    _leader_leaves(False)


def t_leader_leaves_stream():
    """The streaming leader's client leaves after the first event: its
    10 followers all get the whole stream."""
    _leader_leaves(True)


def t_leader_fails_follower_leads():
    """The leader's answer is a 500: the waiting followers are not failed;
    one of them goes upstream and the others share its answer."""
    d, f = shared()
    t = tid()
    body = chat("leader fails " + t)
    out = {}
    lead = threading.Thread(target=lambda: out.__setitem__("lead", post(
        d.port, body, {"X-Test-Id": t, "X-Fake-Delay-Ms": "600", "X-Fake-Status": "500"})))
    lead.start()
    check(H.wait_until(lambda: calls(f, t) == 1, 3.0), "leader not upstream")
    res = parallel([lambda: post(d.port, body, {"X-Test-Id": t, "X-Fake-Delay-Ms": "300"})] * 8,
                   8)
    lead.join(10)
    check(out["lead"].status == 500, "leader: %s", out["lead"].status)
    for r in res:
        check(isinstance(r, H.Response), "follower failed: %r", r)
        expect(r, 200, None, "follower")
    check(len({r.body for r in res}) == 1, "followers got different answers")
    check(calls(f, t) == 2, "upstream saw %d calls, want 2", calls(f, t))


def t_stream_leader_breaks():
    """The upstream breaks a stream that followers already replay: every
    client's stream ends with an SSE error event (no [DONE], no hang), and
    nothing is stored."""
    d, f = shared()
    t = tid()
    body = chat("breaks for all " + t, stream=True)
    hs = {"X-Test-Id": t, "X-Fake-Events": "10", "X-Fake-Event-Delay-Ms": "100",
          "X-Fake-Reset-After": "4"}
    out = {}
    lead = threading.Thread(target=lambda: out.__setitem__(
        "lead", H.sse_request(d.port, body, hs, timeout=10.0)))
    lead.start()
    check(H.wait_until(lambda: calls(f, t) == 1, 3.0), "leader not upstream")
    t0 = time.monotonic()
    res = parallel([lambda: H.sse_request(d.port, body, hs, timeout=10.0)] * 5, 5)
    lead.join(10)
    dt = time.monotonic() - t0
    for i, st in enumerate([out.get("lead")] + res):
        check(isinstance(st, H.Stream), "client %d: %r", i, st)
        check(st.error is None and st.resp.status == 200, "client %d: %s", i,
              st.error or st.resp.status)
        check(st.resp.complete, "client %d: no terminating chunk", i)
        check(not sse_done(st), "client %d: [DONE] after a broken stream", i)
        data = [e for e in st.events if e["data"] is not None]
        check(data and H.is_error_event(data[-1]) or (st.events and st.events[-1]["event"] ==
                                                        "error"),
              "client %d: no SSE error event at the end: %r", i, st.raw[-200:])
    check(dt < 5.0, "streams took %.1fs to end", dt)
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))
    st = stream(d.port, body, {"X-Test-Id": t})
    check(st.resp.header("x-cache") == "MISS", "after: X-Cache %r", st.resp.header("x-cache"))


def t_everyone_leaves():
    """Leader and followers all leave before the answer: the upstream
    transfer is cancelled (the fake sees its client close)."""
    d, f = shared()
    t = tid()
    body = chat("nobody waits " + t)
    hs = [("X-Test-Id", t), ("X-Fake-Delay-Ms", "3000"), ("Content-Type", "application/json")]
    m = Metrics(d.port)
    conns = []
    try:
        for i in range(4):
            c = H.Conn(d.port, timeout=5.0)
            c.send(H.build_request("POST", CHAT, hs, body, port=d.port))
            conns.append(c)
            if i == 0:
                check(H.wait_until(lambda: calls(f, t) == 1, 3.0), "leader not upstream")
        check(H.wait_until(lambda: metric(scrape(d.port), "dsgate_coalesced_total") -
                           metric(m.before, "dsgate_coalesced_total") >= 3, 3.0),
              "followers did not join")
    finally:
        t_close = time.monotonic()
        for c in conns:
            c.close()

    def closed():
        e = [x for x in f.log() if (x.get("headers") or {}).get("x-test-id") == t]
        return e and e[0].get("client_closed")
    check(H.wait_until(closed, 2.0), "the upstream transfer was not cancelled within 2 s")
    note("upstream cancelled %.2fs after the last client left", time.monotonic() - t_close)
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))


def t_slow_follower():
    """A follower that reads slowly still gets the whole 1.5 MB answer,
    while the others are not held up."""
    d, f = shared()
    t = tid()
    body = chat("big and slow " + t)
    hs = [("X-Test-Id", t), ("X-Fake-Delay-Ms", "400"), ("X-Fake-Body-Bytes", "1500000"),
          ("Content-Type", "application/json")]
    slow = H.Conn(d.port, timeout=20.0, rcvbuf=4096)
    try:
        out = {}
        lead = threading.Thread(target=lambda: out.__setitem__(
            "lead", post(d.port, body, dict(hs), timeout=20.0)))
        lead.start()
        check(H.wait_until(lambda: calls(f, t) == 1, 3.0), "leader not upstream")
        slow.send(H.build_request("POST", CHAT, hs, body, port=d.port))
        fast = post(d.port, body, dict(hs), timeout=20.0)
        lead.join(20)
        leader = out["lead"]
        check(fast.status == 200 and fast.body == leader.body, "fast follower: %s, %d bytes",
              fast.status, len(fast.body))
        check(fast.header("x-dsgate-coalesced") == "1", "fast one was not coalesced")
        r = slow.read_head(10.0)
        check(r.status == 200, "slow follower: %s", r.status)
        got = []
        for piece in slow.iter_body(r, 20.0):
            got.append(piece)
            if len(got) % 16 == 0:
                time.sleep(0.002)
        check(b"".join(got) == leader.body, "slow follower got %d bytes of %d",
              sum(map(len, got)), len(leader.body))
    finally:
        slow.close()
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))
    # and as a hit, to a slow reader
    c = H.Conn(d.port, timeout=20.0, rcvbuf=4096)
    try:
        c.send(H.build_request("POST", CHAT, hs + [("Connection", "close")], body, port=d.port))
        r = c.read_response(20.0)
        check(xcache(r) == "HIT" and r.body == leader.body, "hit to a slow reader: %r, %d bytes",
              xcache(r), len(r.body))
    finally:
        c.close()


def t_redis_absent_at_start():
    """dsgate starts while Redis is down: requests are served (misses);
    once Redis runs, it is used."""
    f = fake(name="absent")
    port = H.free_port()
    prefix = "dsg-%s:" % tid()
    d = dsgate(f.url, "redis-absent", max_entries=0, redis_url="redis://127.0.0.1:%d" % port,
               prefix=prefix, ttl="60s")
    t = tid()
    body = chat("no redis yet " + t)
    for i in range(3):
        expect(post(d.port, body, {"X-Test-Id": t}), 200, "MISS", "without Redis %d" % i)
    rs = R.Redis(port=port)
    STARTED.append(rs)
    t0 = time.monotonic()

    def hit():
        b = chat("redis now %s %d" % (t, int((time.monotonic() - t0) * 1000)))
        post(d.port, b)
        return xcache(post(d.port, b)) == "HIT"
    check(H.wait_until(hit, 8.0, 0.1), "Redis not used within 8 s of its start")
    note("redis used %.2fs after it started", time.monotonic() - t0)


def t_followers_same_body_keepalive():
    """Followers get the same bytes as the leader's client, also when the
    upstream sent keep-alive white space before the JSON (which dsgate
    drops for the leader and does not store)."""
    d, f = shared()
    t = tid()
    body = chat("keepalive followers " + t)
    res = together(d.port, 5, body, {"X-Test-Id": t, "X-Fake-Delay-Ms": "500",
                                     "X-Fake-Keepalive-Ms": "50"})
    bad = [r for r in res if not isinstance(r, H.Response)]
    check(not bad, "requests failed: %r", bad[:3])
    check(all(r.status == 200 for r in res), "statuses %r", [r.status for r in res])
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))
    starts = sorted({r.body[:3] for r in res})
    check(len({r.body for r in res}) == 1, "leader and followers got different bodies "
          "(beginnings %r; coalesced ones start %r)", starts,
          sorted({r.body[:3] for r in res if r.header("x-dsgate-coalesced")}))
    check(res[0].body[:1] == b"{", "body starts with %r", res[0].body[:10])


def t_gzip_followers_decodable():
    """The upstream compresses (Accept-Encoding: gzip, sent by the openai
    SDKs): every coalesced answer must still be readable as its headers
    say, also for a follower that did not ask for gzip."""
    g = gzip_upstream(delay=0.5)
    d = dsgate(g.url, "gzip-coalesce")
    body = chat("compressed together " + tid())
    gz = {"Accept-Encoding": "gzip, deflate"}
    res = parallel([lambda: post(d.port, body, gz)] +
                   [lambda: (time.sleep(0.15), post(d.port, body, gz))[1]] * 3 +
                   [lambda: (time.sleep(0.15), post(d.port, body))[1]], 5)
    problems = []
    for i, r in enumerate(res):
        check(isinstance(r, H.Response), "request %d failed: %r", i, r)
        check(r.status == 200, "request %d: status %s", i, r.status)
        try:
            decoded_json(r)
        except (ValueError, OSError, EOFError) as e:
            problems.append("#%d coalesced=%s content-encoding=%s: %s (body starts %r)"
                            % (i, r.header("x-dsgate-coalesced"), r.header("content-encoding"),
                               type(e).__name__, r.body[:4]))
    note("gzip upstream: %d upstream calls for 5 identical requests", len(g.requests))
    check(not problems, "%d of 5 answers cannot be read: %s", len(problems),
          "; ".join(problems))


def t_gzip_answers_cached():
    """Answers to clients that send Accept-Encoding: gzip (the openai SDKs
    do) are cached too: the second identical request is a HIT, readable."""
    g = gzip_upstream(delay=0)
    d = dsgate(g.url, "gzip-cache")
    body = chat("compressed twice " + tid())
    gz = {"Accept-Encoding": "gzip, deflate"}
    r1 = post(d.port, body, gz)
    expect(r1, 200, "MISS", "first")
    j1 = decoded_json(r1)
    r2 = post(d.port, body, gz)
    check(r2.status == 200, "second: status %s", r2.status)
    j2 = decoded_json(r2)
    check(xcache(r2) == "HIT", "second: X-Cache %r: an answer to Accept-Encoding: gzip was not "
          "stored (upstream calls %d)", xcache(r2), len(g.requests))
    check(j2 == j1, "hit differs")


# ---------------------------------------------------------------- redis tier

def t_redis_tier_only():
    """max_entries 0 with Redis: MISS, then HITs from Redis; the key is
    prefix + 64 hex digits, a string with a TTL; streams too."""
    rs = redis()
    f = fake(name="redis")
    prefix = "dsg-%s:" % tid()
    d = dsgate(f.url, "redis-only", max_entries=0, redis_url=rs.url, prefix=prefix, ttl="60s")
    t = tid()
    body = chat("to redis " + t)
    m = Metrics(d.port)
    r1 = post(d.port, body, {"X-Test-Id": t})
    expect(r1, 200, "MISS", "first")
    keys = wait_key(rs, prefix)
    check(len(keys) == 1, "keys %r", keys)
    check(re.fullmatch(re.escape(prefix) + "[0-9a-f]{64}", keys[0]), "key name %r", keys[0])
    check(rs.cmd("TYPE", keys[0]) == "string", "type %r", rs.cmd("TYPE", keys[0]))
    pttl = rs.cmd("PTTL", keys[0])
    check(0 < pttl <= 60000, "PTTL %r (ttl 60s)", pttl)
    val = rs.cmd("GET", keys[0])
    check(val.startswith(b"DSGC"), "value starts with %r", val[:8])
    for i in range(2):
        r = post(d.port, body, {"X-Test-Id": t})
        expect(r, 200, "HIT", "redis hit %d" % i)
        check(r.body == r1.body, "hit body differs")
        check(r.header("x-dsgate-attempts") == "0", "attempts %r", r.header("x-dsgate-attempts"))
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))
    m.update()
    check(m.delta("dsgate_cache_hits_total", tier="redis") == 2, "hits{redis} +%s",
          m.delta("dsgate_cache_hits_total", tier="redis"))
    check(m.delta("dsgate_cache_hits_total", tier="memory") == 0, "hits{memory} +%s",
          m.delta("dsgate_cache_hits_total", tier="memory"))
    check(m.delta("dsgate_cache_stores_total", tier="redis") == 1, "stores{redis} +%s",
          m.delta("dsgate_cache_stores_total", tier="redis"))
    check(m.delta("dsgate_cache_stores_total", tier="memory") == 0, "stores{memory} +%s",
          m.delta("dsgate_cache_stores_total", tier="memory"))
    check(m.delta("dsgate_cache_misses_total") == 1, "misses +%s",
          m.delta("dsgate_cache_misses_total"))
    check(m.delta("dsgate_cache_errors_total") == 0, "errors +%s",
          m.delta("dsgate_cache_errors_total"))
    # a stream through Redis
    sb = chat("stream to redis " + t, stream=True)
    s1 = stream(d.port, sb, {"X-Test-Id": t})
    check(s1.resp.header("x-cache") == "MISS", "stream first %r", s1.resp.header("x-cache"))
    wait_key(rs, prefix, 2)
    s2 = stream(d.port, sb, {"X-Test-Id": t})
    check(s2.resp.header("x-cache") == "HIT", "stream second %r", s2.resp.header("x-cache"))
    check((s2.resp.header("content-type") or "").startswith("text/event-stream"),
          "content-type %r", s2.resp.header("content-type"))
    check(s2.raw == s1.raw and sse_done(s2), "replayed stream differs")
    # credentials scope the Redis tier as well
    r = post(d.port, body, {"X-Test-Id": t, "Authorization": "Bearer sk-other"})
    expect(r, 200, "MISS", "other credential")
    check(calls(f, t) == 3, "upstream saw %d calls", calls(f, t))


def t_redis_promoted():
    """Written by one dsgate, read by a second sharing the Redis: a Redis
    hit, then a memory hit (promoted); it even survives the key's removal."""
    rs = redis()
    f = fake(name="promote")
    prefix = "dsg-%s:" % tid()
    a = dsgate(f.url, "writer", redis_url=rs.url, prefix=prefix)
    b = dsgate(f.url, "reader", redis_url=rs.url, prefix=prefix)
    t = tid()
    body = chat("share me " + t)
    r1 = post(a.port, body, {"X-Test-Id": t})
    expect(r1, 200, "MISS", "writer")
    keys = wait_key(rs, prefix)
    m = Metrics(b.port)
    r2 = post(b.port, body, {"X-Test-Id": t})
    expect(r2, 200, "HIT", "reader first")
    m.update()
    check(m.delta("dsgate_cache_hits_total", tier="redis") == 1, "reader first: hits{redis} +%s",
          m.delta("dsgate_cache_hits_total", tier="redis"))
    check(m.delta("dsgate_cache_hits_total", tier="memory") == 0, "reader first: hits{memory}")
    rs.cmd("DEL", *keys)
    r3 = post(b.port, body, {"X-Test-Id": t})
    expect(r3, 200, "HIT", "reader second (key gone from Redis)")
    m.update()
    check(m.delta("dsgate_cache_hits_total", tier="memory") == 1,
          "reader second: hits{memory} +%s (not promoted)",
          m.delta("dsgate_cache_hits_total", tier="memory"))
    check(m.delta("dsgate_cache_hits_total", tier="redis") == 1, "reader second: hits{redis} +%s",
          m.delta("dsgate_cache_hits_total", tier="redis"))
    check(r1.body == r2.body == r3.body, "bodies differ")
    check(calls(f, t) == 1, "upstream saw %d calls", calls(f, t))


def t_redis_garbage():
    """Junk under the key dsgate reads: a miss (never an error to the
    client), counted as error="garbled"; a wrong type as error="reply"."""
    rs = redis()
    f = fake(name="garbage")
    prefix = "dsg-%s:" % tid()
    d = dsgate(f.url, "garbage", max_entries=0, redis_url=rs.url, prefix=prefix, ttl="60s")
    t = tid()
    body = chat("garble me " + t)
    expect(post(d.port, body, {"X-Test-Id": t}), 200, "MISS", "first")
    key = wait_key(rs, prefix)[0]
    good = rs.cmd("GET", key)
    # a valid entry of another request (its embedded key differs)
    other = chat("another " + t)
    expect(post(d.port, other, {"X-Test-Id": t}), 200, "MISS", "other")
    okey = [k for k in wait_key(rs, prefix, 2) if k != key][0]
    foreign = rs.cmd("GET", okey)
    version = bytearray(good)
    version[4] = (version[4] + 1) % 256     # the next format version
    cases = [
        ("junk", b"junk"),
        ("empty", b""),
        ("truncated", good[:-7]),
        ("longer", good + b"x"),
        ("future_version", bytes(version)),
        ("bad_magic", b"XSGC" + good[4:]),
        ("foreign_entry", foreign),
    ]
    n_calls = 2
    for name, junk in cases:
        rs.cmd("SET", key, junk, "KEEPTTL")
        m = Metrics(d.port)
        r = post(d.port, body, {"X-Test-Id": t})
        expect(r, 200, "MISS", name)
        r.json()
        n_calls += 1
        m.update()
        check(m.delta("dsgate_cache_errors_total", tier="redis", error="garbled") == 1,
              "%s: errors{garbled} +%s", name,
              m.delta("dsgate_cache_errors_total", tier="redis", error="garbled"))
        # the miss stored a good entry again
        check(H.wait_until(lambda: (rs.cmd("GET", key) or b"").startswith(b"DSGC") and
                           rs.cmd("GET", key) != junk, 3.0), "%s: not rewritten", name)
        expect(post(d.port, body, {"X-Test-Id": t}), 200, "HIT", "%s, then" % name)
    # a key of another type: GET answers an error
    rs.cmd("DEL", key)
    rs.cmd("RPUSH", key, "x")
    m = Metrics(d.port)
    expect(post(d.port, body, {"X-Test-Id": t}), 200, "MISS", "wrong type")
    n_calls += 1
    m.update()
    check(m.delta("dsgate_cache_errors_total", tier="redis", error="reply") == 1,
          "wrong type: errors{reply} +%s",
          m.delta("dsgate_cache_errors_total", tier="redis", error="reply"))
    check(calls(f, t) == n_calls, "upstream saw %d calls, want %d", calls(f, t), n_calls)
    check(d.alive(), "dsgate died")


def _load_request(port, i, pool_tag):
    """Request I of the mixed load: every third streamed; half the prompts
    repeat from a pool of 30 (hits), the others are new."""
    sse = i % 3 == 0
    if i % 2 == 0:
        content = "pool %s %d" % (pool_tag, (i // 2) % 30)
    else:
        content = "new %s %d" % (pool_tag, i)
    body = chat(content, stream=sse)
    if sse:
        st = H.sse_request(port, body, {"X-Fake-Events": "4"}, timeout=20.0)
        if st.error or st.resp is None or st.resp.status != 200:
            return "stream %d: %s" % (i, st.error or (st.resp and st.resp.status))
        if not sse_done(st) or st.joined("content") != "echo: " + content:
            return "stream %d: incomplete (%r)" % (i, st.joined("content")[:60])
        return st.resp.header("x-cache")
    r = post(port, body, timeout=20.0)
    if r.status != 200:
        return "json %d: status %d" % (i, r.status)
    if content_of(r) != "echo: " + content:
        return "json %d: content %r" % (i, content_of(r)[:60])
    return xcache(r)


def t_redis_killed_under_load():
    """SIGKILL Redis during 300 mixed requests at concurrency 20, start it
    again on the same port: no client request fails, and soon after the
    restart entries are written to and read from Redis again."""
    rs = redis()
    f = fake("--latency-ms", "120", name="kill")
    prefix = "dsg-%s:" % tid()
    d = dsgate(f.url, "redis-kill", max_entries=0, redis_url=rs.url, prefix=prefix, ttl="60s")
    tag = tid()
    done = [0]
    lock = threading.Lock()
    events = {}

    def one(i):
        try:
            return _load_request(d.port, i, tag)
        except Exception as e:                  # noqa: BLE001
            return "request %d: %s: %s" % (i, type(e).__name__, e)
        finally:
            with lock:
                done[0] += 1

    def controller():
        H.wait_until(lambda: done[0] >= 90, 30.0, 0.005)
        rs.kill()
        events["kill"] = time.monotonic()
        events["kill_at"] = done[0]
        H.wait_until(lambda: done[0] >= 180 and time.monotonic() - events["kill"] >= 0.8,
                     30.0, 0.005)
        rs.start()
        events["restart"] = time.monotonic()
        events["restart_at"] = done[0]
    ctl = threading.Thread(target=controller, daemon=True)
    ctl.start()
    t0 = time.monotonic()
    res = parallel([lambda i=i: one(i) for i in range(300)], 20)
    dt = time.monotonic() - t0
    ctl.join(30)
    check("restart" in events, "Redis was not restarted (events %r)", events)
    bad = [x for x in res if x not in ("HIT", "MISS")]
    counts = {k: res.count(k) for k in ("HIT", "MISS")}
    note("redis killed after %d, restarted after %d of 300 requests; load %.1fs; %r; "
         "failures %d", events.get("kill_at", -1), events.get("restart_at", -1), dt, counts,
         len(bad))
    check(not bad, "%d requests failed: %r", len(bad), bad[:5])
    check(counts["HIT"] > 0, "no hits at all")
    # the cache works again: a new entry goes to Redis and comes back as a Redis hit
    t = tid()
    back = None
    deadline = events["restart"] + 8.0
    k = 0
    while time.monotonic() < deadline:
        k += 1
        body = chat("after restart %s %d" % (t, k))
        expect(post(d.port, body), 200, None, "after restart")
        if redis_keys(rs, prefix):
            m = Metrics(d.port)
            r = post(d.port, body)
            expect(r, 200, None, "read back")
            if xcache(r) == "HIT":
                m.update()
                check(m.delta("dsgate_cache_hits_total", tier="redis") == 1, "hit not from redis")
                back = time.monotonic() - events["restart"]
                break
        time.sleep(0.05)
    check(back is not None, "Redis not used again within 8 s of its restart")
    note("cache used again %.2fs after the restart", back)
    check(back <= 6.0, "Redis used again only %.1fs after its restart", back)
    s = scrape(d.port)
    lost = sum(metric(s, name, error=e)
               for name in ("dsgate_cache_errors_total", "dsgate_redis_errors_total")
               for e in ("disconnect", "connect"))
    check(lost > 0, "no disconnect/connect errors counted: %r",
          [(n, ls, v) for n, ls, v in s if n.endswith("errors_total")])


def t_redis_paused():
    """SIGSTOP Redis: every request still succeeds, each delayed by about
    cache.redis.timeout (50ms) at most; after SIGCONT Redis hits again."""
    rs = redis()
    f = fake(name="pause")
    prefix = "dsg-%s:" % tid()
    d = dsgate(f.url, "redis-pause", max_entries=0, redis_url=rs.url, prefix=prefix, ttl="60s",
               redis_timeout="50ms")
    t = tid()
    body = chat("before the pause " + t)
    expect(post(d.port, body), 200, "MISS", "warm")
    wait_key(rs, prefix)
    expect(post(d.port, body), 200, "HIT", "warm hit")

    def timed(b):
        t1 = time.monotonic()
        r = post(d.port, b, timeout=10.0)
        return r, time.monotonic() - t1
    base = []
    for i in range(10):
        r, dt = timed(chat("baseline %s %d" % (t, i)))
        expect(r, 200, "MISS", "baseline")
        base.append(dt)
    rs.pause()
    try:
        paused = []
        for i in range(20):
            r, dt = timed(body if i % 2 == 0 else chat("paused %s %d" % (t, i)))
            expect(r, 200, "MISS", "paused %d" % i)
            paused.append(dt)
        res = parallel([lambda i=i: timed(chat("paused load %s %d" % (t, i)))
                        for i in range(100)], 20)
        bad = [x for x in res if not isinstance(x, tuple) or x[0].status != 200]
        check(not bad, "%d requests failed while Redis was paused: %r", len(bad), bad[:3])
        load = [dt for _, dt in res]
        # go on for a second: reconnects to the stopped Redis stay bounded too
        t_end = time.monotonic() + 1.0
        i = 0
        while time.monotonic() < t_end:
            i += 1
            r, dt = timed(chat("paused later %s %d" % (t, i)))
            expect(r, 200, "MISS", "paused later %d" % i)
            paused.append(dt)
        s = scrape(d.port)
    finally:
        rs.resume()
    bmax = max(base)
    note("redis paused: baseline max %.0f ms; sequential max %.0f ms, median %.0f ms; "
         "under load (20) max %.0f ms; timeouts %d, link resets %d", bmax * 1000,
         max(paused) * 1000, sorted(paused)[len(paused) // 2] * 1000, max(load) * 1000,
         metric(s, "dsgate_cache_errors_total", error="timeout"),
         metric(s, "dsgate_cache_errors_total", error="stuck") +
         metric(s, "dsgate_redis_errors_total", error="stuck"))
    check(max(paused) <= bmax + 0.05 + 0.25, "a request took %.0f ms while Redis was paused "
          "(baseline max %.0f ms, timeout 50 ms)", max(paused) * 1000, bmax * 1000)
    check(max(load) <= 1.5, "under load a request took %.0f ms", max(load) * 1000)
    check(metric(s, "dsgate_cache_errors_total", tier="redis", error="timeout") > 0,
          "no timeouts counted")
    # Redis back: hits again
    t_resume = time.monotonic()
    ok = H.wait_until(lambda: xcache(post(d.port, body)) == "HIT", 8.0, 0.05)
    check(ok, "no Redis hit within 8 s after SIGCONT")
    note("redis hit again %.2fs after SIGCONT", time.monotonic() - t_resume)


# ---------------------------------------------------------------- runner

TESTS = [
    ("miss_then_hit_same_id", t_miss_then_hit),
    ("key_order_whitespace_variants_hit", t_variants_hit),
    ("different_requests_miss", t_different_requests_miss),
    ("query_string_in_key", t_query_in_key),
    ("embeddings_completions_cached", t_embeddings_cached),
    ("credentials_never_share", t_credentials_scoped),
    ("credentials_never_coalesce", t_credentials_never_coalesce),
    ("shared_cache_across_credentials", t_shared_cache),
    ("no_store_bypass", t_no_store_bypass),
    ("no_store_not_coalesced", t_no_store_not_coalesced),
    ("no_cache_skips_lookup_stores", t_no_cache_refreshes),
    ("no_cache_during_flight_stores", t_no_cache_during_flight),
    ("ttl_expiry", t_ttl_expiry),
    ("lru_eviction_by_count", t_lru_by_count),
    ("lru_eviction_by_bytes", t_lru_by_bytes),
    ("memory_off_without_redis", t_memory_off_no_redis),
    ("cache_disabled", t_cache_disabled),
    ("stream_replay_same_sse", t_stream_replay),
    ("keepalive_not_stored", t_keepalive_trimmed),
    ("errors_not_cached", t_errors_not_cached),
    ("truncated_not_cached", t_truncated_not_cached),
    ("partial_stream_not_cached", t_partial_stream_not_cached),
    ("ok_status_error_or_junk_not_cached", t_200_error_or_junk_not_cached),
    ("oversized_not_cached_nor_shared", t_oversized_not_cached),
    ("coalesce_50_json_one_call", t_coalesce_50_json),
    ("coalesce_50_stream_one_call", t_coalesce_50_stream),
    ("late_follower_streams", t_late_follower_streams),
    ("leader_leaves_json", t_leader_leaves_json),
    ("leader_leaves_stream", t_leader_leaves_stream),
    ("leader_fails_follower_leads", t_leader_fails_follower_leads),
    ("stream_leader_breaks_followers_end", t_stream_leader_breaks),
    ("everyone_leaves_upstream_cancelled", t_everyone_leaves),
    ("slow_follower_gets_everything", t_slow_follower),
    ("followers_same_body_after_keepalive", t_followers_same_body_keepalive),
    ("gzip_upstream_followers_decodable", t_gzip_followers_decodable),
    ("gzip_answers_cached", t_gzip_answers_cached),
    ("redis_tier_only", t_redis_tier_only),
    ("redis_hit_promoted_to_memory", t_redis_promoted),
    ("redis_garbage_is_a_miss", t_redis_garbage),
    ("redis_absent_at_start", t_redis_absent_at_start),
    ("redis_killed_under_load", t_redis_killed_under_load),
    ("redis_paused_sigstop", t_redis_paused),
]


def _shared_alive(run, name):
    if "d" in SHARED and not SHARED["d"].alive():
        run.fail(name + "_dsgate_died", "the shared dsgate died: %s; log %s"
                 % (SHARED["d"].crash_summary(), SHARED["d"].log_path))


def _stop_shared(run):
    if "d" in SHARED:
        d = SHARED["d"]
        alive = d.alive()
        rc = d.stop()
        if alive and rc == 0:
            run.ok("shared_dsgate_clean_exit")
        elif alive:
            run.fail("shared_dsgate_clean_exit", "exit status %s on SIGTERM; log %s"
                     % (rc, d.log_path))
    if "f" in SHARED:
        SHARED["f"].stop()


def main():
    return H.main("test_cache", TESTS, started=STARTED, after_each=_shared_alive,
                  final=_stop_shared)


if __name__ == "__main__":
    sys.exit(main())
