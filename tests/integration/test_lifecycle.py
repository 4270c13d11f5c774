#!/usr/bin/env python3
"""
test_lifecycle: a client that leaves at every point of its request's life.

src/request.c walks a request through: a lookup in Redis, following an
identical request in flight (coalescing), waiting in the queue, a backoff
between attempts, an attempt before the upstream's head, after the head but
before data (keep-alives), and streaming.  Here the client closes its socket
at each of those points, in each role that exists there: a plain request
(Cache-Control: no-store), a leader with followers, and a follower.  After
each test: dsgate is alive, its log has no sanitizer report, every client
still waiting got a complete answer (200 with the whole body, or a stream
ending in [DONE]) or a clean error, nothing is left queued or in flight
(/metrics dsgate_queue_depth and dsgate_inflight 0, the fake's inflight 0),
every request wrote its access line (field "end"), and an upstream transfer
nobody waits for any more is cancelled (the fake's /_log shows
client_closed).

Two regression tests first, for the headless leader (a leader whose client
left and which goes on for its followers) reaching build_forward_headers()
without a client:
  A. it was still queued when its client left, and then got the slot;
  B. its attempt failed (503) after its client left and the retry moved to
     the second upstream.

Pairs (each test resets its fakes and uses its own X-Test-Id and prompt):
  "one":   one fake, max_inflight 1, cache on (memory), retry 3 attempts with
           a fixed 400 ms backoff (jitter none);
  "two":   two fakes under routing failover, the first answering every
           completion with 503 (--status 503), retry 3 attempts;
  "redis": one fake, cache with a private redis-server as its only tier
           (memory off), redis timeout 2s; Redis is paused (SIGSTOP) to hold
           requests in their lookup.
Usage: test_lifecycle.py [test names...]
"""

import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import CHAT, check, note, scrape                   # noqa: E402

try:
    import redis_helper as R                                    # noqa: E402
except Exception:                                               # noqa: BLE001
    R = None

WARM = "/chat/completions"      # requests that are not the test's own (not counted)
P = {}
BACKOFF_S = 0.4
SANITIZER = H.SANITIZER_MARKS


def tid():
    return H.test_id(n=10)


chat = H.chat_body


# ---------------------------------------------------------------- processes

def config(port, ups, routing="failover", attempts=3, base="400ms", cap="400ms",
           redis_url="", redis_timeout="50ms", max_entries=1024, prefix=None, fleet_redis=""):
    """UPS: [(name, url, max_inflight)]."""
    lines = [
        "# written by tests/integration/test_lifecycle.py",
        "listen: 127.0.0.1:%d" % port,
        "upstreams:",
    ]
    for name, url, mi in ups:
        lines += H.upstream_yaml(name, url, mi)
    lines += [
        "routing: %s" % routing,
        "queue:",
        "  max_queued: 100",
        "  max_wait: 30s",
        "  default_priority: medium",
        "  aging: 0",
        "retry:",
        "  max_attempts: %d" % attempts,
        "  base: %s" % base,
        "  cap: %s" % cap,
        "  jitter: none",
        "cache:",
        "  enabled: true",
        "  ttl: 1h",
        "  memory: {max_entries: %d, max_bytes: 64MB}" % max_entries,
        "  redis: {url: %s, prefix: %s, timeout: %s}" % (
            H.yaml_quote(redis_url), H.yaml_quote(prefix or "lc-%s:" % tid()), redis_timeout),
    ]
    if fleet_redis:
        lines.append("fleet: {redis: %s, lease_ttl: 5s, fallback_instances: 1}"
                     % H.yaml_quote(fleet_redis))
    lines += [
        "shutdown_timeout: 3s",
        "log: {level: info, format: json}",
    ]
    return "\n".join(lines) + "\n"


class Gate(H.Dsgate):
    """A dsgate whose config is built for its port, so that restart() (after
    a crash, from run_tests) gets a fresh port and a matching config."""

    def __init__(self, build, tag):
        self.build = build
        self.ltag = tag
        port = H.free_port()
        super().__init__(config_text=build(port), tag=tag, port=port)

    def restart(self):
        self.stop(5.0)
        return Gate(self.build, self.ltag)


# ---------------------------------------------------------------- metrics

def metric(samples, name, **labels):
    """Sum of NAME's samples whose labels include LABELS (0 if none)."""
    return sum(v for n, ls, v in samples
               if n == name and all(ls.get(k) == str(x) for k, x in labels.items()))


# ---------------------------------------------------------------- clients

class Client(H.Pending):
    """One request on its own connection, sent at once.  read=True: a thread
    reads the whole answer; otherwise the test reads (or leaves) itself."""

    def __init__(self, ctx, body, headers, stream=False, read=True, timeout=15.0,
                 path=CHAT, gate=None):
        self.stream = stream
        self.head = None
        self.events = []
        self.ctx = ctx
        super().__init__((gate or ctx.d).port, body, headers, path=path, timeout=timeout,
                         read=read, accept="text/event-stream" if stream else None)

    def _opened(self):
        self.ctx.clients.append(self)

    def read_head(self, timeout=5.0):
        self.head = self.conn.read_head(timeout)
        return self.head

    def read_events(self, n, timeout=5.0):
        """After read_head: read until N data events arrived (SSE)."""
        it = self.conn.iter_body(self.head, timeout)
        pending = b""
        for d in it:
            pending += d.replace(b"\r\n", b"\n")
            while b"\n\n" in pending:
                block, pending = pending.split(b"\n\n", 1)
                self.events += [e for e in H.parse_sse(block + b"\n\n") if e["data"] is not None]
            if len(self.events) >= n:
                return self.events
        raise AssertionError("stream ended after %d of %d events" % (len(self.events), n))

    def close(self):
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()

    leave = close


def expect_ok(c, prompt, what, stream=None):
    """C got a complete 200 whose content is the echo of PROMPT."""
    r = c.wait()
    stream = c.stream if stream is None else stream
    check(r.status == 200, "%s: status %s %r", what, r.status, r.body[:200])
    check(r.complete, "%s: incomplete body", what)
    want = "echo: " + prompt
    if stream:
        evs = [e for e in H.parse_sse(r.body) if e["data"] is not None]
        check(evs and evs[-1]["data"] == "[DONE]", "%s: no [DONE] at the end: %r", what,
              r.body[-200:])
        check(not [e for e in evs if H.is_error_event(e)], "%s: error event: %r", what,
              r.body[-300:])
        got = ""
        for e in evs[:-1]:
            for ch in json.loads(e["data"]).get("choices") or []:
                v = (ch.get("delta") or {}).get("content")
                if isinstance(v, str):
                    got += v
        check(got == want, "%s: content %r, want %r", what, got[:100], want[:100])
    else:
        try:
            got = r.json()["choices"][0]["message"]["content"]
        except Exception as e:                  # noqa: BLE001
            raise AssertionError("%s: body is not a chat completion (%s): %r"
                                 % (what, e, r.body[:200]))
        check(got == want, "%s: content %r, want %r", what, got[:100], want[:100])
    return r


def expect_clean_error(c, what):
    """C got a complete error answer in the OpenAI shape (status >= 400)."""
    r = c.wait()
    check(r.status >= 400 and r.complete, "%s: status %s complete %s", what, r.status,
          r.complete)
    why = H.openai_error_shape(r)
    check(why is None, "%s: %s", what, why)
    return r


# ---------------------------------------------------------------- a test's context

class Ctx:
    """What one test uses: its dsgate, its (reset) fakes, a test id, the
    log offset where its access lines start, and its clients (closed at
    the end whatever happens)."""

    def __init__(self, key, fakes, warm=True):
        self.d = P[key]
        self.fakes = [P[k] for k in fakes]
        self.clients = []
        self.t = tid()
        check(H.wait_until(self.idle, 5.0, 0.02),
              "dsgate not idle before the test: %s", self.state())
        if warm:
            # one success closes the circuit of an upstream earlier 503s counted against
            r = H.request(self.d.port, "POST", WARM, headers={"Cache-Control": "no-store",
                                                              "Content-Type": "application/json"},
                          body=chat("warm " + self.t), timeout=10.0)
            check(r.status == 200, "warm-up request: %s", r.status)
        for f in self.fakes:
            f.reset()
        self.log_off = len(self.d.log_text().encode("utf-8", "replace"))
        self.m0 = scrape(self.d.port)
        self.sent = 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        for c in self.clients:
            c.close()
        return False

    def client(self, body, headers, **kw):
        if kw.get("gate") is None:
            self.sent += 1          # the access lines done() counts are this dsgate's
        return Client(self, body, headers, **kw)

    # -- dsgate and fake state
    def state(self):
        s = scrape(self.d.port)
        return {"queue_depth": metric(s, "dsgate_queue_depth"),
                "dsgate_inflight": metric(s, "dsgate_inflight"),
                "fake_inflight": [f.stats()["inflight"] for f in self.fakes]}

    def idle(self):
        st = self.state()
        return st["queue_depth"] == 0 and st["dsgate_inflight"] == 0 and \
            not any(st["fake_inflight"])

    def delta(self, name, **labels):
        return metric(scrape(self.d.port), name, **labels) - metric(self.m0, name, **labels)

    def wait_queued(self, n, timeout=3.0):
        ok = H.wait_until(lambda: metric(scrape(self.d.port), "dsgate_queue_depth") == n,
                          timeout, 0.01)
        check(ok, "queue depth did not reach %d: %s", n, self.state())

    def wait_coalesced(self, n, timeout=3.0):
        ok = H.wait_until(lambda: self.delta("dsgate_coalesced_total") >= n, timeout, 0.01)
        check(ok, "%d followers did not join (coalesced +%d)", n,
              self.delta("dsgate_coalesced_total"))

    def wait_retry(self, n=1, timeout=3.0):
        ok = H.wait_until(lambda: self.delta("dsgate_retries_total") >= n, timeout, 0.01)
        check(ok, "no retry scheduled (retries +%d)", self.delta("dsgate_retries_total"))

    # -- the fake's log
    def calls(self, test_id, f=None):
        f = f or self.fakes[0]
        return [e for e in f.log() if (e.get("headers") or {}).get("x-test-id") == test_id]

    def wait_upstream(self, test_id, n=1, f=None, timeout=3.0):
        ok = H.wait_until(lambda: len(self.calls(test_id, f)) >= n, timeout, 0.01)
        check(ok, "%s did not reach the upstream (%d calls)", test_id,
              len(self.calls(test_id, f)))

    def wait_cancelled(self, test_id, f=None, timeout=1.0):
        """The upstream transfer of TEST_ID is cancelled (the fake saw its client go)."""
        t0 = time.monotonic()

        def closed():
            es = self.calls(test_id, f)
            return es and es[-1].get("client_closed")
        ok = H.wait_until(closed, timeout, 0.01)
        check(ok, "upstream transfer of %s not cancelled within %.1fs: %r", test_id, timeout,
              self.calls(test_id, f)[-1:])
        return time.monotonic() - t0

    def not_cancelled(self, test_id, f=None):
        es = self.calls(test_id, f)
        check(es and not any(e.get("client_closed") for e in es),
              "upstream transfer of %s was cut though followers wait: %r", test_id, es)

    # -- dsgate's log
    def new_log(self):
        with open(self.d.log_path, "rb") as fh:
            fh.seek(self.log_off)
            return fh.read().decode("utf-8", "replace")

    def access(self):
        out = []
        for line in self.new_log().splitlines():
            if '"type":"access"' not in line:
                continue
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if j.get("path") == CHAT:
                out.append(j)
        return out

    def ends(self):
        return [a.get("end") for a in self.access()]

    def wait_end(self, label, n=1, timeout=2.0):
        """N access lines (at least) whose end is LABEL (or starts with it, for a
        label ending in '*')."""
        def m(e):
            return e and (e.startswith(label[:-1]) if label.endswith("*") else e == label)
        ok = H.wait_until(lambda: len([e for e in self.ends() if m(e)]) >= n, timeout, 0.01)
        check(ok, "no access line with end %s (ends: %s)", label, self.ends())

    def done(self, timeout=3.0):
        """The common after-checks: no sanitizer report, every request wrote
        its access line, nothing queued or in flight."""
        check(self.d.alive(), "dsgate died: %s", self.d.crash_summary())
        ok = H.wait_until(lambda: len(self.access()) >= self.sent, timeout, 0.02)
        check(ok, "%d of %d requests wrote an access line (ends: %s)", len(self.access()),
              self.sent, self.ends())
        check(len(self.access()) == self.sent, "%d access lines for %d requests: %s",
              len(self.access()), self.sent, self.ends())
        check(H.wait_until(self.idle, timeout, 0.02), "not settled after the test: %s",
              self.state())
        log = self.new_log()
        for pat in SANITIZER:
            for line in log.splitlines():
                if pat in line:
                    raise AssertionError("sanitizer report: %s" % line.strip()[:300])


def holder(c, ms):
    """A no-store request that takes the only slot for MS ms."""
    h = c.client(chat("hold %s" % c.t), {"X-Test-Id": c.t + "-hold", "X-Fake-Delay-Ms": str(ms),
                                          "Cache-Control": "no-store"})
    c.wait_upstream(c.t + "-hold")
    return h


NOSTORE = {"Cache-Control": "no-store"}


def hdrs(c, role, extra=None, nostore=False):
    h = {"X-Test-Id": c.t + "-" + role}
    h.update(extra or {})
    if nostore:
        h.update(NOSTORE)
    return h


# ================================================================ regressions

def t_crash_a_headless_leader_queued():
    """Crash path A: 1 holds the only slot; 2 (body B) waits queued; 3 (body
    B) follows 2; 2 leaves.  When the slot frees the leader, now without a
    client, goes upstream: 3 gets a complete 200, 1 its 200."""
    with Ctx("one", ["f1"]) as c:
        h = holder(c, 1000)
        prompt = "crash a " + c.t
        body = chat(prompt)
        two = c.client(body, hdrs(c, "L"), read=False)
        c.wait_queued(1)
        three = c.client(body, hdrs(c, "F"))
        c.wait_coalesced(1)
        two.leave()
        expect_ok(h, "hold " + c.t, "connection 1 (holder)")
        expect_ok(three, prompt, "connection 3 (follower)")
        c.wait_end("coalesced")
        check(len(c.calls(c.t + "-L")) == 1, "leader's upstream calls: %d",
              len(c.calls(c.t + "-L")))
        c.done()


def t_crash_b_headless_leader_fails_over():
    """Crash path B: the leader's first attempt (upstream 1) gets a 503 after
    its client left and a follower joined; the retry fails over to upstream
    2: the follower gets 200."""
    with Ctx("two", ["f503", "f2"], warm=False) as c:
        prompt = "crash b " + c.t
        body = chat(prompt)
        lead = c.client(body, hdrs(c, "L", {"X-Fake-Delay-Ms": "800"}), read=False)
        c.wait_upstream(c.t + "-L", f=P["f503"])
        fol = c.client(body, hdrs(c, "F", {"X-Fake-Delay-Ms": "800"}))
        c.wait_coalesced(1)
        lead.leave()
        r = expect_ok(fol, prompt, "follower")
        check(r.header("x-dsgate-upstream") == "b2", "follower's X-Dsgate-Upstream %r",
              r.header("x-dsgate-upstream"))
        check(len(c.calls(c.t + "-L", P["f2"])) == 1, "upstream 2 saw %d calls",
              len(c.calls(c.t + "-L", P["f2"])))
        c.done()


def t_failover_plain_leaves():
    """Upstream 1 would answer 503 (then fail over) but the plain request's
    client leaves first: the transfer is cancelled, upstream 2 never sees it."""
    with Ctx("two", ["f503", "f2"], warm=False) as c:
        a = c.client(chat("failover plain " + c.t),
                     hdrs(c, "A", {"X-Fake-Delay-Ms": "2000"}, nostore=True), read=False)
        c.wait_upstream(c.t + "-A", f=P["f503"])
        a.leave()
        c.wait_cancelled(c.t + "-A", f=P["f503"])
        c.wait_end("client_closed_waiting")
        c.done()
        check(not c.calls(c.t + "-A", P["f2"]), "upstream 2 saw the request")


# ================================================================ (a) Redis lookup

def t_lookup_plain_leaves():
    """The client leaves while its cache lookup waits on a paused Redis:
    it never goes upstream; dsgate survives Redis answering later."""
    if "redis" not in P:
        note("lookup_plain_leaves: no redis-server, nothing to run")
        return
    rs = P["redis_server"]
    with Ctx("redis", ["fr"]) as c:
        prompt = "lookup leaves " + c.t
        body = chat(prompt)
        rs.pause()
        try:
            a = c.client(body, hdrs(c, "A"), read=False)
            time.sleep(0.15)            # it is in its lookup (Redis answers nothing)
            check(not c.calls(c.t + "-A"), "went upstream during the lookup")
            a.leave()
            c.wait_end("client_closed_waiting")
        finally:
            rs.resume()
        # Redis answers the cancelled lookup now; the same body works afterwards
        b = c.client(body, hdrs(c, "B"))
        expect_ok(b, prompt, "after the lookup")
        check(not c.calls(c.t + "-A"), "the request that left went upstream")
        c.done()


def t_lookup_identical_one_leaves():
    """Two identical requests wait on their lookups (Redis paused); one
    leaves: the other is answered once Redis is back."""
    if "redis" not in P:
        note("lookup_identical_one_leaves: no redis-server, nothing to run")
        return
    rs = P["redis_server"]
    with Ctx("redis", ["fr"]) as c:
        prompt = "lookup twins " + c.t
        body = chat(prompt)
        rs.pause()
        try:
            a = c.client(body, hdrs(c, "A"), read=False)
            b = c.client(body, hdrs(c, "B"))
            time.sleep(0.15)
            check(not c.calls(c.t + "-A") and not c.calls(c.t + "-B"),
                  "went upstream during the lookup")
            a.leave()
            c.wait_end("client_closed_waiting")
        finally:
            rs.resume()
        expect_ok(b, prompt, "the one that stayed")
        check(not c.calls(c.t + "-A"), "the request that left went upstream")
        c.done()


# ================================================================ (b) following

def t_following_last_follower_leaves():
    """The leader's client leaves (the leader goes on headless for its
    follower), then the follower leaves too: nobody waits, so the upstream
    transfer is cancelled."""
    with Ctx("one", ["f1"]) as c:
        body = chat("following last " + c.t)
        lead = c.client(body, hdrs(c, "L", {"X-Fake-Delay-Ms": "3000"}), read=False)
        c.wait_upstream(c.t + "-L")
        fol = c.client(body, hdrs(c, "F", {"X-Fake-Delay-Ms": "3000"}), read=False)
        c.wait_coalesced(1)
        lead.leave()
        time.sleep(0.05)                # the leader's leave is seen first
        check(not c.calls(c.t + "-L")[0].get("client_closed"),
              "transfer cut while the follower still waits")
        fol.leave()
        dt = c.wait_cancelled(c.t + "-L")
        note("following_last_follower_leaves: upstream cancelled %.0f ms after the last client",
             dt * 1000)
        c.wait_end("client_closed_waiting")
        c.done()


# ================================================================ (c) queued

def t_queued_plain_leaves():
    """A plain request leaves while queued: it leaves the queue at once and
    never goes upstream; the holder is answered."""
    with Ctx("one", ["f1"]) as c:
        h = holder(c, 800)
        a = c.client(chat("queued plain " + c.t), hdrs(c, "A", nostore=True), read=False)
        c.wait_queued(1)
        a.leave()
        c.wait_queued(0, 1.0)
        c.wait_end("client_closed_queued")
        expect_ok(h, "hold " + c.t, "holder")
        c.done()
        check(not c.calls(c.t + "-A"), "the request that left went upstream")


def t_queued_leader_leaves():
    """The queued leader of two followers leaves: once the slot frees the
    leader goes upstream for them and both get the answer (crash path A
    with two followers)."""
    with Ctx("one", ["f1"]) as c:
        h = holder(c, 600)
        prompt = "queued leader " + c.t
        body = chat(prompt)
        lead = c.client(body, hdrs(c, "L"), read=False)
        c.wait_queued(1)
        f1 = c.client(body, hdrs(c, "F1"))
        f2 = c.client(body, hdrs(c, "F2"))
        c.wait_coalesced(2)
        lead.leave()
        expect_ok(h, "hold " + c.t, "holder")
        r1 = expect_ok(f1, prompt, "follower 1")
        r2 = expect_ok(f2, prompt, "follower 2")
        check(r1.body == r2.body, "followers got different answers")
        c.wait_end("coalesced", 2)
        c.done()


def t_queued_follower_leaves():
    """A follower of a queued leader leaves: the leader and the other
    follower are answered, with one upstream call."""
    with Ctx("one", ["f1"]) as c:
        h = holder(c, 600)
        prompt = "queued follower " + c.t
        body = chat(prompt)
        lead = c.client(body, hdrs(c, "L"))
        c.wait_queued(1)
        f1 = c.client(body, hdrs(c, "F1"), read=False)
        f2 = c.client(body, hdrs(c, "F2"))
        c.wait_coalesced(2)
        f1.leave()
        c.wait_end("client_closed_waiting")
        expect_ok(h, "hold " + c.t, "holder")
        rl = expect_ok(lead, prompt, "leader")
        r2 = expect_ok(f2, prompt, "follower 2")
        check(rl.body == r2.body, "leader and follower got different answers")
        check(len(c.calls(c.t + "-L")) == 1, "%d upstream calls", len(c.calls(c.t + "-L")))
        c.done()


def t_queued_everyone_leaves():
    """A queued leader leaves, then its only follower: the leader leaves the
    queue without going upstream."""
    with Ctx("one", ["f1"]) as c:
        h = holder(c, 800)
        body = chat("queued everyone " + c.t)
        lead = c.client(body, hdrs(c, "L"), read=False)
        c.wait_queued(1)
        fol = c.client(body, hdrs(c, "F"), read=False)
        c.wait_coalesced(1)
        lead.leave()
        time.sleep(0.05)
        fol.leave()
        c.wait_queued(0, 1.0)
        c.wait_end("client_closed_*", 2)
        expect_ok(h, "hold " + c.t, "holder")
        c.done()
        check(not c.calls(c.t + "-L"), "the abandoned leader went upstream")


# ================================================================ (d) backoff

def t_backoff_plain_leaves():
    """A plain request whose first attempt got 503 leaves during the backoff:
    no further attempt is made."""
    with Ctx("one", ["f1"]) as c:
        a = c.client(chat("backoff plain " + c.t),
                     hdrs(c, "A", {"X-Fake-Status": "503"}, nostore=True), read=False)
        c.wait_retry(1)
        a.leave()
        c.wait_end("client_closed_backoff")
        # the backoff (400 ms) passes: still one attempt
        more = H.wait_until(lambda: len(c.calls(c.t + "-A")) > 1, BACKOFF_S + 0.3, 0.02)
        check(not more, "%d attempts after the client left in the backoff",
              len(c.calls(c.t + "-A")))
        c.done()


def t_backoff_leader_leaves():
    """The leader leaves during its backoff; followers joined there.  The
    headless leader's retries fail too (503), then the followers go on by
    themselves: both get a 200."""
    with Ctx("one", ["f1"]) as c:
        prompt = "backoff leader " + c.t
        body = chat(prompt)
        lead = c.client(body, hdrs(c, "L", {"X-Fake-Status": "503"}), read=False)
        c.wait_retry(1)
        f1 = c.client(body, hdrs(c, "F1"))
        f2 = c.client(body, hdrs(c, "F2"))
        c.wait_coalesced(2)
        lead.leave()
        r1 = expect_ok(f1, prompt, "follower 1")
        r2 = expect_ok(f2, prompt, "follower 2")
        n = len(c.calls(c.t + "-L"))
        note("backoff_leader_leaves: headless leader made %d attempts", n)
        check(n <= 3, "the leader made %d attempts (max_attempts 3)", n)
        own = len(c.calls(c.t + "-F1")) + len(c.calls(c.t + "-F2"))
        check(1 <= own <= 2, "followers made %d upstream calls", own)
        check(r1.status == r2.status == 200, "statuses")
        c.done()


def t_backoff_follower_leaves():
    """A follower of a leader in backoff leaves: the leader ends with its
    (clean) 503 after three attempts, the other follower gets a 200."""
    with Ctx("one", ["f1"]) as c:
        prompt = "backoff follower " + c.t
        body = chat(prompt)
        lead = c.client(body, hdrs(c, "L", {"X-Fake-Status": "503"}))
        c.wait_retry(1)
        f1 = c.client(body, hdrs(c, "F1"), read=False)
        f2 = c.client(body, hdrs(c, "F2"))
        c.wait_coalesced(2)
        f1.leave()
        c.wait_end("client_closed_waiting")
        r = expect_clean_error(lead, "leader")
        check(r.status == 503, "leader: %s", r.status)
        expect_ok(f2, prompt, "follower 2")
        check(len(c.calls(c.t + "-L")) == 3, "leader made %d attempts",
              len(c.calls(c.t + "-L")))
        c.done()


# ================================================================ (e) attempt, before the head

def t_before_head_plain_leaves():
    """A plain request leaves while its attempt waits for the head: the
    transfer is cancelled."""
    with Ctx("one", ["f1"]) as c:
        a = c.client(chat("before head plain " + c.t),
                     hdrs(c, "A", {"X-Fake-Delay-Ms": "3000"}, nostore=True), read=False)
        c.wait_upstream(c.t + "-A")
        a.leave()
        c.wait_cancelled(c.t + "-A")
        c.wait_end("client_closed_waiting")
        c.done()


def t_before_head_leader_leaves():
    """The leader leaves before the head: it goes on for its two followers,
    who get the answer; it is stored."""
    with Ctx("one", ["f1"]) as c:
        prompt = "before head leader " + c.t
        body = chat(prompt)
        lead = c.client(body, hdrs(c, "L", {"X-Fake-Delay-Ms": "700"}), read=False)
        c.wait_upstream(c.t + "-L")
        f1 = c.client(body, hdrs(c, "F1"))
        f2 = c.client(body, hdrs(c, "F2"))
        c.wait_coalesced(2)
        lead.leave()
        r1 = expect_ok(f1, prompt, "follower 1")
        r2 = expect_ok(f2, prompt, "follower 2")
        check(r1.body == r2.body, "followers got different answers")
        c.not_cancelled(c.t + "-L")
        check(len(c.calls(c.t + "-L")) == 1, "%d upstream calls", len(c.calls(c.t + "-L")))
        c.wait_end("coalesced", 2)
        hit = c.client(body, hdrs(c, "H"))
        rh = expect_ok(hit, prompt, "afterwards")
        check(rh.header("x-cache") == "HIT", "afterwards X-Cache %r", rh.header("x-cache"))
        c.done()


def t_before_head_follower_leaves():
    """A follower leaves while the leader waits for the head: the leader and
    the other follower get the answer, the transfer goes on."""
    with Ctx("one", ["f1"]) as c:
        prompt = "before head follower " + c.t
        body = chat(prompt)
        lead = c.client(body, hdrs(c, "L", {"X-Fake-Delay-Ms": "700"}))
        c.wait_upstream(c.t + "-L")
        f1 = c.client(body, hdrs(c, "F1"), read=False)
        f2 = c.client(body, hdrs(c, "F2"))
        c.wait_coalesced(2)
        f1.leave()
        c.wait_end("client_closed_waiting")
        rl = expect_ok(lead, prompt, "leader")
        r2 = expect_ok(f2, prompt, "follower 2")
        check(rl.body == r2.body, "different answers")
        c.not_cancelled(c.t + "-L")
        c.done()


# ================================================================ (f) after the head, before data

KA = {"X-Fake-Keepalive-Ms": "100"}


def _after_head_plain(stream):
    with Ctx("one", ["f1"]) as c:
        a = c.client(chat("after head plain %s %s" % (stream, c.t), stream=stream),
                     hdrs(c, "A", dict(KA, **{"X-Fake-Delay-Ms": "3000"}), nostore=True),
                     stream=stream, read=False)
        c.wait_upstream(c.t + "-A")
        if stream:
            r = a.read_head()           # an SSE head goes out at once
            check(r.status == 200, "head %s", r.status)
        else:
            time.sleep(0.25)            # the 200 head and two keep-alives have arrived
        a.leave()
        c.wait_cancelled(c.t + "-A")
        c.wait_end("client_closed_waiting")
        c.done()


def _after_head_leader(stream):
    with Ctx("one", ["f1"]) as c:
        prompt = "after head leader %s %s" % (stream, c.t)
        body = chat(prompt, stream=stream)
        h = dict(KA, **{"X-Fake-Delay-Ms": "900"})
        lead = c.client(body, hdrs(c, "L", h), stream=stream, read=False)
        c.wait_upstream(c.t + "-L")
        if stream:
            check(lead.read_head().status == 200, "leader's head")
        else:
            time.sleep(0.25)
        f1 = c.client(body, hdrs(c, "F1", h), stream=stream)
        f2 = c.client(body, hdrs(c, "F2", h), stream=stream)
        c.wait_coalesced(2)
        lead.leave()
        r1 = expect_ok(f1, prompt, "follower 1")
        r2 = expect_ok(f2, prompt, "follower 2")
        check(r1.body.strip() == r2.body.strip(), "followers got different answers")
        c.not_cancelled(c.t + "-L")
        check(len(c.calls(c.t + "-L")) == 1, "%d upstream calls", len(c.calls(c.t + "-L")))
        c.done()


def _after_head_follower(stream):
    with Ctx("one", ["f1"]) as c:
        prompt = "after head follower %s %s" % (stream, c.t)
        body = chat(prompt, stream=stream)
        h = dict(KA, **{"X-Fake-Delay-Ms": "900"})
        lead = c.client(body, hdrs(c, "L", h), stream=stream)
        c.wait_upstream(c.t + "-L")
        time.sleep(0.15)                # past the upstream's head
        f1 = c.client(body, hdrs(c, "F1", h), stream=stream, read=False)
        f2 = c.client(body, hdrs(c, "F2", h), stream=stream)
        c.wait_coalesced(2)
        if stream:
            check(f1.read_head().status == 200, "follower 1's head")
        f1.leave()
        c.wait_end("client_closed_waiting")
        expect_ok(lead, prompt, "leader")
        expect_ok(f2, prompt, "follower 2")
        c.not_cancelled(c.t + "-L")
        c.done()


def t_after_head_plain_leaves():
    """A plain non-stream request leaves after the 200 head and keep-alives,
    before data: the transfer is cancelled."""
    _after_head_plain(False)


def t_after_head_leader_leaves():
    """The leader leaves after the head (keep-alives), before data: its two
    followers get the whole answer, without the keep-alive white space."""
    _after_head_leader(False)


def t_after_head_follower_leaves():
    """A follower leaves while the leader has the head but no data: the
    others get the answer."""
    _after_head_follower(False)


def t_after_head_stream_plain_leaves():
    """A plain stream leaves after its SSE head (keep-alive comments only):
    the transfer is cancelled."""
    _after_head_plain(True)


def t_after_head_stream_leader_leaves():
    """A streaming leader leaves after its head, before any event: the
    followers (who have the head too) get the whole stream."""
    _after_head_leader(True)


def t_after_head_stream_follower_leaves():
    """A stream follower leaves after its head, before any event: leader and
    the other follower get the whole stream."""
    _after_head_follower(True)


# ================================================================ (g) streaming

EV = {"X-Fake-Events": "8", "X-Fake-Event-Delay-Ms": "100"}


def t_streaming_plain_leaves():
    """A plain stream leaves after two events: the transfer is cancelled."""
    with Ctx("one", ["f1"]) as c:
        a = c.client(chat("streaming plain " + c.t, stream=True),
                     hdrs(c, "A", EV, nostore=True), stream=True, read=False)
        check(a.read_head().status == 200, "head")
        a.read_events(2)
        a.leave()
        c.wait_cancelled(c.t + "-A")
        c.wait_end("client_closed_streaming")
        c.done()


def t_streaming_leader_leaves():
    """A streaming leader leaves after two events; two followers that joined
    mid-stream get the whole stream."""
    with Ctx("one", ["f1"]) as c:
        prompt = "streaming leader " + c.t
        body = chat(prompt, stream=True)
        lead = c.client(body, hdrs(c, "L", EV), stream=True, read=False)
        check(lead.read_head().status == 200, "head")
        lead.read_events(2)
        f1 = c.client(body, hdrs(c, "F1", EV), stream=True)
        f2 = c.client(body, hdrs(c, "F2", EV), stream=True)
        c.wait_coalesced(2)
        lead.leave()
        r1 = expect_ok(f1, prompt, "follower 1")
        r2 = expect_ok(f2, prompt, "follower 2")
        check(r1.body == r2.body, "followers got different streams")
        c.not_cancelled(c.t + "-L")
        check(len(c.calls(c.t + "-L")) == 1, "%d upstream calls", len(c.calls(c.t + "-L")))
        c.wait_end("coalesced", 2)
        c.done()


def t_streaming_follower_leaves():
    """A follower leaves mid-stream: leader and the other follower get the
    whole stream."""
    with Ctx("one", ["f1"]) as c:
        prompt = "streaming follower " + c.t
        body = chat(prompt, stream=True)
        lead = c.client(body, hdrs(c, "L", EV), stream=True)
        c.wait_upstream(c.t + "-L")
        f1 = c.client(body, hdrs(c, "F1", EV), stream=True, read=False)
        f2 = c.client(body, hdrs(c, "F2", EV), stream=True)
        c.wait_coalesced(2)
        check(f1.read_head().status == 200, "follower 1's head")
        f1.read_events(2)
        f1.leave()
        c.wait_end("client_closed_*")
        rl = expect_ok(lead, prompt, "leader")
        r2 = expect_ok(f2, prompt, "follower 2")
        check(rl.body == r2.body, "leader and follower got different streams")
        c.not_cancelled(c.t + "-L")
        c.done()


def t_streaming_everyone_leaves():
    """Leader and its only follower both leave mid-stream: the transfer is
    cancelled."""
    with Ctx("one", ["f1"]) as c:
        body = chat("streaming everyone " + c.t, stream=True)
        h = {"X-Fake-Events": "20", "X-Fake-Event-Delay-Ms": "100"}
        lead = c.client(body, hdrs(c, "L", h), stream=True, read=False)
        check(lead.read_head().status == 200, "head")
        lead.read_events(2)
        fol = c.client(body, hdrs(c, "F", h), stream=True, read=False)
        c.wait_coalesced(1)
        check(fol.read_head().status == 200, "follower's head")
        fol.read_events(2)
        lead.leave()
        time.sleep(0.05)
        check(not c.calls(c.t + "-L")[0].get("client_closed"),
              "transfer cut while the follower still reads")
        fol.leave()
        c.wait_cancelled(c.t + "-L")
        c.wait_end("client_closed_*", 1)
        c.done()


# ================================================================ fleet wait

def gate_a():
    """The fleet instance that leads (the tests watch the one that waits)."""
    if not P["fleet_a"].alive():
        P["fleet_a"] = P["fleet_a"].restart()
        wait_fleet_link(P["fleet_a"])
    return P["fleet_a"]


def wait_fleet_link(d):
    ok = H.wait_until(lambda: metric(scrape(d.port), "dsgate_fleet_fallback") == 0 and
                      any(n == "dsgate_fleet_fallback" for n, _, _ in scrape(d.port)), 10.0, 0.05)
    check(ok, "dsgate on %d did not reach the fleet's Redis", d.port)


def fleet_start(c, prompt, delay_ms):
    """Instance A goes upstream for PROMPT; the same body on instance B (the
    tested one) will wait for A's answer (fleet-wide coalescing)."""
    a_gate = gate_a()
    wait_fleet_link(c.d)
    body = chat(prompt)
    a = c.client(body, hdrs(c, "A", {"X-Fake-Delay-Ms": str(delay_ms)}), gate=a_gate)
    c.wait_upstream(c.t + "-A")
    return a, body


def fleet_waiting(c):
    """B's leader waits on A (nothing visible to wait for: give it a moment)."""
    time.sleep(0.2)
    check(len(c.calls(c.t + "-A")) == 1 and not c.calls(c.t + "-L"),
          "B went upstream instead of waiting for A: %r",
          [(e.get("headers") or {}).get("x-test-id") for e in c.fakes[0].log()])


def fleet_done(c):
    a_gate = P["fleet_a"]
    check(a_gate.alive(), "instance A died: %s", a_gate.crash_summary())
    s = scrape(a_gate.port)
    ok = H.wait_until(lambda: metric(scrape(a_gate.port), "dsgate_queue_depth") == 0 and
                      metric(scrape(a_gate.port), "dsgate_inflight") == 0, 3.0, 0.02)
    check(ok, "instance A not settled: %r", [x for x in s if x[0].startswith("dsgate_inflight")])
    c.done()


def t_fleet_wait_plain_leaves():
    """A request waiting for another instance's identical request leaves:
    it never goes upstream; the other instance's client is answered."""
    with Ctx("fleet", ["ff"]) as c:
        prompt = "fleet plain " + c.t
        a, body = fleet_start(c, prompt, 1200)
        b = c.client(body, hdrs(c, "L"), read=False)
        fleet_waiting(c)
        b.leave()
        c.wait_end("client_closed_waiting")
        expect_ok(a, prompt, "instance A's client")
        fleet_done(c)
        check(not c.calls(c.t + "-L"), "the request that left went upstream")


def t_fleet_wait_leader_leaves():
    """The local leader waiting for another instance leaves; its follower
    stays: when the other instance's answer is in the shared cache the
    follower gets it."""
    with Ctx("fleet", ["ff"]) as c:
        prompt = "fleet leader " + c.t
        a, body = fleet_start(c, prompt, 1200)
        lead = c.client(body, hdrs(c, "L"), read=False)
        fleet_waiting(c)
        fol = c.client(body, hdrs(c, "F"))
        c.wait_coalesced(1)
        lead.leave()
        expect_ok(a, prompt, "instance A's client")
        expect_ok(fol, prompt, "follower on instance B")
        check(not c.calls(c.t + "-L") and not c.calls(c.t + "-F"),
              "instance B went upstream: %r", [(e.get("headers") or {}).get("x-test-id")
                                                for e in c.fakes[0].log()])
        fleet_done(c)


def t_fleet_wait_leader_leaves_other_fails():
    """As above, but then the other instance's client leaves too (its answer
    never comes): the headless leader goes upstream for its follower."""
    with Ctx("fleet", ["ff"]) as c:
        prompt = "fleet leader other fails " + c.t
        a_gate = gate_a()
        wait_fleet_link(c.d)
        body = chat(prompt)
        a = c.client(body, hdrs(c, "A", {"X-Fake-Delay-Ms": "3000"}), gate=a_gate, read=False)
        c.wait_upstream(c.t + "-A")
        lead = c.client(body, hdrs(c, "L", {"X-Fake-Delay-Ms": "300"}), read=False)
        fleet_waiting(c)
        fol = c.client(body, hdrs(c, "F", {"X-Fake-Delay-Ms": "300"}))
        c.wait_coalesced(1)
        lead.leave()
        time.sleep(0.05)
        a.leave()
        c.wait_cancelled(c.t + "-A")
        expect_ok(fol, prompt, "follower on instance B")
        fleet_done(c)


def t_fleet_wait_follower_leaves():
    """A follower of a leader waiting for another instance leaves: the
    leader and the other follower get the answer."""
    with Ctx("fleet", ["ff"]) as c:
        prompt = "fleet follower " + c.t
        a, body = fleet_start(c, prompt, 1200)
        lead = c.client(body, hdrs(c, "L"))
        fleet_waiting(c)
        f1 = c.client(body, hdrs(c, "F1"), read=False)
        f2 = c.client(body, hdrs(c, "F2"))
        c.wait_coalesced(2)
        f1.leave()
        c.wait_end("client_closed_waiting")
        expect_ok(a, prompt, "instance A's client")
        expect_ok(lead, prompt, "leader on instance B")
        expect_ok(f2, prompt, "follower 2 on instance B")
        fleet_done(c)


# ================================================================ final

def stop_check(key):
    def t():
        d = P[key]
        alive = d.alive()
        rc = d.stop(15.0)
        log = d.log_text()
        for pat in SANITIZER:
            for line in log.splitlines():
                if pat in line:
                    raise AssertionError("sanitizer report in %s: %s" % (d.log_path,
                                                                         line.strip()[:300]))
        check(alive, "dsgate was not running")
        check(rc == 0, "dsgate exited %s after SIGTERM (log %s)", rc, d.log_path)
    return t


ONE_TESTS = [
    ("crash_a_headless_leader_queued", t_crash_a_headless_leader_queued),
    ("following_last_follower_leaves", t_following_last_follower_leaves),
    ("queued_plain_leaves", t_queued_plain_leaves),
    ("queued_leader_leaves", t_queued_leader_leaves),
    ("queued_follower_leaves", t_queued_follower_leaves),
    ("queued_everyone_leaves", t_queued_everyone_leaves),
    ("backoff_plain_leaves", t_backoff_plain_leaves),
    ("backoff_leader_leaves", t_backoff_leader_leaves),
    ("backoff_follower_leaves", t_backoff_follower_leaves),
    ("before_head_plain_leaves", t_before_head_plain_leaves),
    ("before_head_leader_leaves", t_before_head_leader_leaves),
    ("before_head_follower_leaves", t_before_head_follower_leaves),
    ("after_head_plain_leaves", t_after_head_plain_leaves),
    ("after_head_leader_leaves", t_after_head_leader_leaves),
    ("after_head_follower_leaves", t_after_head_follower_leaves),
    ("after_head_stream_plain_leaves", t_after_head_stream_plain_leaves),
    ("after_head_stream_leader_leaves", t_after_head_stream_leader_leaves),
    ("after_head_stream_follower_leaves", t_after_head_stream_follower_leaves),
    ("streaming_plain_leaves", t_streaming_plain_leaves),
    ("streaming_leader_leaves", t_streaming_leader_leaves),
    ("streaming_follower_leaves", t_streaming_follower_leaves),
    ("streaming_everyone_leaves", t_streaming_everyone_leaves),
    ("one_sigterm_exit_0_no_sanitizer", stop_check("one")),
]

TWO_TESTS = [
    ("crash_b_headless_leader_fails_over", t_crash_b_headless_leader_fails_over),
    ("failover_plain_leaves", t_failover_plain_leaves),
    ("two_sigterm_exit_0_no_sanitizer", stop_check("two")),
]

REDIS_TESTS = [
    ("lookup_plain_leaves", t_lookup_plain_leaves),
    ("lookup_identical_one_leaves", t_lookup_identical_one_leaves),
    ("redis_sigterm_exit_0_no_sanitizer", stop_check("redis")),
]

FLEET_TESTS = [
    ("fleet_wait_plain_leaves", t_fleet_wait_plain_leaves),
    ("fleet_wait_leader_leaves", t_fleet_wait_leader_leaves),
    ("fleet_wait_leader_leaves_other_fails", t_fleet_wait_leader_leaves_other_fails),
    ("fleet_wait_follower_leaves", t_fleet_wait_follower_leaves),
    ("fleet_sigterm_exit_0_no_sanitizer", stop_check("fleet")),
    ("fleet_a_sigterm_exit_0_no_sanitizer", stop_check("fleet_a")),
]


def _setup_one():
    P["f1"] = H.Fake(name="lc-one")
    P["one"] = Gate(lambda port, u=P["f1"].url: config(port, [("one", u, 1)]), "lc-one")


def _setup_two():
    P["f503"] = H.Fake("--status", "503", name="lc-b1")
    P["f2"] = H.Fake(name="lc-b2")
    P["two"] = Gate(lambda port, u1=P["f503"].url, u2=P["f2"].url: config(
        port, [("b1", u1, 8), ("b2", u2, 8)]), "lc-two")


def _setup_redis():
    P["redis_server"] = R.Redis()
    P["fr"] = H.Fake(name="lc-redis")
    P["redis"] = Gate(lambda port, u=P["fr"].url, ru=P["redis_server"].url: config(
        port, [("r", u, 8)], redis_url=ru, redis_timeout="2s", max_entries=0),
        "lc-redis")


def _setup_fleet():
    P["fleet_redis"] = R.Redis()
    P["ff"] = H.Fake(name="lc-fleet")
    url, rurl = P["ff"].url, P["fleet_redis"].url
    prefix = "lc-fleet-%s:" % tid()

    def build(port, url=url, rurl=rurl, prefix=prefix):
        return config(port, [("fl", url, 8)], redis_url=rurl, redis_timeout="500ms",
                      prefix=prefix, fleet_redis=rurl)
    P["fleet_a"] = Gate(build, "lc-fleet-a")
    P["fleet"] = Gate(build, "lc-fleet-b")


def _have_redis():
    return R is not None and any(
        os.access(os.path.join(p, R.REDIS_SERVER), os.X_OK)
        for p in os.environ.get("PATH", "").split(os.pathsep))


def main():
    no_redis = None if _have_redis() else (
        "redis-server not found (make deps installs it): lookup and fleet tests not run")

    def group(tests, setup, key, final=1, skip=None):
        """A Pair of TESTS whose last FINAL tests are its shutdown checks; it
        is set up only when one of its other tests is named (or none is)."""
        return H.Pair(tests, setup, P, key, final={n for n, _ in tests[-final:]},
                      lazy=True, skip=skip)

    return H.main("test_lifecycle", [
        group(ONE_TESTS, _setup_one, "one"),
        group(TWO_TESTS, _setup_two, "two"),
        group(REDIS_TESTS, _setup_redis, "redis", skip=no_redis),
        group(FLEET_TESTS, _setup_fleet, "fleet", final=2, skip=no_redis),
    ])


if __name__ == "__main__":
    sys.exit(main())
