#!/usr/bin/env python3
"""
test_trust: credentials never cross, and routing reads the body the check accepted.

  * client-key mode (no injected key): one client's wrong key gets the
    upstream's 401; the next client, with its own key, is sent upstream
    (X-Dsgate-Attempts 1), never given that stored 401, and the circuit
    stays closed;
  * x-api-key and api-key scope the cache like Authorization: a second
    client with another x-api-key is a MISS, the first one again a HIT;
  * with an injected key, no client credential header reaches the upstream;
  * the model routing and the allow-list read comes from the validity
    check's own pass: an escaped member name, a lone surrogate elsewhere in
    the body, a duplicate "model" cannot smuggle a model past an upstream's
    models map;
  * with model aliases a 7.8 MB body of 640k keys (under max_body) keeps
    the loop free: /healthz of another client answers meanwhile (the
    optimised build: the ASan one is 20x slower at scanning).

`test_trust.py NAME...` runs only those tests.
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import CHAT, check, note                           # noqa: E402

STARTED = []


def tid():
    return H.test_id("trust-")


def fake(*args, name="trust"):
    return H.start_fake(STARTED, *args, name=name)


def config(port, ups, cache=False, keep_alive=False):
    lines = ["listen: 127.0.0.1:%d" % port, "upstreams:"]
    for u in ups:
        lines += ["  - name: %s" % u["name"], "    url: %s" % H.yaml_quote(u["url"]),
                  "    api_key_env: %s" % H.yaml_quote(u.get("key_env", ""))]
        if u.get("models"):
            lines.append("    models: {%s}" % ", ".join("%s: %s" % (k, v)
                                                        for k, v in u["models"].items()))
    lines += ["retry: {max_attempts: 2, base: 10ms, cap: 50ms}",
              "cache: {enabled: %s}" % ("true" if cache else "false"),
              "log: {level: info, format: json}", "shutdown_timeout: 2s"]
    return "\n".join(lines) + "\n"


def dsgate(ups, tag, binary=None, **kw):
    port = H.free_port()
    env = {"TRUST_KEY": "sk-dsgate-injected-0001"}
    saved = H.DSGATE
    if binary:
        H.DSGATE = binary
    try:
        d = H.Dsgate(config_text=config(port, ups, **kw), tag="trust-" + tag, port=port, env=env)
    finally:
        H.DSGATE = saved
    STARTED.append(d)
    return d


def post(port, content, headers=None, model="deepseek-chat"):
    hs = {"Content-Type": "application/json"}
    hs.update(headers or {})
    return H.request(port, "POST", CHAT, headers=hs, body=H.chat_body(content, model=model), timeout=15.0)


def states(port):
    r = H.request(port, "GET", "/readyz", timeout=5.0)
    return {u["name"]: u["state"] for u in r.json()["upstreams"]}


def t_client_key_401_not_shared():
    f = fake(name="keys")
    d = dsgate([{"name": "up", "url": f.url}], "keys")
    bad_key = "sk-alice-wrong-9f3c"
    r = post(d.port, "a", {"Authorization": "Bearer " + bad_key, "X-Fake-Status": "401"})
    check(r.status == 401, "the wrong key: %s", r.status)
    check(states(d.port)["up"] == "closed", "one client's 401 opened the circuit: %s",
          states(d.port))
    for i in range(3):
        r = post(d.port, "b %d" % i, {"Authorization": "Bearer sk-bob-good-%d" % i})
        check(r.status == 200, "another client got %s %r", r.status, r.body[:200])
        check(r.header("x-dsgate-attempts") == "1", "X-Dsgate-Attempts %s: not sent upstream",
              r.header("x-dsgate-attempts"))
        check(bad_key[-4:].encode() not in r.body, "another client's key in the answer")
    check(f.stats()["requests"] == 4, "the fake saw %d requests, want 4", f.stats()["requests"])


def t_injected_key_402_opens():
    f = fake("--status", "402", name="pay")
    d = dsgate([{"name": "up", "url": f.url, "key_env": "TRUST_KEY"}], "pay")
    r = post(d.port, "x")
    check(r.status == 402, "402: %s", r.status)
    check(states(d.port)["up"] == "open", "dsgate's own key's 402 did not open: %s",
          states(d.port))
    r2 = post(d.port, "y")
    check(r2.status == 402 and r2.header("x-dsgate-attempts") == "0",
          "the stored 402 (dsgate's key, so any client's): %s %s", r2.status,
          r2.header("x-dsgate-attempts"))


def t_credential_headers_scope_cache():
    f = fake(name="scope")
    d = dsgate([{"name": "up", "url": f.url}], "scope", cache=True)
    for hdr in ("x-api-key", "api-key", "Authorization"):
        c = "scope %s %s" % (hdr, tid())
        a = post(d.port, c, {hdr: "key-A-1"})
        b = post(d.port, c, {hdr: "key-B-2"})
        a2 = post(d.port, c, {hdr: "key-A-1"})
        check(a.status == b.status == a2.status == 200, "statuses %s %s %s", a.status, b.status,
              a2.status)
        check(a.header("x-cache") == "MISS", "%s first: %s", hdr, a.header("x-cache"))
        check(b.header("x-cache") == "MISS", "%s: another key got the cached answer (%s)", hdr,
              b.header("x-cache"))
        check(a2.header("x-cache") == "HIT", "%s: the same key again: %s", hdr,
              a2.header("x-cache"))


def t_injected_key_strips_client_credentials():
    f = fake(name="strip")
    d = dsgate([{"name": "up", "url": f.url, "key_env": "TRUST_KEY"}], "strip")
    t = tid()
    r = post(d.port, "strip", {"Authorization": "Bearer client-1", "x-api-key": "client-2",
                               "api-key": "client-3", "X-Test-Id": t})
    check(r.status == 200, "status %s", r.status)
    e = f.find(t)
    check(e, "no request at the fake")
    hs = e["headers"]
    check(hs.get("authorization") == "Bearer sk-dsgate-injected-0001",
          "Authorization upstream: %r", hs.get("authorization"))
    check("x-api-key" not in hs and "api-key" not in hs, "client credentials upstream: %r",
          {k: v for k, v in hs.items() if "key" in k})


def t_one_json_verdict():
    only = fake(name="only")
    d = dsgate([{"name": "only", "url": only.url, "models": {"allowed-model": "allowed-model"}}],
               "verdict")
    cases = [
        ("escaped name", b'{"mod\\u0065l":"forbidden","messages":[]}', 404),
        ("lone surrogate elsewhere", b'{"model":"forbidden","x":"\\ud800","messages":[]}', 404),
        ("duplicate model", b'{"model":"allowed-model","model":"forbidden","messages":[]}', 400),
        ("model not a string", b'{"model":["forbidden"],"messages":[]}', 400),
        ("escaped value", b'{"model":"allowed\\u002dmodel","messages":[]}', 200),
    ]
    for name, raw, want in cases:
        r = H.request(d.port, "POST", CHAT, headers={"Content-Type": "application/json"},
                      body=raw, timeout=10.0)
        check(r.status == want, "%s: %s %r, want %d", name, r.status, r.body[:200], want)
    check(only.stats()["requests"] == 1, "the allow-listed upstream saw %d requests, want 1",
          only.stats()["requests"])


def t_aliases_big_body_no_stall():
    opt = os.path.join(H.ROOT, "build", "dsgate")
    f = fake(name="big")
    d = dsgate([{"name": "up", "url": f.url, "models": {"deepseek-chat": "renamed-chat"}}],
               "big", binary=opt if os.access(opt, os.X_OK) else None)
    keys = ",".join('"k%d":%d' % (i, i % 10) for i in range(640000))
    big = ('{"model":"deepseek-chat","messages":[{"role":"user","content":"big"}],%s}'
           % keys).encode()
    note("body %.1f MB", len(big) / 1e6)
    worst = [0.0]
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            t0 = time.monotonic()
            H.request(d.port, "GET", "/healthz", timeout=10.0)
            worst[0] = max(worst[0], time.monotonic() - t0)
            time.sleep(0.005)
    th = threading.Thread(target=probe, daemon=True)
    th.start()
    time.sleep(0.1)
    r = H.request(d.port, "POST", CHAT, headers={"Content-Type": "application/json"}, body=big,
                  timeout=60.0)
    stop.set()
    th.join(5.0)
    note("big aliased body: %s; worst /healthz %.1f ms", r.status, worst[0] * 1000)
    check(r.status == 200, "big body: %s %r", r.status, r.body[:200])
    e = f.log()[-1]
    check(e["body_bytes"] == len(big) - len("deepseek-chat") + len("renamed-chat"),
          "upstream got %d bytes", e["body_bytes"])
    check(worst[0] < 0.25, "/healthz waited %.0f ms while the big body was routed",
          worst[0] * 1000)


TESTS = [
    ("client_key_401_not_shared", t_client_key_401_not_shared),
    ("injected_key_402_opens", t_injected_key_402_opens),
    ("credential_headers_scope_cache", t_credential_headers_scope_cache),
    ("injected_key_strips_client_credentials", t_injected_key_strips_client_credentials),
    ("one_json_verdict", t_one_json_verdict),
    ("aliases_big_body_no_stall", t_aliases_big_body_no_stall),
]


def main():
    return H.main("test_trust", TESTS, started=STARTED,
                  require=[(H.DSGATE, "build/asan/dsgate"), (H.FAKE, "build/fake_upstream")])


if __name__ == "__main__":
    sys.exit(main())
