#!/usr/bin/env python3
"""
test_compat_restore: compat.reasoning_content: restore through the real
daemon (issue 15 item 4), against the fake upstream's thinking-model rule
(400 for an assistant tool_calls message without reasoning_content).

A client that drops reasoning_content makes a tool-call turn, then sends
the conversation on: dsgate puts the remembered reasoning back, byte for
byte around the new member (pretty-printed bodies and escapes included),
after whole and streamed answers, together with a model alias, never
across credentials, and never when off.  Two instances sharing a Redis
restore what one of them saw; a paused Redis lets the request go as it is
within the Redis timeout.  SIGHUP turns it on.  Metric and access log.

Usage: test_compat_restore.py [test names...]
"""

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402
import redis_helper as R                                        # noqa: E402

CHAT = "/v1/chat/completions"
STARTED = []
DSGATES = []        # the dsgates of the running test, for the sanitizer check
MEMBER = b',"reasoning_content":'
TOOLS = [{"type": "function", "function": {
    "name": "search", "description": "look something up",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]


def config(port, url, restore=True, redis_url="", prefix="dsgate-compat:", models=None,
           cache=True, redis_timeout="50ms"):
    lines = [
        "# written by tests/integration/test_compat_restore.py",
        "listen: 127.0.0.1:%d" % port,
        "upstreams:",
        "  - name: fake",
        "    url: %s" % H.yaml_quote(url),
        "    api_key_env: DSGATE_IT_UNSET_KEY_VARIABLE",
        "    max_inflight: 64",
        "    adaptive: false",
        "    timeouts: {connect: 2s, first_data: 30s, idle: 30s, total: 0}",
    ]
    if models:
        lines.append("    models: {%s}" % ", ".join("%s: %s" % kv for kv in models.items()))
    lines += [
        "retry: {max_attempts: 1}",
        "cache:",
        "  enabled: %s" % ("true" if cache else "false"),
        "  redis: {url: %s, prefix: %s, timeout: %s}" % (H.yaml_quote(redis_url),
                                                         H.yaml_quote(prefix), redis_timeout),
        "compat: {reasoning_content: %s}" % ("restore" if restore else "off"),
        "shutdown_timeout: 3s",
        "log: {level: info, format: json}",
    ]
    return "\n".join(lines) + "\n"


def start(fake, tag, **kw):
    return H.start_dsgate(lambda p: config(p, fake.url, **kw), tag, STARTED, DSGATES)


def post(d, body, tid, auth="Bearer sk-client-a"):
    return H.request(d.port, "POST", CHAT, headers={
        "Content-Type": "application/json", "Authorization": auth, "X-Test-Id": tid,
        "Cache-Control": "no-store"}, body=body)


def first_turn(d, tid, model="deepseek-reasoner", stream=False, auth="Bearer sk-client-a",
               question="please use tool to find the weather \u00e9t\u00e9"):
    """The tool-call turn: (the assistant message as the client keeps it, the reasoning)."""
    req = {"model": model, "tools": TOOLS, "messages": [{"role": "user", "content": question}]}
    if stream:
        req["stream"] = True
        s = H.sse_request(d.port, json.dumps(req).encode(), headers={
            "Authorization": auth, "X-Test-Id": tid, "Cache-Control": "no-store"})
        check(s.resp and s.resp.status == 200, "first turn: %s", s.error or s.resp.status)
        reasoning = s.joined("reasoning_content")
        calls = {}
        for c in s.chunks():
            for tc in (c["choices"][0].get("delta") or {}).get("tool_calls") or []:
                e = calls.setdefault(tc["index"], {"id": None, "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    e["id"] = tc["id"]
                f = tc.get("function") or {}
                e["function"]["name"] += f.get("name") or ""
                e["function"]["arguments"] += f.get("arguments") or ""
        tool_calls = [calls[i] for i in sorted(calls)]
    else:
        r = post(d, json.dumps(req).encode(), tid, auth)
        check(r.status == 200, "first turn: %s %r", r.status, r.body[:300])
        msg = r.json()["choices"][0]["message"]
        reasoning = msg.get("reasoning_content")
        tool_calls = msg.get("tool_calls")
    check(reasoning and tool_calls and tool_calls[0]["id"], "no tool call with reasoning: %r %r",
          reasoning, tool_calls)
    # what LangChain and friends send back: the message without its reasoning
    return {"role": "assistant", "content": "", "tool_calls": tool_calls}, reasoning


def next_turn(assistant, model="deepseek-reasoner", model_last=False, indent=None):
    """The client's next request, as bytes (pretty-printed with INDENT)."""
    msgs = [{"role": "user", "content": "please use tool to find the weather \u00e9t\u00e9"},
            assistant,
            {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"],
             "content": "sunny, \"25\u00b0C\"\n"}]
    b = {"tools": TOOLS, "messages": msgs, "model": model} if model_last else \
        {"model": model, "tools": TOOLS, "messages": msgs}
    return json.dumps(b, indent=indent).encode()


def upstream_body(fake, tid, n):
    """The body of the Nth (from 0) request the fake saw with X-Test-Id TID."""
    got = H.wait_until(lambda: len(H.log_for(fake, tid)) > n, 3.0)
    check(got, "the fake saw %d requests for %s", len(H.log_for(fake, tid)), tid)
    return H.log_for(fake, tid)[n]["body"].encode()


def check_restored(sent, client, reasoning):
    """SENT is CLIENT with one member "reasoning_content":REASONING added, nothing else."""
    i = sent.find(MEMBER)
    check(i > 0, "nothing restored: %r", sent[:400])
    value, end = json.JSONDecoder().raw_decode(sent.decode(), len(sent[:i + len(MEMBER)].decode()))
    end_b = len(sent.decode()[:end].encode())
    check(value == reasoning, "restored %r, remembered %r", value, reasoning)
    check(sent[:i] + sent[end_b:] == client,
          "the other bytes changed:\n sent   %r\n client %r", sent, client)
    check(sent.count(b'"reasoning_content"') == 1, "more than one member: %r", sent)


def restored_total(d):
    return sum(v for n, _, v in H.scrape(d.port) if n == "dsgate_compat_restored_total")


# ---------------------------------------------------------------- tests

def t_after_json_answer():
    f = H.start_fake(STARTED, "--quiet")
    d = start(f, "json")
    tid = H.test_id("cj")
    assistant, reasoning = first_turn(d, tid)
    for indent in (None, 2):
        body = next_turn(assistant, indent=indent)
        r = post(d, body, tid)
        check(r.status == 200, "next turn: %s %r", r.status, r.body[:300])
        check(r.json()["choices"][0]["message"]["content"].startswith("echo: sunny"),
              "answer %r", r.body[:300])
        check_restored(upstream_body(f, tid, 1 if indent is None else 2), body, reasoning)
    check(restored_total(d) == 2, "dsgate_compat_restored_total %s", restored_total(d))
    a = H.wait_access(d, 3)
    check([x.get("reasoning_restored") for x in a] == [0, 1, 1], "access %r", a)
    check(a[1]["bytes_in"] == len(next_turn(assistant)), "bytes_in %r", a[1])


def t_after_stream_answer():
    f = H.start_fake(STARTED, "--quiet")
    d = start(f, "stream")
    tid = H.test_id("cs")
    assistant, reasoning = first_turn(d, tid, model="deepseek-v4-pro", stream=True)
    body = next_turn(assistant, model="deepseek-v4-pro")
    r = post(d, body, tid)
    check(r.status == 200, "next turn: %s %r", r.status, r.body[:300])
    check_restored(upstream_body(f, tid, 1), body, reasoning)
    # the next turn streamed too
    s = H.sse_request(d.port, dict(json.loads(body), stream=True), headers={
        "Authorization": "Bearer sk-client-a", "X-Test-Id": tid, "Cache-Control": "no-store"})
    check(s.resp and s.resp.status == 200 and s.joined("content").startswith("echo: sunny"),
          "streamed next turn: %s %r", s.error or s.resp.status, s.joined("content"))


def t_off():
    f = H.start_fake(STARTED, "--quiet")
    d = start(f, "off", restore=False)
    tid = H.test_id("co")
    assistant, _ = first_turn(d, tid)
    body = next_turn(assistant)
    r = post(d, body, tid)
    check(r.status == 400 and b"reasoning_content" in r.body, "off: %s %r", r.status, r.body)
    check(upstream_body(f, tid, 1) == body, "off: the body changed")
    check(restored_total(d) == 0, "restored %s", restored_total(d))


def t_scope():
    f = H.start_fake(STARTED, "--quiet")
    d = start(f, "scope")
    tid = H.test_id("cc")
    assistant, reasoning = first_turn(d, tid, auth="Bearer sk-client-a")
    body = next_turn(assistant)
    r = post(d, body, tid, auth="Bearer sk-client-b")
    check(r.status == 400, "another credential got it: %s", r.status)
    check(upstream_body(f, tid, 1) == body, "another credential: the body changed")
    r = post(d, body, tid, auth="Bearer sk-client-a")
    check(r.status == 200, "its own credential: %s %r", r.status, r.body[:200])
    check_restored(upstream_body(f, tid, 2), body, reasoning)


def t_nothing_remembered():
    f = H.start_fake(STARTED, "--quiet")
    d = start(f, "unknown")
    tid = H.test_id("cu")
    assistant = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_never_seen", "type": "function",
         "function": {"name": "search", "arguments": "{}"}}]}
    body = next_turn(assistant)
    r = post(d, body, tid)
    check(r.status == 400, "nothing remembered: %s", r.status)
    check(upstream_body(f, tid, 0) == body, "nothing remembered: the body changed")
    a = H.wait_access(d, 1)
    check(a[0]["reasoning_restored"] == 0, "access %r", a[0])


def t_alias():
    f = H.start_fake(STARTED, "--quiet")
    d = start(f, "alias", models={"thinker": "deepseek-v4-pro"})
    tid = H.test_id("ca")
    assistant, reasoning = first_turn(d, tid, model="thinker")
    for model_last in (False, True):
        body = next_turn(assistant, model="thinker", model_last=model_last)
        r = post(d, body, tid)
        check(r.status == 200, "alias: %s %r", r.status, r.body[:300])
        check(r.json()["model"] == "thinker", "model back: %r", r.json()["model"])
        sent = upstream_body(f, tid, 1 + model_last)
        want = body.replace(b'"model": "thinker"', b'"model": "deepseek-v4-pro"')
        check(want != body, "test body has no model")
        check_restored(sent, want, reasoning)


def two_instances(tag, b_timeout="50ms"):
    """A Redis, the fake, instances A and B sharing that Redis, and a tool-call
    turn made through A: (redis, fake, a, b, test id, key, assistant, reasoning)."""
    rs = R.Redis()
    STARTED.append(rs)
    f = H.start_fake(STARTED, "--quiet")
    a = start(f, tag + "-a", redis_url=rs.url)
    b = start(f, tag + "-b", redis_url=rs.url, redis_timeout=b_timeout)
    tid = H.test_id(tag)
    assistant, reasoning = first_turn(a, tid)
    key = H.wait_until(lambda: rs.cmd("KEYS", "dsgate-compat:rc:*"), 3.0)
    check(key and len(key) == 1, "Redis keys %r", key)
    return rs, f, a, b, tid, key[0], assistant, reasoning


def t_redis_shared():
    rs, f, a, b, tid, key, assistant, reasoning = two_instances("shared")
    ttl = rs.cmd("PTTL", key)
    check(23 * 3600 * 1000 < ttl <= 24 * 3600 * 1000, "PTTL %r (cache.ttl 24h)", ttl)
    body = next_turn(assistant)
    r = post(b, body, tid)
    check(r.status == 200, "the other instance: %s %r", r.status, r.body[:300])
    check_restored(upstream_body(f, tid, 1), body, reasoning)
    check(restored_total(b) == 1, "b restored %s", restored_total(b))
    # the answer of a turn is not a cached answer: nothing of it counts as a cache store
    stores = [v for n, lb, v in H.scrape(a.port)
              if n == "dsgate_cache_stores_total" and lb.get("tier") == "redis"]
    check(not stores or stores == [0.0], "cache stores %r", stores)


def t_redis_paused():
    rs, f, a, b, tid, _, assistant, _ = two_instances("paused", b_timeout="200ms")
    body = next_turn(assistant)
    rs.pause()
    try:
        t0 = time.monotonic()
        r = post(b, body, tid)
        dt = time.monotonic() - t0
    finally:
        rs.resume()
    check(r.status == 400, "Redis paused: %s", r.status)
    check(dt < 2.0, "Redis paused: the request waited %.2fs", dt)
    check(upstream_body(f, tid, 1) == body, "Redis paused: the body changed")
    # Redis back: the same request is restored
    H.wait_until(lambda: post(b, body, tid).status == 200, 5.0, 0.2)
    check(restored_total(b) >= 1, "not restored once Redis came back")


def t_redis_wait_client_leaves():
    """The client leaves while its restore waits for a paused Redis: nothing is left behind."""
    rs, f, a, b, tid, _, assistant, _ = two_instances("leave", b_timeout="2s")
    body = next_turn(assistant)
    rs.pause()
    try:
        c = H.Conn(b.port)
        c.send(H.build_request("POST", CHAT, [("Content-Type", "application/json"),
                                              ("Authorization", "Bearer sk-client-a"),
                                              ("X-Test-Id", tid),
                                              ("Cache-Control", "no-store")],  # compat's wait
                                 body, port=b.port))
        time.sleep(0.2)
        c.close()
        acc = H.wait_access(b, 1)
        check(acc[0]["end"] == "client_closed_waiting", "access %r", acc[0])
    finally:
        rs.resume()
    time.sleep(0.2)
    check(len(H.log_for(f, tid)) == 1, "the request went upstream after its client left")
    r = post(b, body, tid)
    check(r.status == 200, "after Redis came back: %s", r.status)


def t_reload_on():
    f = H.start_fake(STARTED, "--quiet")
    d = start(f, "reload", restore=False)
    tid = H.test_id("cl")
    with open(d.config_path, "w") as fh:
        fh.write(config(d.port, f.url, restore=True))
    os.kill(d.pid, signal.SIGHUP)
    check(H.wait_until(lambda: "reload" in d.log_text().lower(), 3.0), "no reload logged")
    time.sleep(0.2)
    assistant, reasoning = first_turn(d, tid)
    body = next_turn(assistant)
    r = post(d, body, tid)
    check(r.status == 200, "after SIGHUP: %s %r", r.status, r.body[:300])
    check_restored(upstream_body(f, tid, 1), body, reasoning)


TESTS = [
    ("restore_after_json_answer", t_after_json_answer),
    ("restore_after_stream_answer", t_after_stream_answer),
    ("off_goes_as_sent", t_off),
    ("other_credential_not_restored", t_scope),
    ("nothing_remembered_goes_as_sent", t_nothing_remembered),
    ("alias_and_restore", t_alias),
    ("redis_shared_by_two_instances", t_redis_shared),
    ("redis_paused_goes_as_sent", t_redis_paused),
    ("redis_wait_client_leaves", t_redis_wait_client_leaves),
    ("sighup_turns_it_on", t_reload_on),
]


def main():
    return H.main("test_compat_restore", TESTS, started=STARTED,
                  after_each=H.sanitizer_after_each(DSGATES),
                  require=[(H.DSGATE, "build/asan/dsgate"), (H.FAKE, "build/fake_upstream")])


if __name__ == "__main__":
    sys.exit(main())
