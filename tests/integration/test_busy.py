#!/usr/bin/env python3
"""
test_busy: surviving a busy upstream (issue 3) through the real daemon.

The priority queue, the adaptive concurrency limit and jittered retries with
a budget, driven over real sockets against build/fake_upstream (capacity,
random 503s, latency, per-request X-Fake-* steering) and, where an upstream
must change its answer between attempts, harness.ScriptedUpstream.  Each test starts the dsgate (and fake) it needs with a small config
(retry.base tens of ms, short queue timeouts), stops them at its end, and
keeps its own time bounded; the whole file runs in well under 90 s.

The circuit breaker (5 consecutive failures open it) shapes a total 503
outage: clients then wait in the queue and get 504 (design.md, Outages).  So
the budget's exact arithmetic is measured with a retryable answer the breaker
does not count: 408, added to retry.on.

Numbers worth seeing (amplification, measured gaps) are printed as `# `
lines next to the PASS/FAIL lines.  `test_busy.py NAME...` runs only those.
"""

import concurrent.futures
import email.utils
import json
import os
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check, log_for, note, scrape                # noqa: E402

CHAT = "/v1/chat/completions"
STARTED = []        # (kind, object) started by the running test, stopped after it


def tid():
    return uuid.uuid4().hex[:12]


def chat_body(content="hello", stream=False):
    b = {"model": "deepseek-chat", "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


# ---------------------------------------------------------------- processes

def fake(*args, name="busy"):
    f = H.Fake(*args, name=name)
    STARTED.append(f)
    return f


def config(port, url, name="fake", max_inflight=4, adaptive=False, max_queued=10000,
           max_wait="30s", aging="0", attempts=5, base="50ms", cap="2s", jitter="full",
           budget=0.5, connect="2s", first_data="30s", default_priority="medium", extra=""):
    lines = [
        "# written by tests/integration/test_busy.py",
        "listen: 127.0.0.1:%d" % port,
        "upstreams:",
        "  - name: %s" % name,
        "    url: %s" % H.yaml_quote(url),
        "    max_inflight: %d" % max_inflight,
        "    adaptive: %s" % ("true" if adaptive else "false"),
        "    timeouts: {connect: %s, first_data: %s, idle: 30s, total: 0}" % (connect, first_data),
        "queue:",
        "  max_queued: %d" % max_queued,
        "  max_wait: %s" % max_wait,
        "  default_priority: %s" % default_priority,
        "  aging: %s" % aging,
        "retry:",
        "  max_attempts: %d" % attempts,
        "  base: %s" % base,
        "  cap: %s" % cap,
        "  jitter: %s" % jitter,
        "  budget: %s" % budget,
        "cache:",
        "  enabled: false",
        "shutdown_timeout: 3s",
        "log: {level: info, format: json}",
    ]
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


def dsgate(url, tag, env=None, **cfg):
    port = H.free_port()
    d = H.Dsgate(config_text=config(port, url, **cfg), tag="busy-" + tag, port=port, env=env)
    STARTED.append(d)
    return d


# ---------------------------------------------------------------- metrics

def metric(samples, name, **labels):
    """Sum of NAME's samples whose labels include LABELS; None if there is none."""
    vals = [v for n, ls, v in samples
            if n == name and all(ls.get(k) == str(x) for k, x in labels.items())]
    return sum(vals) if vals else None


def queue_depth(port, prio=None):
    s = scrape(port)
    if prio:
        return metric(s, "dsgate_queue_depth", priority=prio) or 0
    return metric(s, "dsgate_queue_depth") or 0


def wait_depth(port, prio, n, timeout=5.0):
    got = H.wait_until(lambda: queue_depth(port, prio) == n, timeout, 0.02)
    check(got, "queue depth %s did not reach %d (is %s)", prio or "total", n,
          queue_depth(port, prio))


# ---------------------------------------------------------------- clients

class Pending:
    """A request sent now whose answer a thread reads (or that we abandon)."""

    def __init__(self, port, headers=None, body=None, path=CHAT, timeout=20.0, read=True):
        hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        hs += [("Content-Type", "application/json"), ("Connection", "close")]
        self.conn = H.Conn(port, timeout=timeout)
        self.timeout = timeout
        self.resp = None
        self.error = None
        self.t_end = None
        self.t_sent = time.monotonic()
        self.conn.send(H.build_request("POST", path, hs, body if body is not None else chat_body(),
                                       port=port))
        self.thread = None
        if read:
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self):
        try:
            self.resp = self.conn.read_response(self.timeout)
        except Exception as e:                  # noqa: BLE001
            self.error = e
        finally:
            self.t_end = time.monotonic()
            self.conn.close()

    def wait(self, timeout=None):
        self.thread.join(timeout if timeout is not None else self.timeout + 5)
        check(not self.thread.is_alive(), "no answer in time")
        check(self.resp is not None, "no response: %s", self.error)
        return self.resp

    def elapsed(self):
        return self.t_end - self.t_sent

    def close(self):
        self.conn.close()


def load(port, n, concurrency, headers=None, timeout=30.0, body=None):
    """N requests at CONCURRENCY; [(status or None, response or error)]."""
    def one(i):
        try:
            return H.request(port, "POST", CHAT, headers=headers or {},
                             body=body if body is not None else chat_body("load %d" % i),
                             timeout=timeout)
        except Exception as e:                  # noqa: BLE001
            return e
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(one, range(n)))


def statuses(results):
    out = {}
    for r in results:
        k = r.status if isinstance(r, H.Response) else type(r).__name__
        out[k] = out.get(k, 0) + 1
    return out


def attempts_of(r):
    return int(r.header("x-dsgate-attempts") or "0")


# ---------------------------------------------------------------- scripted upstream

def answer(status, headers, body, hold=None):
    """A ScriptedUpstream answer: STATUS, HEADERS (Content-Type: application/json
    unless given), BODY, then a close.  With HOLD (s), no Content-Length and
    the connection stays open (silent) for that long after the body, or
    until dsgate gives up on it, as a stalled upstream."""
    hs = list(headers)
    if not any(k.lower() == "content-type" for k, _ in hs):
        hs.append(("Content-Type", "application/json"))
    if hold is None:
        hs.append(("Content-Length", str(len(body))))
    hs.append(("Connection", "close"))
    a = {"status": status, "reason": "X", "headers": hs, "body": body, "framing": "none"}
    if hold is not None:
        a.update(action="hold", hold_ms=hold * 1000)
    return a


OK_BODY = json.dumps({
    "id": "chatcmpl-scripted", "object": "chat.completion", "created": 1, "model": "deepseek-chat",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "scripted ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}).encode()


def err_body(status, kind):
    return json.dumps({"error": {"message": "scripted %d" % status, "type": kind,
                                 "code": kind}}).encode()


def scripted(answers):
    """An upstream whose Nth request gets answer(*ANSWERS[N]) (the last one
    again when the script is used up), one request per connection; records
    when each request arrived (.arrivals)."""
    s = H.ScriptedUpstream([answer(*a) for a in answers])
    STARTED.append(s)
    return s


# ---------------------------------------------------------------- tests

def t_every_request_completes():
    """capacity 4, 100 ms, 20 % random 503: 60 requests at concurrency 30
    through max_inflight 4: all 200, the fake never sees more than 4."""
    f = fake("--capacity", "4", "--latency-ms", "100", "--fail-rate", "0.2", "--seed", "7",
             name="cap4")
    d = dsgate(f.url, "complete", max_inflight=4, adaptive=True, attempts=10, base="50ms",
               cap="400ms", budget=0.5)
    t = time.monotonic()
    res = load(d.port, 60, 30, timeout=40.0)
    dt = time.monotonic() - t
    st = f.stats()
    amp = st["requests"] / 60.0
    att = [attempts_of(r) for r in res if isinstance(r, H.Response)]
    note("every_request_completes: %.1fs, fake requests %d for 60 (amplification %.2f), "
         "fake max_inflight %d, attempts max %s", dt, st["requests"], amp, st["max_inflight"],
         max(att) if att else None)
    check(statuses(res) == {200: 60}, "statuses %r", statuses(res))
    for i, r in enumerate(res):
        c = r.json()["choices"][0]["message"]["content"]
        check(c == "echo: load %d" % i, "request %d got %r", i, c)
    check(st["max_inflight"] <= 4, "the fake saw %d concurrent requests (limit 4)",
          st["max_inflight"])
    check(st["requests"] == sum(att), "fake requests %d != sum of X-Dsgate-Attempts %d",
          st["requests"], sum(att))
    check(amp < 2.0, "amplification %.2f", amp)
    check(queue_depth(d.port) == 0, "queue not empty at the end")


def t_priority_high_first():
    """max_inflight 1, 100 ms a request: 3 high sent behind 10 queued low
    finish before most of them."""
    f = fake("--latency-ms", "100", name="prio")
    d = dsgate(f.url, "prio", max_inflight=1, aging="0")
    lows = []
    for i in range(10):
        lows.append(Pending(d.port, {"X-Priority": "low"}, chat_body("low %d" % i)))
    wait_depth(d.port, "low", 9)
    highs = [Pending(d.port, {"X-Priority": "high"}, chat_body("high %d" % i)) for i in range(3)]
    for p in lows + highs:
        r = p.wait()
        check(r.status == 200, "status %s %r", r.status, r.body[:200])
    order = sorted(lows + highs, key=lambda p: p.t_end)
    names = ["H" if p in highs else "L" for p in order]
    note("priority completion order: %s", "".join(names))
    last_high = max(order.index(h) for h in highs)
    lows_before = sum(1 for p in order[:last_high] if p in lows)
    check(lows_before <= 2, "%d low requests finished before the last high (order %s)",
          lows_before, "".join(names))
    hmax = max(p.t_end for p in highs)
    lows_after = sum(1 for p in lows if p.t_end > hmax)
    check(lows_after >= 7, "only %d low finished after the highs", lows_after)
    for p in highs:
        q = int(p.resp.header("x-dsgate-queue-ms") or "-1")
        check(q > 0, "a queued high request has X-Dsgate-Queue-Ms %d", q)
    queued_lows = [p for p in lows if int(p.resp.header("x-dsgate-queue-ms") or "-1") > 0]
    check(len(queued_lows) >= 9, "only %d low requests report queue time", len(queued_lows))
    s = scrape(d.port)
    c = metric(s, "dsgate_queue_wait_seconds_count")
    check(c is not None and c >= 12, "dsgate_queue_wait_seconds_count %r", c)


def served_before(f, a, b):
    """Did the fake receive the request with X-Test-Id A before B's?"""
    ea, eb = log_for(f, a), log_for(f, b)
    check(ea and eb, "not both in the fake's log: %s %d, %s %d", a, len(ea), b, len(eb))
    return ea[0]["seq"] < eb[0]["seq"]


def t_aging():
    """aging 200 ms: a low request queued long enough is served before a
    newer medium one (without aging the medium would go first)."""
    f = fake(name="aging")
    for aging, hold_ms, wait_s in (("200ms", 1200, 0.5), ("0", 600, 0.2)):
        d = dsgate(f.url, "aging-" + aging, max_inflight=1, aging=aging)
        hold = Pending(d.port, {"X-Fake-Delay-Ms": str(hold_ms)}, chat_body("holder"))
        H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0)
        low = Pending(d.port, {"X-Priority": "low", "X-Test-Id": "low-" + aging},
                      chat_body("old low"))
        wait_depth(d.port, "low", 1)
        time.sleep(wait_s)      # with aging, the low ages past medium meanwhile
        med = Pending(d.port, {"X-Priority": "medium", "X-Test-Id": "med-" + aging},
                      chat_body("new medium"))
        wait_depth(d.port, "medium", 1)
        for p in (hold, low, med):
            check(p.wait().status == 200, "status %s", p.resp.status)
        first = served_before(f, "low-" + aging, "med-" + aging)
        if aging != "0":
            check(first, "aging %s: the aged low went upstream after the newer medium", aging)
        else:
            check(not first, "without aging the low still went before the medium")


def t_queue_full():
    """max_queued 2: a request that finds the queue full gets 429 with
    Retry-After; a higher-class arrival displaces the newest queued request
    of the lowest class below it, which gets the 429."""
    f = fake(name="full")
    d = dsgate(f.url, "full", max_inflight=1, max_queued=2)
    hold = Pending(d.port, {"X-Fake-Delay-Ms": "2500"}, chat_body("holder"))
    H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0)
    l1 = Pending(d.port, {"X-Priority": "low", "X-Test-Id": "l1"}, chat_body("low 1"))
    wait_depth(d.port, "low", 1)
    l2 = Pending(d.port, {"X-Priority": "low", "X-Test-Id": "l2"}, chat_body("low 2"))
    wait_depth(d.port, "low", 2)

    def refused(prio):
        t = time.monotonic()
        r = H.request(d.port, "POST", CHAT, headers={"X-Priority": prio, "X-Test-Id": "extra"},
                      body=chat_body("extra"))
        check(r.status == 429, "%s beyond max_queued: %s %r", prio, r.status, r.body[:200])
        check(time.monotonic() - t < 1.0, "the 429 was not immediate")
        why = H.openai_error_shape(r)
        check(why is None, "429 body: %s", why)
        ra = r.header("retry-after")
        check(ra is not None and ra.strip().isdigit() and int(ra) >= 1, "Retry-After %r", ra)

    refused("low")              # full, nothing lower to shed
    check(queue_depth(d.port) == 2, "queue depth %s after the refusal", queue_depth(d.port))
    # a high arrival sheds l2 (the newest low) and takes its place
    h1 = Pending(d.port, {"X-Priority": "high", "X-Test-Id": "h1"}, chat_body("high 1"))
    r2 = l2.wait(5.0)
    check(r2.status == 429, "displaced low: %s %r", r2.status, r2.body[:200])
    check(H.openai_error_shape(r2) is None, "displaced 429 body: %s", H.openai_error_shape(r2))
    check(r2.header("retry-after"), "displaced 429 without Retry-After")
    check(hold.t_end is None or r2.t_end < hold.t_end, "the displaced low waited for the slot")
    wait_depth(d.port, "high", 1)
    # a medium sheds the last low; then a medium and a low find nothing lower
    m1 = Pending(d.port, {"X-Priority": "medium", "X-Test-Id": "m1"}, chat_body("medium 1"))
    r1 = l1.wait(5.0)
    check(r1.status == 429, "displaced low 1: %s %r", r1.status, r1.body[:200])
    wait_depth(d.port, "medium", 1)
    refused("low")
    refused("medium")
    check(queue_depth(d.port, "high") == 1 and queue_depth(d.port, "medium") == 1,
          "queue should hold h1 and m1")
    for p, want in ((hold, "echo: holder"), (h1, "echo: high 1"), (m1, "echo: medium 1")):
        r = p.wait()
        check(r.status == 200, "%s: %s %r", want, r.status, r.body[:200])
        check(r.json()["choices"][0]["message"]["content"] == want, "content %r", r.body[:200])
    check(served_before(f, "h1", "m1"), "the high went upstream after the medium")
    for t in ("l1", "l2", "extra"):
        check(not log_for(f, t), "refused or displaced request %s reached the upstream", t)
    s = scrape(d.port)
    n429 = metric(s, "dsgate_requests_total", code="429") or 0
    check(n429 == 5, "dsgate_requests_total{code=429} %r, want 5", n429)


def t_max_wait():
    """queue.max_wait 1s behind an upstream that never answers: 504 in ~1 s."""
    f = fake(name="wait")
    d = dsgate(f.url, "wait", max_inflight=1, max_wait="1s")
    hold = Pending(d.port, {"X-Fake-Never": "1"}, chat_body("holder"), read=False)
    try:
        H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0)
        t = time.monotonic()
        q = Pending(d.port, {"X-Test-Id": "queued"}, chat_body("queued"))
        r = q.wait(10.0)
        dt = q.t_end - t
        note("max_wait: 504 after %.2fs", dt)
        check(r.status == 504, "status %s %r", r.status, r.body[:200])
        check(H.openai_error_shape(r) is None, "504 body: %s", H.openai_error_shape(r))
        check(0.9 <= dt <= 2.5, "504 after %.2fs, want about 1 s", dt)
        check(r.header("x-dsgate-attempts") == "0", "X-Dsgate-Attempts %r",
              r.header("x-dsgate-attempts"))
        check(not log_for(f, "queued"), "the timed-out request reached the upstream")
        check(queue_depth(d.port) == 0, "queue depth %s", queue_depth(d.port))
    finally:
        hold.close()
    # closing the holder frees the slot: the gateway serves again
    H.wait_until(lambda: f.stats()["inflight"] == 0, 5.0)
    r = H.request(d.port, "POST", CHAT, body=chat_body("after"), timeout=10.0)
    check(r.status == 200, "after the holder left: %s", r.status)


def t_client_leaves_queue():
    """A client that leaves while queued is never sent upstream."""
    f = fake(name="leave")
    d = dsgate(f.url, "leave", max_inflight=1)
    hold = Pending(d.port, {"X-Fake-Delay-Ms": "800"}, chat_body("holder"))
    H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0)
    gone = Pending(d.port, {"X-Test-Id": "leaver", "X-Priority": "high"}, chat_body("leaver"),
                   read=False)
    wait_depth(d.port, "high", 1)
    gone.close()
    wait_depth(d.port, None, 0, timeout=2.0)
    check(hold.wait().status == 200, "holder %s", hold.resp.status)
    after = H.request(d.port, "POST", CHAT, headers={"X-Test-Id": "after"},
                      body=chat_body("after"), timeout=10.0)
    check(after.status == 200, "after: %s", after.status)
    check(log_for(f, "after"), "the next request did not reach the fake")
    check(not log_for(f, "leaver"), "the request whose client left reached the upstream")
    s = scrape(d.port)
    check((metric(s, "dsgate_queue_depth") or 0) == 0, "queue depth %r",
          metric(s, "dsgate_queue_depth"))
    check((metric(s, "dsgate_inflight") or 0) == 0, "inflight %r", metric(s, "dsgate_inflight"))


def t_priority_sources():
    """The class comes from X-Priority, else the client's token, else
    queue.default_priority; a token's class is a ceiling the header cannot
    raise."""
    f = fake(name="prio-src")
    env = {"BUSY_TOKEN_HI": "tok-hi-" + tid(), "BUSY_TOKEN_LO": "tok-lo-" + tid()}
    d = dsgate(f.url, "prio-src", env=env, max_inflight=1, default_priority="low",
               extra="clients:\n  - {token_env: BUSY_TOKEN_HI, priority: high}\n"
                     "  - {token_env: BUSY_TOKEN_LO, priority: low}\n")
    hi = {"Authorization": "Bearer " + env["BUSY_TOKEN_HI"]}
    lo = {"Authorization": "Bearer " + env["BUSY_TOKEN_LO"]}
    hold = Pending(d.port, dict(hi, **{"X-Fake-Delay-Ms": "1500"}), chat_body("holder"))
    H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0)
    cases = [
        ("low token, no header", lo, "low"),
        ("low token, X-Priority high (ceiling)", dict(lo, **{"X-Priority": "high"}), "low"),
        ("high token, no header", hi, "high"),
        ("high token, X-Priority low", dict(hi, **{"X-Priority": "low"}), "low"),
        ("high token, X-Priority medium", dict(hi, **{"X-Priority": "MEDIUM"}), "medium"),
    ]
    want = {"high": 0, "medium": 0, "low": 0}
    waiting = []
    for what, hs, cls in cases:
        waiting.append(Pending(d.port, hs, chat_body(what)))
        want[cls] += 1
        ok = H.wait_until(lambda: all(queue_depth(d.port, c) == n for c, n in want.items()),
                          5.0)
        check(ok, "%s: queue depths %r, want %r", what,
              {c: queue_depth(d.port, c) for c in want}, want)
    r = H.request(d.port, "POST", CHAT, body=chat_body("no token"))
    check(r.status == 401, "no token: %s", r.status)
    for p in [hold] + waiting:
        check(p.wait().status == 200, "status %s", p.resp.status)
    # without clients: the default class
    d2 = dsgate(f.url, "prio-default", max_inflight=1, default_priority="low")
    hold = Pending(d2.port, {"X-Fake-Delay-Ms": "600"}, chat_body("holder"))
    H.wait_until(lambda: f.stats()["inflight"] == 1, 5.0)
    q = Pending(d2.port, {}, chat_body("default"))
    wait_depth(d2.port, "low", 1)
    for p in (hold, q):
        check(p.wait().status == 200, "status %s", p.resp.status)


def t_client_leaves_backoff():
    """A client that leaves during the backoff is not retried."""
    f = fake(name="leave-backoff")
    d = dsgate(f.url, "leave-backoff", attempts=3, base="50ms", cap="5s")
    p = Pending(d.port, {"X-Fake-Status": "503", "X-Fake-Retry-After": "1",
                         "X-Test-Id": "gone"}, chat_body("gone"), read=False)
    check(H.wait_until(lambda: len(log_for(f, "gone")) == 1, 5.0), "first attempt not seen")
    time.sleep(0.2)             # the 503 is back: dsgate sleeps 1 s now
    p.close()
    time.sleep(1.5)             # past the retry that must not happen
    n = len(log_for(f, "gone"))
    check(n == 1, "%d attempts: the request was retried after its client left", n)
    s = scrape(d.port)
    check((metric(s, "dsgate_requests_total") or 0) == 1, "dsgate_requests_total %r",
          metric(s, "dsgate_requests_total"))
    check((metric(s, "dsgate_inflight") or 0) == 0, "inflight %r", metric(s, "dsgate_inflight"))


def t_retry_after_respected():
    """503 + Retry-After: 1 twice with max_attempts 2: attempts >= 1 s apart;
    the client gets the second 503 unchanged, X-Dsgate-Attempts: 2."""
    f = fake(name="ra")
    d = dsgate(f.url, "ra", attempts=2, base="50ms", cap="5s")
    hs = {"X-Fake-Status": "503", "X-Fake-Retry-After": "1", "X-Test-Id": "ra"}
    r = H.request(d.port, "POST", CHAT, headers=hs, body=chat_body("ra"), timeout=15.0)
    check(r.status == 503, "status %s", r.status)
    check(r.header("x-dsgate-attempts") == "2", "X-Dsgate-Attempts %r",
          r.header("x-dsgate-attempts"))
    check(r.header("retry-after") == "1", "Retry-After %r", r.header("retry-after"))
    check(r.header("x-fake-name") == "ra", "not the upstream's answer: %r", r.headers)
    direct = H.request(f.port, "POST", CHAT, headers={"X-Fake-Status": "503"},
                       body=chat_body("ra"))
    check(r.body == direct.body, "503 body changed: %r vs the fake's %r", r.body, direct.body)
    ents = sorted(log_for(f, "ra"), key=lambda e: e["t_start_ms"])
    check(len(ents) == 2, "%d attempts reached the fake, want 2", len(ents))
    gap = ents[1]["t_start_ms"] - ents[0]["t_start_ms"]
    note("retry_after: gap between attempts %.0f ms (Retry-After: 1)", gap)
    check(gap >= 995, "attempts %.0f ms apart, Retry-After asked for 1000", gap)
    check(gap < 2500, "attempts %.0f ms apart, want about 1000", gap)


def t_429_then_success():
    """429 with Retry-After: 1, then 200: the client gets the 200 after ~1 s."""
    s = scripted([(429, [("Retry-After", "1")], err_body(429, "rate_limit")),
                  (200, [], OK_BODY)])
    d = dsgate(s.url, "429", attempts=3, base="50ms", cap="1500ms")
    t = time.monotonic()
    r = H.request(d.port, "POST", CHAT, body=chat_body("x"), timeout=15.0)
    dt = time.monotonic() - t
    check(r.status == 200, "status %s %r", r.status, r.body[:200])
    check(r.body == OK_BODY, "body %r", r.body[:200])
    check(r.header("x-dsgate-attempts") == "2", "X-Dsgate-Attempts %r",
          r.header("x-dsgate-attempts"))
    check(len(s.arrivals) == 2, "%d attempts", len(s.arrivals))
    gap = s.arrivals[1] - s.arrivals[0]
    note("429_then_success: gap %.3fs, total %.3fs", gap, dt)
    check(gap >= 0.99, "gap %.3fs < Retry-After 1 s", gap)
    sm = scrape(d.port)
    check(metric(sm, "dsgate_retries_total", reason="429") == 1, "retries{reason=429} %r",
          metric(sm, "dsgate_retries_total", reason="429"))
    check(metric(sm, "dsgate_upstream_attempts_total", outcome="ok") == 1,
          "attempts{outcome=ok} %r", metric(sm, "dsgate_upstream_attempts_total", outcome="ok"))


def t_retry_after_http_date_and_cap():
    """Retry-After as an HTTP date is honoured; a huge one is capped by
    retry.cap (1.5 s here), not obeyed."""
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    s = scripted([(503, [("Retry-After", when)], err_body(503, "busy")),
                  (503, [("Retry-After", "3600")], err_body(503, "busy")),
                  (200, [], OK_BODY)])
    # keepalive off: X-Dsgate-Attempts is read from the head, which must be the upstream's
    d = dsgate(s.url, "ra-date", attempts=3, base="10ms", cap="1500ms",
               extra="keepalive: {after: 0s}")
    r = H.request(d.port, "POST", CHAT, body=chat_body("x"), timeout=15.0)
    check(r.status == 200, "status %s %r", r.status, r.body[:200])
    check(r.header("x-dsgate-attempts") == "3", "X-Dsgate-Attempts %r",
          r.header("x-dsgate-attempts"))
    g1 = s.arrivals[1] - s.arrivals[0]
    g2 = s.arrivals[2] - s.arrivals[1]
    note("retry_after date: gap %.3fs (date ~2 s ahead, cap 1.5 s); 3600 s: gap %.3fs", g1, g2)
    check(g1 >= 0.9, "HTTP-date Retry-After ignored: gap %.3fs", g1)
    check(1.45 <= g2 <= 3.0, "Retry-After 3600 with cap 1.5 s: gap %.3fs", g2)


def t_budget_outage():
    """Total outage (every answer 503), budget 0.1, 5 attempts, 150 requests
    at concurrency 30: upstream calls <= 150 + max(0.1 * 150, 100).  Each
    client gets the upstream's 503 unchanged, or, once the circuit breaker
    has opened on the 503s, a 504 after waiting queue.max_wait (design.md,
    Outages)."""
    f = fake("--status", "503", name="outage")
    d = dsgate(f.url, "budget", max_inflight=64, attempts=5, base="10ms", cap="100ms",
               budget=0.1, max_wait="1s")
    t = time.monotonic()
    res = load(d.port, 150, 30)
    dt = time.monotonic() - t
    st = f.stats()
    note("budget 0.1, 503 outage: %d upstream calls for 150 requests (amplification %.2f) "
         "in %.1fs; statuses %r", st["requests"], st["requests"] / 150.0, dt, statuses(res))
    check(set(statuses(res)) <= {503, 504}, "statuses %r", statuses(res))
    direct = H.request(f.port, "POST", CHAT, body=chat_body("x"))
    for r in res:
        if r.status == 503:
            check(r.body == direct.body, "503 body changed: %r", r.body[:200])
            check(r.header("x-fake-name") == "outage", "not the upstream's 503")
        else:
            check(H.openai_error_shape(r) is None, "504 body: %s", H.openai_error_shape(r))
    check(st["requests"] <= 150 + max(0.1 * 150, 100),
          "%d upstream calls > 150 + floor 100", st["requests"])
    att = [attempts_of(r) for r in res]
    check(sum(att) == st["requests"], "sum of X-Dsgate-Attempts %d != fake requests %d",
          sum(att), st["requests"])


def t_budget_caps_retries():
    """The budget's arithmetic through the daemon: every answer is a
    retryable error that the circuit breaker does not count (408, listed in
    retry.on), budget 0.1, 5 attempts, 150 requests at concurrency 30:
    exactly 150 first attempts + the floor of 100 retries reach the
    upstream, and every client gets the 408 unchanged."""
    f = fake("--status", "408", name="r408")
    port = H.free_port()
    text = config(port, f.url, max_inflight=64, attempts=5, base="10ms", cap="100ms",
                  budget=0.1, max_wait="20s").replace(
        "retry:\n", "retry:\n  on: [408, connect]\n")
    d = H.Dsgate(config_text=text, tag="busy-budget408", port=port)
    STARTED.append(d)
    t = time.monotonic()
    res = load(d.port, 150, 30)
    dt = time.monotonic() - t
    st = f.stats()
    note("budget 0.1, all 408: %d upstream calls for 150 requests (amplification %.2f) in %.1fs",
         st["requests"], st["requests"] / 150.0, dt)
    check(statuses(res) == {408: 150}, "statuses %r", statuses(res))
    direct = H.request(f.port, "POST", CHAT, body=chat_body("x"))
    for r in res:
        check(r.body == direct.body, "408 body changed: %r", r.body[:200])
    check(dt < 9.0, "took %.1fs: the 10 s window would roll over", dt)
    check(st["requests"] == 150 + 100, "%d upstream calls, want 150 + floor 100",
          st["requests"])
    att = [attempts_of(r) for r in res]
    check(sum(att) == st["requests"], "sum of X-Dsgate-Attempts %d != fake requests %d",
          sum(att), st["requests"])
    s = scrape(d.port)
    ex = metric(s, "dsgate_retry_budget_exhausted_total")
    check(ex is not None and ex > 0, "dsgate_retry_budget_exhausted_total %r", ex)
    check(metric(s, "dsgate_retries_total") == 100, "dsgate_retries_total %r",
          metric(s, "dsgate_retries_total"))


def t_budget_generous_and_zero():
    """A generous budget retries every request to max_attempts; budget 0
    never retries (408 in retry.on, as above)."""
    f = fake("--status", "408", name="r408b")
    for budget, want in ((10, 3), (0, 1)):
        f.reset()
        port = H.free_port()
        text = config(port, f.url, max_inflight=64, attempts=3, base="10ms", cap="50ms",
                      budget=budget).replace("retry:\n", "retry:\n  on: [408, connect]\n")
        d = H.Dsgate(config_text=text, tag="busy-budget-%s" % budget, port=port)
        STARTED.append(d)
        res = load(d.port, 20, 10)
        check(statuses(res) == {408: 20}, "budget %s: statuses %r", budget, statuses(res))
        att = [attempts_of(r) for r in res]
        check(all(a == want for a in att), "budget %s: attempts %r, want %d each", budget, att,
              want)
        check(f.stats()["requests"] == 20 * want, "budget %s: fake saw %d, want %d", budget,
              f.stats()["requests"], 20 * want)


def t_no_retry_after_data():
    """A stream that resets after 2 events is attempted exactly once."""
    f = fake(name="reset")
    d = dsgate(f.url, "reset", attempts=5, base="10ms")
    st = H.sse_request(d.port, chat_body("reset me", stream=True),
                       headers={"X-Fake-Reset-After": "2", "X-Test-Id": "reset"}, timeout=10.0)
    check(st.resp is not None and st.resp.status == 200, "status %r (%s)",
          st.resp and st.resp.status, st.error)
    good = st.data_events()
    check(len(good) == 2, "%d data events, want 2", len(good))
    errs = [e for e in st.events if H.is_error_event(e)]
    check(errs or st.error or not st.resp.complete, "the broken stream ended as if complete")
    time.sleep(0.3)             # time enough for a (wrong) retry to show up
    n = len(log_for(f, "reset"))
    check(n == 1, "%d attempts for a stream that had sent data", n)
    s = scrape(d.port)
    check(not metric(s, "dsgate_retries_total"), "dsgate_retries_total %r",
          metric(s, "dsgate_retries_total"))


SSE = [("Content-Type", "text/event-stream")]
CHUNK = json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
                    "model": "deepseek-chat",
                    "choices": [{"index": 0, "delta": {"content": "fresh"},
                                 "finish_reason": None}]})


def t_keepalive_is_not_data():
    """Keep-alives are not data: an attempt that sent only SSE comments (or
    blank lines) before stalling past timeouts.first_data is retried, and
    the client gets the next attempt's answer whole."""
    for kind, first, second in (
            ("stream", (200, SSE, b": keep-alive\n\n: keep-alive\n\n", 5.0),
             (200, SSE, ("data: %s\n\ndata: [DONE]\n\n" % CHUNK).encode())),
            ("json", (200, [], b"\n\n\n", 5.0), (200, [], OK_BODY))):
        s = scripted([first, second])
        d = dsgate(s.url, "keepalive-" + kind, attempts=2, base="10ms", cap="50ms",
                   first_data="500ms")
        t = time.monotonic()
        if kind == "stream":
            st = H.sse_request(d.port, chat_body("ka", stream=True), timeout=10.0)
            check(st.error is None and st.resp and st.resp.status == 200, "stream: %r %s",
                  st.resp and st.resp.status, st.error)
            datas = [e["data"] for e in st.data_events()]
            check(datas == [CHUNK, "[DONE]"], "stream: events %r", datas)
            check(not any(H.is_error_event(e) for e in st.events), "stream: an error event")
        else:
            r = H.request(d.port, "POST", CHAT, body=chat_body("ka"), timeout=10.0)
            check(r.status == 200, "json: status %s", r.status)
            check(r.body.strip() == OK_BODY, "json: body %r", r.body[:200])
        dt = time.monotonic() - t
        check(len(s.arrivals) == 2, "%s: %d attempts, want 2", kind, len(s.arrivals))
        check(dt < 3.0, "%s: took %.2fs", kind, dt)


def t_connect_error_retried():
    """Upstream port closed, max_attempts 3: 502, X-Dsgate-Attempts: 3."""
    dead = "http://127.0.0.1:%d" % H.free_port()
    d = dsgate(dead, "connect", attempts=3, base="10ms", cap="50ms", connect="1s")
    t = time.monotonic()
    r = H.request(d.port, "POST", CHAT, body=chat_body("x"), timeout=10.0)
    dt = time.monotonic() - t
    check(r.status == 502, "status %s %r", r.status, r.body[:200])
    check(H.openai_error_shape(r) is None, "502 body: %s", H.openai_error_shape(r))
    check(r.header("x-dsgate-attempts") == "3", "X-Dsgate-Attempts %r",
          r.header("x-dsgate-attempts"))
    check(dt < 3.0, "took %.2fs", dt)
    s = scrape(d.port)
    check(metric(s, "dsgate_upstream_attempts_total", outcome="connect_error") == 3,
          "attempts{connect_error} %r",
          metric(s, "dsgate_upstream_attempts_total", outcome="connect_error"))
    check(metric(s, "dsgate_retries_total", reason="connect") == 2, "retries{connect} %r",
          metric(s, "dsgate_retries_total", reason="connect"))


def t_timeout_retried():
    """No data within timeouts.first_data: retried, then 504 with the
    attempts counted."""
    f = fake(name="slow")
    d = dsgate(f.url, "timeout", attempts=2, base="10ms", cap="50ms", first_data="300ms")
    t = time.monotonic()
    r = H.request(d.port, "POST", CHAT, headers={"X-Fake-Delay-Ms": "3000", "X-Test-Id": "slow"},
                  body=chat_body("slow"), timeout=10.0)
    dt = time.monotonic() - t
    check(r.status == 504, "status %s %r", r.status, r.body[:200])
    check(H.openai_error_shape(r) is None, "504 body: %s", H.openai_error_shape(r))
    check(r.header("x-dsgate-attempts") == "2", "X-Dsgate-Attempts %r",
          r.header("x-dsgate-attempts"))
    check(0.55 <= dt < 2.0, "504 after %.2fs, want about 2 x 300 ms", dt)
    check(len(log_for(f, "slow")) == 2, "%d attempts reached the fake", len(log_for(f, "slow")))
    s = scrape(d.port)
    check(metric(s, "dsgate_retries_total", reason="timeout") == 1, "retries{timeout} %r",
          metric(s, "dsgate_retries_total", reason="timeout"))
    check(metric(s, "dsgate_upstream_attempts_total", outcome="timeout") == 2,
          "attempts{timeout} %r", metric(s, "dsgate_upstream_attempts_total", outcome="timeout"))


def _limit_under_load(adaptive):
    f = fake("--capacity", "3", "--latency-ms", "100", name="adapt")
    d = dsgate(f.url, "adaptive-%s" % adaptive, max_inflight=20, adaptive=adaptive,
               attempts=3, base="20ms", cap="200ms")
    seen = []
    done = threading.Event()

    def scraper():
        while not done.is_set():
            try:
                v = metric(scrape(d.port), "dsgate_concurrency_limit", upstream="fake")
                if v is not None:
                    seen.append(v)
            except Exception:                   # noqa: BLE001
                pass
            time.sleep(0.02)
    th = threading.Thread(target=scraper, daemon=True)
    th.start()
    try:
        res = load(d.port, 120, 40, timeout=30.0)
    finally:
        done.set()
        th.join(5)
    seen.append(metric(scrape(d.port), "dsgate_concurrency_limit", upstream="fake"))
    st = f.stats()
    return seen, res, st


def t_adaptive_limit():
    """capacity 3 behind max_inflight 20: with adaptive the limit falls
    below 20 under load; without it stays 20."""
    seen, res, st = _limit_under_load(True)
    note("adaptive on: limit min %s max %s over %d scrapes, fake requests %d, statuses %r",
         min(seen) if seen else None, max(seen) if seen else None, len(seen), st["requests"],
         statuses(res))
    check(len(seen) >= 3, "only %d scrapes", len(seen))
    check(min(seen) < 20, "the limit never fell below 20: %r", sorted(set(seen)))
    check(min(seen) >= 1, "limit below 1: %r", min(seen))
    seen, res, st = _limit_under_load(False)
    note("adaptive off: limit values %r, fake requests %d, statuses %r", sorted(set(seen)),
         st["requests"], statuses(res))
    check(seen and all(v == 20 for v in seen), "limit moved without adaptive: %r",
          sorted(set(seen)))


TESTS = [
    ("every_request_completes_capacity_4", t_every_request_completes),
    ("priority_high_before_low_backlog", t_priority_high_first),
    ("aging_low_before_newer_medium", t_aging),
    ("queue_full_429_and_displacement", t_queue_full),
    ("queue_max_wait_504", t_max_wait),
    ("priority_from_header_token_default", t_priority_sources),
    ("client_leaving_queue_not_sent", t_client_leaves_queue),
    ("client_leaving_backoff_not_retried", t_client_leaves_backoff),
    ("retry_after_503_respected", t_retry_after_respected),
    ("retry_429_then_success", t_429_then_success),
    ("retry_after_http_date_and_cap", t_retry_after_http_date_and_cap),
    ("budget_caps_outage_amplification", t_budget_outage),
    ("budget_caps_retries_exactly", t_budget_caps_retries),
    ("budget_generous_retries_zero_none", t_budget_generous_and_zero),
    ("no_retry_after_stream_data", t_no_retry_after_data),
    ("keepalive_is_not_data_retry_transparent", t_keepalive_is_not_data),
    ("connect_error_retried_then_502", t_connect_error_retried),
    ("first_data_timeout_retried_then_504", t_timeout_retried),
    ("adaptive_limit_falls_under_overload", t_adaptive_limit),
]


def main():
    return H.main("test_busy", TESTS, started=STARTED)


if __name__ == "__main__":
    sys.exit(main())
