#!/usr/bin/env python3
"""
test_upstreams: several upstreams (issue 5) through the real daemon.

Failover in list order past a down upstream (a closed port) and one that
answers 503 to everything; their circuits opening (/readyz, metrics) and
then getting no traffic but probes; recovery when a healthy fake takes the
broken one's port; 402 opening a circuit at once (a warning in the log, the
request served elsewhere, or the stored 402 answered at once when nothing
else is left); weighted balancing (1:2:5 over 2,000 requests); model
aliases (the rewritten body the fake received, the client's name in plain
and streamed answers, 404 for a model nobody serves, the /v1/models
union); /readyz states; X-Dsgate-Upstream; a retry that moves to another
upstream at once instead of backing off.

Each test starts the fakes and the dsgate it needs and stops them after
it; every wait has a deadline.  The recovery test waits for real circuit
cooldowns (5 s, then 10 s after a failed probe): about 20 s; the whole file
takes well under 2 minutes.  Numbers worth seeing are printed as `# ` lines.
"""

import json
import os
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check, note, scrape                         # noqa: E402

CHAT = "/v1/chat/completions"
STARTED = []        # fakes and dsgates started by the running test, stopped after it


def tid():
    return uuid.uuid4().hex[:12]


def chat_body(content="hello", model="deepseek-chat", stream=False):
    b = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


# ---------------------------------------------------------------- processes

def fake(*args, name="fake"):
    f = H.Fake(*args, name=name)
    STARTED.append(f)
    return f


def fake_on(port, *args, name="fake", timeout=5.0):
    """A fake on a given port (a port just left by another process may take
    a moment to be free)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fake("--port", str(port), *args, name=name)
        except RuntimeError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def stop_one(obj):
    if obj in STARTED:
        STARTED.remove(obj)
    obj.stop()


def closed_port_url():
    """The URL of a loopback port where nothing listens (connection refused)."""
    port = H.free_port()
    return port, "http://127.0.0.1:%d" % port


def upstream(name, url, weight=1, max_inflight=64, models=None, key_env=None):
    return {"name": name, "url": url, "weight": weight, "max_inflight": max_inflight,
            "models": models, "key_env": key_env}


def config(port, ups, routing="failover", attempts=5, base="20ms", cap="2s", jitter="full",
           budget=0.5, max_wait="20s", cache_paths=None, extra=""):
    lines = [
        "# written by tests/integration/test_upstreams.py",
        "listen: 127.0.0.1:%d" % port,
        "routing: %s" % routing,
        "upstreams:",
    ]
    for u in ups:
        lines += [
            "  - name: %s" % u["name"],
            "    url: %s" % H.yaml_quote(u["url"]),
            "    max_inflight: %d" % u["max_inflight"],
            "    api_key_env: %s" % (u.get("key_env") or '""'),
            "    adaptive: false",
            "    weight: %d" % u["weight"],
            "    timeouts: {connect: 2s, first_data: 20s, idle: 20s, total: 0}",
        ]
        if u["models"]:
            lines.append("    models: {%s}" % ", ".join(
                "%s: %s" % (H.yaml_quote(k), H.yaml_quote(v)) for k, v in u["models"].items()))
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
        "cache:",
        "  enabled: false",
    ]
    if cache_paths is not None:
        lines.append("  paths: [%s]" % ", ".join(cache_paths))
    lines += [
        "shutdown_timeout: 3s",
        "log: {level: info, format: json}",
    ]
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


def dsgate(ups, tag, **cfg):
    port = H.free_port()
    d = H.Dsgate(config_text=config(port, ups, **cfg), tag="upstreams-" + tag, port=port,
                 env={"DSGATE_TEST_KEY": "sk-test-injected-key-0001"})
    STARTED.append(d)
    return d


# ---------------------------------------------------------------- clients

def post(port, body=None, headers=None, timeout=15.0):
    hs = {"Content-Type": "application/json"}
    hs.update(headers or {})
    return H.request(port, "POST", CHAT, headers=hs,
                     body=body if body is not None else chat_body(), timeout=timeout)


def load(port, n, concurrency, body_fn=None, timeout=20.0):
    """N chat requests over CONCURRENCY keep-alive connections.

    Returns N results, each a Response or the exception that ended it.
    """
    results = [None] * n
    lock = threading.Lock()
    nxt = [0]

    def worker():
        conn = None
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= n:
                break
            body = body_fn(i) if body_fn else chat_body("load %d" % i)
            try:
                if conn is None:
                    conn = H.Conn(port, timeout=timeout)
                conn.send(H.build_request("POST", CHAT, [("Content-Type", "application/json")],
                                          body, port=port))
                r = conn.read_response(timeout, "POST")
                results[i] = r
                if (r.header("connection") or "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:              # noqa: BLE001
                results[i] = e
                if conn:
                    conn.close()
                conn = None
        if conn:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * n / concurrency + 30)
    check(not any(t.is_alive() for t in threads), "load: a client thread did not finish")
    return results


def statuses(results):
    out = {}
    for r in results:
        k = r.status if isinstance(r, H.Response) else type(r).__name__
        out[k] = out.get(k, 0) + 1
    return out


def by_upstream(results):
    out = {}
    for r in results:
        if isinstance(r, H.Response):
            k = r.header("x-dsgate-upstream")
            out[k] = out.get(k, 0) + 1
    return out


def all_ok_on(results, name):
    st = statuses(results)
    check(st == {200: len(results)}, "statuses %s, want all %d 200", st, len(results))
    ups = by_upstream(results)
    check(ups == {name: len(results)}, "X-Dsgate-Upstream %s, want all %s", ups, name)
    for r in results:
        check(r.header("x-fake-name") == name, "X-Dsgate-Upstream %s but X-Fake-Name %s",
              r.header("x-dsgate-upstream"), r.header("x-fake-name"))


# ---------------------------------------------------------------- /readyz, metrics

def readyz(port):
    r = H.request(port, "GET", "/readyz", timeout=5.0)
    check(r.status in (200, 503), "/readyz answered %s", r.status)
    j = r.json()
    check(isinstance(j.get("ready"), bool) and isinstance(j.get("upstreams"), list),
          "/readyz body %r", r.body[:300])
    check(j["ready"] == (r.status == 200), "/readyz: status %d but ready %s", r.status,
          j["ready"])
    for u in j["upstreams"]:
        for k in ("name", "state", "reason", "inflight", "limit"):
            check(k in u, "/readyz upstream without %r: %r", k, u)
        check(u["state"] in ("closed", "open", "half_open"), "/readyz state %r", u["state"])
    return r.status, j


def states(port):
    _, j = readyz(port)
    return {u["name"]: u["state"] for u in j["upstreams"]}


def ups_of(port):
    _, j = readyz(port)
    return {u["name"]: u for u in j["upstreams"]}


def metric(samples, name, **labels):
    """Sum of NAME's samples whose labels include LABELS; None if there is none."""
    vals = [v for n, ls, v in samples
            if n == name and all(ls.get(k) == str(x) for k, x in labels.items())]
    return sum(vals) if vals else None


def wait_states(port, want, timeout, poke=None, interval=0.1):
    """Poll /readyz until every upstream named in WANT is in that state.
    POKE (called between polls) sends traffic: probes go only with requests."""
    def ok():
        s = states(port)
        if all(s.get(k) == v for k, v in want.items()):
            return s
        if poke:
            poke()
        return None
    got = H.wait_until(ok, timeout, interval)
    check(got, "states did not become %s within %.0fs (are %s)", want, timeout, states(port))
    return got


# ---------------------------------------------------------------- tests

def t_failover_circuits_open():
    """[down, 503, good]: everything completes on good; the broken two open
    (/readyz, metrics) and then get no traffic (a probe at most)."""
    _, down_url = closed_port_url()
    bad = fake("--status", "503", name="bad")
    good = fake(name="good")
    d = dsgate([upstream("down", down_url), upstream("bad", bad.url),
                upstream("good", good.url)], "failover")
    st, j = readyz(d.port)
    check(st == 200 and all(u["state"] == "closed" for u in j["upstreams"]),
          "/readyz at start: %s %s", st, j)
    check([u["name"] for u in j["upstreams"]] == ["down", "bad", "good"],
          "/readyz order %s", j)

    first = load(d.port, 20, 4)
    all_ok_on(first, "good")
    t_open = time.monotonic()
    s = states(d.port)
    check(s == {"down": "open", "bad": "open", "good": "closed"}, "states after 20: %s", s)
    st, j = readyz(d.port)
    ups = {u["name"]: u for u in j["upstreams"]}
    check(st == 200 and j["ready"] is True, "/readyz with good closed: %s %s", st, j)
    check(ups["down"]["reason"] in ("connect", "broken"), "down's reason %r",
          ups["down"]["reason"])
    check(ups["bad"]["reason"] == "503", "bad's reason %r", ups["bad"]["reason"])
    check(ups["good"]["reason"] == "", "good's reason %r", ups["good"]["reason"])
    m = scrape(d.port)
    check(metric(m, "dsgate_circuit_open", upstream="down") == 1, "circuit_open{down} %s",
          metric(m, "dsgate_circuit_open", upstream="down"))
    check(metric(m, "dsgate_circuit_open", upstream="bad") == 1, "circuit_open{bad} %s",
          metric(m, "dsgate_circuit_open", upstream="bad"))
    check(metric(m, "dsgate_circuit_open", upstream="good") == 0, "circuit_open{good} %s",
          metric(m, "dsgate_circuit_open", upstream="good"))
    n_conn = metric(m, "dsgate_upstream_attempts_total", upstream="down", outcome="connect_error")
    n_503 = metric(m, "dsgate_upstream_attempts_total", upstream="bad", outcome="503")
    n_ok = metric(m, "dsgate_upstream_attempts_total", upstream="good", outcome="ok")
    check(n_conn is not None and n_conn >= 5, "attempts{down,connect_error} %s", n_conn)
    check(n_503 is not None and n_503 >= 5, "attempts{bad,503} %s", n_503)
    check(n_ok == 20, "attempts{good,ok} %s, want 20", n_ok)
    check(bad.stats()["requests"] == n_503, "bad fake saw %d requests, metrics say %s",
          bad.stats()["requests"], n_503)
    note("opening: down %d connect errors, bad %d x 503", n_conn, n_503)

    # opened: a batch goes to good alone, well inside the 5 s cooldown
    bad.reset()
    good.reset()
    batch = load(d.port, 150, 10)
    dt = time.monotonic() - t_open
    all_ok_on(batch, "good")
    seen = bad.stats()["requests"]
    note("after opening: bad got %d of 150 requests (batch ended %.1fs after opening)",
         seen, dt)
    check(seen <= (0 if dt < 4.5 else 2), "bad got %d requests while open (%.1fs)", seen, dt)
    check(good.stats()["requests"] == 150, "good got %d of 150", good.stats()["requests"])
    for r in batch:
        check(r.header("x-dsgate-attempts") == "1", "attempts %s after opening",
              r.header("x-dsgate-attempts"))


def t_failover_recovery():
    """The broken upstreams recover: their circuits close after the cooldown
    (on a probe) and traffic returns to them in list order."""
    down_port, down_url = closed_port_url()
    bad = fake("--status", "503", name="bad")
    good = fake(name="good")
    d = dsgate([upstream("down", down_url), upstream("bad", bad.url),
                upstream("good", good.url)], "recovery")
    all_ok_on(load(d.port, 10, 1), "good")
    check(states(d.port) == {"down": "open", "bad": "open", "good": "closed"},
          "states after 10: %s", states(d.port))
    t_open = time.monotonic()

    # bad is fixed: a healthy fake takes its port
    bad_port = bad.port
    stop_one(bad)
    bad2 = fake_on(bad_port, name="bad")
    trickle = []

    def poke():
        trickle.append(post(d.port, timeout=10.0))

    wait_states(d.port, {"bad": "closed"}, 15.0, poke)
    dt = time.monotonic() - t_open
    note("bad closed %.1fs after opening (cooldown 5 s); %d requests meanwhile", dt,
         len(trickle))
    check(dt >= 4.5, "bad closed after %.1fs, before its 5 s cooldown", dt)
    check(all(r.status == 200 for r in trickle), "trickle statuses %s", statuses(trickle))
    # down's probe failed on the way (it is still refused): open again, 10 s
    u = ups_of(d.port)
    check(u["down"]["state"] == "open", "down is %s, want open (probe refused)",
          u["down"]["state"])
    check(u["bad"]["reason"] == "", "bad closed but reason %r", u["bad"]["reason"])
    good.reset()
    bad2.reset()
    all_ok_on(load(d.port, 10, 1), "bad")
    check(good.stats()["requests"] == 0, "good got %d requests, bad comes first now",
          good.stats()["requests"])

    # down is back too: a fake on its port; its cooldown is now 10 s
    fake_on(down_port, name="down")
    t_fix = time.monotonic()
    trickle.clear()
    wait_states(d.port, {"down": "closed"}, 20.0, poke)
    note("down closed %.1fs after it came back", time.monotonic() - t_fix)
    all_ok_on(load(d.port, 10, 1), "down")
    st, j = readyz(d.port)
    check(st == 200 and all(x["state"] == "closed" for x in j["upstreams"]),
          "/readyz at the end: %s %s", st, j)
    m = scrape(d.port)
    for name in ("down", "bad", "good"):
        check(metric(m, "dsgate_circuit_open", upstream=name) == 0, "circuit_open{%s} %s",
              name, metric(m, "dsgate_circuit_open", upstream=name))
    check("circuit closed" in d.log_text(), "no 'circuit closed' line in the log")


def t_auth_402_fails_over():
    """402 opens the circuit at once (one request), with a warning naming
    the upstream; the client is served by the next upstream."""
    pay = fake("--status", "402", name="pay")
    good = fake(name="good")
    # dsgate's own key (injected-key mode): a 402 is the account's, so it opens the
    # circuit; with clients' own keys it would be that client's answer only (issue 14)
    d = dsgate([upstream("pay", pay.url, key_env="DSGATE_TEST_KEY"),
                upstream("good", good.url, key_env="DSGATE_TEST_KEY")], "402-failover")
    t0 = time.monotonic()
    r = post(d.port)
    dt = time.monotonic() - t0
    check(r.status == 200, "first request: %s %r", r.status, r.body[:200])
    check(r.header("x-dsgate-upstream") == "good", "X-Dsgate-Upstream %s",
          r.header("x-dsgate-upstream"))
    check(r.header("x-dsgate-attempts") == "2", "X-Dsgate-Attempts %s",
          r.header("x-dsgate-attempts"))
    check(dt < 1.5, "first request took %.2fs", dt)
    u = ups_of(d.port)
    check(u["pay"]["state"] == "open" and u["pay"]["reason"] == "402", "pay in /readyz: %s",
          u["pay"])
    check(u["good"]["state"] == "closed", "good in /readyz: %s", u["good"])
    m = scrape(d.port)
    check(metric(m, "dsgate_circuit_open", upstream="pay") == 1, "circuit_open{pay} %s",
          metric(m, "dsgate_circuit_open", upstream="pay"))

    def warned():
        for line in d.log_text().splitlines():
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if (j.get("level") == "warn" and "pay" in j.get("msg", "")
                    and "402" in j.get("msg", "")):
                return j["msg"]
        return None
    msg = H.wait_until(warned, 2.0, 0.05)
    check(msg, "no warning naming pay and 402 in the log: %s", d.log_tail(800))
    note("log: %s", msg)

    all_ok_on(load(d.port, 20, 4), "good")
    check(pay.stats()["requests"] == 1, "pay got %d requests, want 1",
          pay.stats()["requests"])


def t_auth_402_only_fails_fast():
    """With only the 402 upstream: the first request gets its 402; later
    ones get the same answer at once, without calling it again."""
    pay = fake("--status", "402", name="pay")
    d = dsgate([upstream("pay", pay.url, key_env="DSGATE_TEST_KEY")], "402-only",
               max_wait="30s", base="2s")
    first = post(d.port)
    check(first.status == 402, "first request: %s %r", first.status, first.body[:200])
    check(H.openai_error_shape(first) is None, "402 body: %s", H.openai_error_shape(first))
    st, j = readyz(d.port)
    check(st == 503 and j["ready"] is False, "/readyz with pay open: %s %s", st, j)
    check(j["upstreams"][0]["state"] == "open" and j["upstreams"][0]["reason"] == "402",
          "/readyz: %s", j)
    worst = 0.0
    for i in range(5):
        t0 = time.monotonic()
        r = post(d.port, chat_body("again %d" % i))
        dt = time.monotonic() - t0
        worst = max(worst, dt)
        check(r.status == 402, "request %d: %s %r", i, r.status, r.body[:200])
        check(r.body == first.body, "request %d: body %r, want the stored %r", i,
              r.body[:200], first.body[:200])
        check(r.header("x-dsgate-upstream") == "pay", "X-Dsgate-Upstream %s",
              r.header("x-dsgate-upstream"))
        check("application/json" in (r.header("content-type") or ""), "content-type %s",
              r.header("content-type"))
    note("402 answered from the open circuit in at most %.0f ms", worst * 1000)
    check(worst < 0.5, "a 402 answer took %.2fs (should be at once)", worst)
    check(pay.stats()["requests"] == 1, "pay got %d requests, want 1", pay.stats()["requests"])


def t_weighted_split():
    """routing: weighted, weights 1:2:5, 2,000 requests at concurrency 20:
    each share within 5 percentage points of its weight's."""
    ws = {"w1": 1, "w2": 2, "w5": 5}
    fakes = {n: fake(name=n) for n in ws}
    d = dsgate([upstream(n, fakes[n].url, weight=w) for n, w in ws.items()], "weighted",
               routing="weighted")
    t0 = time.monotonic()
    res = load(d.port, 2000, 20)
    dt = time.monotonic() - t0
    st = statuses(res)
    check(st == {200: 2000}, "statuses %s", st)
    counts = {n: fakes[n].stats()["requests"] for n in ws}
    check(sum(counts.values()) == 2000, "the fakes got %s requests in all, want 2000", counts)
    hdr = by_upstream(res)
    check(hdr == counts, "X-Dsgate-Upstream counts %s, fakes' counts %s", hdr, counts)
    shares = {n: 100.0 * counts[n] / 2000 for n in ws}
    note("weighted 1:2:5 over 2000 requests in %.1fs: %s", dt,
         ", ".join("%s %.1f%%" % (n, shares[n]) for n in ws))
    for n, w in ws.items():
        want = 100.0 * w / 8
        check(abs(shares[n] - want) <= 5.0, "%s: %.1f%%, want %.1f%% +- 5", n, shares[n], want)


def t_model_alias():
    """An upstream with models {deepseek-v4-pro: DeepSeek-R1} receives
    DeepSeek-R1; the client sees deepseek-v4-pro everywhere."""
    alias = fake(name="alias")
    plain = fake(name="plain")
    d = dsgate([upstream("alias", alias.url, models={"deepseek-v4-pro": "DeepSeek-R1"}),
                upstream("plain", plain.url)], "alias")

    # non-stream
    t = tid()
    sent = {"model": "deepseek-v4-pro", "temperature": 0.5,
            "messages": [{"role": "user", "content": "alias \u00e9 test"}]}
    r = post(d.port, json.dumps(sent).encode(), headers={"X-Test-Id": t})
    check(r.status == 200, "non-stream: %s %r", r.status, r.body[:200])
    check(r.header("x-dsgate-upstream") == "alias", "X-Dsgate-Upstream %s",
          r.header("x-dsgate-upstream"))
    e = alias.find(t)
    check(e, "the alias fake has no request %s", t)
    # only the model's string is replaced; every other byte is the client's (issue 14)
    sent_bytes = json.dumps(sent)
    check(e["body"] == sent_bytes.replace('"deepseek-v4-pro"', '"DeepSeek-R1"', 1),
          "alias fake received %r, want the client's bytes with the model renamed",
          e["body"][:300])
    got = json.loads(e["body"])
    want = dict(sent, model="DeepSeek-R1")
    check(got == want, "alias fake received %r, want %r", got, want)
    check(b"DeepSeek-R1" not in r.body, "client answer names DeepSeek-R1: %r", r.body[:300])
    j = r.json()
    check(j.get("model") == "deepseek-v4-pro", "answer model %r", j.get("model"))
    check(j["choices"][0]["message"]["content"] == "echo: alias \u00e9 test",
          "answer content %r", j["choices"][0]["message"])
    for k, v in r.headers:
        check("DeepSeek-R1" not in v, "header %s: %s", k, v)

    # stream
    t = tid()
    st = H.sse_request(d.port, chat_body("streamed alias", "deepseek-v4-pro", stream=True),
                       headers={"X-Test-Id": t})
    check(st.error is None and st.resp is not None and st.resp.status == 200,
          "stream: %s %s", st.error, st.resp)
    e = alias.find(t)
    check(e and json.loads(e["body"]).get("model") == "DeepSeek-R1", "alias fake received %r",
          e and e["body"][:300])
    check(b"DeepSeek-R1" not in st.raw, "stream names DeepSeek-R1: %r", st.raw[:400])
    chunks = st.chunks()
    check(len(chunks) >= 3, "only %d chunks", len(chunks))
    models = {c.get("model") for c in chunks}
    check(models == {"deepseek-v4-pro"}, "chunk models %s", models)
    check(st.data_events()[-1]["data"] == "[DONE]", "stream did not end with [DONE]")
    check(st.joined("content") == "echo: streamed alias", "stream content %r",
          st.joined("content"))

    # another model: the plain upstream, the body as sent, byte for byte
    t = tid()
    raw = b'{ "model" : "deepseek-chat",  "messages": [{"role":"user","content":"x"}] }'
    r = post(d.port, raw, headers={"X-Test-Id": t})
    check(r.status == 200 and r.header("x-dsgate-upstream") == "plain",
          "deepseek-chat: %s via %s", r.status, r.header("x-dsgate-upstream"))
    e = plain.find(t)
    check(e and e["body"].encode() == raw, "plain fake received %r", e and e["body"])
    check(r.json()["model"] == "deepseek-chat", "answer model %r", r.json().get("model"))
    check(alias.find(t, timeout=0.2) is None, "the alias upstream got a deepseek-chat request")


def t_alias_any_cache_paths():
    """Model routing and renaming do not depend on cache.paths: with chat
    completions left out of the cache, the alias is still applied and a
    model nobody serves still gets the 404."""
    a = fake(name="a")
    b = fake(name="b")
    d = dsgate([upstream("a", a.url, models={"deepseek-v4-pro": "DeepSeek-R1"}),
                upstream("b", b.url, models={"deepseek-chat": "deepseek-chat"})],
               "alias-paths", cache_paths=["/v1/embeddings"])
    t = tid()
    r = post(d.port, chat_body("p", "deepseek-v4-pro"), headers={"X-Test-Id": t})
    check(r.status == 200 and r.header("x-dsgate-upstream") == "a", "deepseek-v4-pro: %s via %s",
          r.status, r.header("x-dsgate-upstream"))
    e = a.find(t)
    check(e and json.loads(e["body"])["model"] == "DeepSeek-R1",
          "with cache.paths [/v1/embeddings] upstream a received %r (no alias applied)",
          e and e["body"])
    check(b"DeepSeek-R1" not in r.body, "answer names DeepSeek-R1: %r", r.body[:200])
    r = post(d.port, chat_body("q", "gpt-4o"))
    check(r.status == 404, "unknown model with cache.paths [/v1/embeddings]: %s via %s",
          r.status, r.header("x-dsgate-upstream"))


def t_no_head_of_line_blocking():
    """Each upstream has its own limit: a request for b's model does not
    wait behind a queued request for a's model while a is full."""
    a = fake(name="a")
    b = fake(name="b")
    # keepalive off: X-Dsgate-Upstream is read from the head, which must be the upstream's
    d = dsgate([upstream("a", a.url, max_inflight=1, models={"deepseek-v4-pro": "deepseek-v4-pro"}),
                upstream("b", b.url, models={"deepseek-chat": "deepseek-chat"})], "hol",
               extra="keepalive: {after: 0s}")
    out = {}

    def send(key, model, delay_ms):
        t0 = time.monotonic()
        try:
            r = post(d.port, chat_body(key, model), headers={"X-Fake-Delay-Ms": str(delay_ms)},
                     timeout=15.0)
            out[key] = (r.status, r.header("x-dsgate-upstream"), time.monotonic() - t0)
        except Exception as e:                  # noqa: BLE001
            out[key] = (repr(e), None, time.monotonic() - t0)

    th = [threading.Thread(target=send, args=("slow", "deepseek-v4-pro", 2500), daemon=True)]
    th[0].start()
    H.wait_until(lambda: a.stats()["inflight"] == 1, 5.0)
    th.append(threading.Thread(target=send, args=("queued", "deepseek-v4-pro", 0), daemon=True))
    th[1].start()
    H.wait_until(lambda: (metric(scrape(d.port), "dsgate_queue_depth") or 0) >= 1, 5.0)
    send("other", "deepseek-chat", 0)
    for t in th:
        t.join(15.0)
    note("a full, one request queued for it: a deepseek-chat request took %.2fs",
         out["other"][2])
    check(out["slow"][:2] == (200, "a") and out["queued"][:2] == (200, "a"), "a's requests: %s",
          out)
    check(out["other"][:2] == (200, "b"), "deepseek-chat: %s", out["other"])
    check(out["other"][2] < 1.0, "deepseek-chat waited %.2fs behind a's queue while b was idle",
          out["other"][2])


def t_models_list_union():
    """GET /v1/models: the aliases plus the lists of the upstreams without a
    map; fetched once, then cached."""
    alias = fake(name="alias")
    plain = fake(name="plain")
    d = dsgate([upstream("alias", alias.url, models={"deepseek-v4-pro": "DeepSeek-R1",
                                                     "my-model": "deepseek-chat"}),
                upstream("plain", plain.url)], "models")
    ref = plain.get_json("/v1/models")
    plain_ids = [m["id"] for m in ref["data"]]
    plain.reset()                   # forget the reference request above
    r = H.request(d.port, "GET", "/v1/models", timeout=10.0)
    check(r.status == 200, "/v1/models: %s %r", r.status, r.body[:200])
    j = r.json()
    check(j.get("object") == "list" and isinstance(j.get("data"), list), "body %r", j)
    ids = [m.get("id") for m in j["data"]]
    note("/v1/models: %s", ", ".join(ids))
    check(len(ids) == len(set(ids)), "duplicate ids %s", ids)
    want = {"deepseek-v4-pro", "my-model"} | set(plain_ids)
    check(set(ids) == want, "ids %s, want %s", sorted(ids), sorted(want))
    check("DeepSeek-R1" not in ids, "an upstream-side name is listed: %s", ids)
    for m in j["data"]:
        check(m.get("object") == "model", "entry %r", m)
    asked = [e for e in plain.log() if e["path"] == "/v1/models"]
    check(len(asked) == 1, "plain was asked %d times for its list", len(asked))
    check(not [e for e in alias.log() if e["path"].endswith("/models")],
          "the alias-only upstream was asked for its list")
    r2 = H.request(d.port, "GET", "/v1/models", timeout=10.0)
    check(r2.status == 200 and r2.json() == j, "second answer differs: %r", r2.body[:200])
    asked = [e for e in plain.log() if e["path"] == "/v1/models"]
    check(len(asked) == 1, "not cached: plain was asked %d times", len(asked))


def t_unknown_model_404():
    """Every upstream has a models map: a model none takes gets a 404
    OpenAI-shaped error listing the available names; the others route by map."""
    a = fake(name="a")
    b = fake(name="b")
    d = dsgate([upstream("a", a.url, models={"deepseek-v4-pro": "DeepSeek-R1"}),
                upstream("b", b.url, models={"deepseek-chat": "local-chat",
                                              "deepseek-v4-flash": "flash"})], "unknown")
    r = post(d.port, chat_body("x", "gpt-4o"))
    check(r.status == 404, "unknown model: %s %r", r.status, r.body[:300])
    why = H.openai_error_shape(r)
    check(why is None, "404 body: %s", why)
    msg = r.json()["error"]["message"]
    for name in ("gpt-4o", "deepseek-v4-pro", "deepseek-chat", "deepseek-v4-flash"):
        check(name in msg, "404 message does not name %s: %r", name, msg)
    check(a.stats()["requests"] == 0 and b.stats()["requests"] == 0,
          "an upstream got the unknown model's request")
    # routing by map: deepseek-chat skips a (failover order) and goes to b as local-chat
    t = tid()
    r = post(d.port, chat_body("y", "deepseek-chat"), headers={"X-Test-Id": t})
    check(r.status == 200 and r.header("x-dsgate-upstream") == "b", "deepseek-chat: %s via %s",
          r.status, r.header("x-dsgate-upstream"))
    e = b.find(t)
    check(e and json.loads(e["body"])["model"] == "local-chat", "b received %r",
          e and e["body"])
    check(r.json()["model"] == "deepseek-chat", "answer model %r", r.json().get("model"))


def t_readyz_states():
    """/readyz is 200 while an upstream is usable, 503 with ready:false when
    every circuit is open; then no upstream can be reached and requests get
    a fast 503 with Retry-After (not a wait for max_wait)."""
    _, u1 = closed_port_url()
    _, u2 = closed_port_url()
    d = dsgate([upstream("down1", u1), upstream("down2", u2)], "readyz", attempts=1,
               max_wait="1s")
    st, j = readyz(d.port)
    check(st == 200 and j["ready"] is True, "/readyz at start: %s %s", st, j)
    for i in range(5):
        r = post(d.port)
        check(r.status == 502, "request %d: %s %r", i, r.status, r.body[:200])
        check(r.header("x-dsgate-upstream") == "down1", "request %d went to %s", i,
              r.header("x-dsgate-upstream"))
    st, j = readyz(d.port)
    check(st == 200 and j["ready"] is True, "/readyz with down2 closed: %s %s", st, j)
    check(states(d.port) == {"down1": "open", "down2": "closed"}, "states %s", states(d.port))
    for i in range(5):
        r = post(d.port)
        check(r.status == 502 and r.header("x-dsgate-upstream") == "down2",
              "request %d: %s via %s", i, r.status, r.header("x-dsgate-upstream"))
    st, j = readyz(d.port)
    check(st == 503 and j["ready"] is False, "/readyz with both open: %s %s", st, j)
    check([(u["name"], u["state"], u["reason"]) for u in j["upstreams"]] ==
          [("down1", "open", "connect"), ("down2", "open", "connect")], "/readyz %s", j)
    m = scrape(d.port)
    check(metric(m, "dsgate_circuit_open", upstream="down1") == 1 and
          metric(m, "dsgate_circuit_open", upstream="down2") == 1, "circuit_open %s, %s",
          metric(m, "dsgate_circuit_open", upstream="down1"),
          metric(m, "dsgate_circuit_open", upstream="down2"))
    # every circuit open on connect errors: nothing can be reached, say so at once
    t0 = time.monotonic()
    r = post(d.port)
    dt = time.monotonic() - t0
    check(r.status == 503, "with every circuit open: %s %r", r.status, r.body[:200])
    check(dt < 0.5, "answered after %.2fs, want at once (not queue.max_wait)", dt)
    check(H.openai_error_shape(r) is None, "503 body: %s", H.openai_error_shape(r))
    ra = r.header("retry-after")
    check(ra is not None and ra.isdigit() and 1 <= int(ra) <= 6,
          "Retry-After %r, want the seconds until the next probe", ra)


def t_retry_moves_without_backoff():
    """retry.base 2s: a 503 on the first upstream moves to the second at
    once; backoff only when every candidate failed."""
    bad = fake("--status", "503", name="bad")
    good = fake(name="good")
    # keepalive off: the statuses and headers read here must be the upstream's
    d = dsgate([upstream("bad", bad.url), upstream("good", good.url)], "move",
               base="2s", cap="4s", jitter="none", attempts=3, max_wait="30s",
               extra="keepalive: {after: 0s}")
    for i in range(3):
        t0 = time.monotonic()
        r = post(d.port, chat_body("move %d" % i))
        dt = time.monotonic() - t0
        check(r.status == 200, "request %d: %s %r", i, r.status, r.body[:200])
        check(r.header("x-dsgate-upstream") == "good", "request %d via %s", i,
              r.header("x-dsgate-upstream"))
        check(r.header("x-dsgate-attempts") == "2", "request %d: X-Dsgate-Attempts %s", i,
              r.header("x-dsgate-attempts"))
        check(dt < 1.0, "request %d took %.2fs: it waited for a backoff", i, dt)
        if i == 0:
            note("503 then moved: %.0f ms (retry.base 2s)", dt * 1000)
    check(bad.stats()["requests"] == 3, "bad got %d requests", bad.stats()["requests"])
    m = scrape(d.port)
    moved = metric(m, "dsgate_retries_total", upstream="bad", reason="503")
    check(moved == 3, "retries_total{bad,503} %s, want 3", moved)
    # both answer 503: now the retry backs off (2 s, jitter none), then 503 stays
    t0 = time.monotonic()
    r = post(d.port, chat_body("both"), headers={"X-Fake-Status": "503"})
    dt = time.monotonic() - t0
    note("503 from both: %.2fs, %s attempts", dt, r.header("x-dsgate-attempts"))
    check(r.status == 503, "both 503: %s", r.status)
    check(r.header("x-dsgate-attempts") == "3", "X-Dsgate-Attempts %s",
          r.header("x-dsgate-attempts"))
    check(1.9 <= dt <= 5.0, "both 503 took %.2fs, want one 2 s backoff", dt)


TESTS = [
    ("failover_circuits_open_no_traffic", t_failover_circuits_open),
    ("failover_recovery_closes_circuits", t_failover_recovery),
    ("auth_402_opens_at_once_fails_over", t_auth_402_fails_over),
    ("auth_402_only_upstream_fails_fast", t_auth_402_only_fails_fast),
    ("weighted_split_1_2_5", t_weighted_split),
    ("model_alias_rewrite", t_model_alias),
    ("models_list_union_cached", t_models_list_union),
    ("unknown_model_404", t_unknown_model_404),
    ("alias_applies_whatever_cache_paths", t_alias_any_cache_paths),
    ("no_head_of_line_blocking_across_upstreams", t_no_head_of_line_blocking),
    ("readyz_states", t_readyz_states),
    ("retry_moves_without_backoff", t_retry_moves_without_backoff),
]


def main():
    return H.main("test_upstreams", TESTS, started=STARTED)


if __name__ == "__main__":
    sys.exit(main())
