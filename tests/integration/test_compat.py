#!/usr/bin/env python3
"""
test_compat: compat.reasoning_content: restore (issue 15), through the real
daemon against build/fake_upstream's chat path.

The fake acts as DeepSeek does for thinking models: an answer to a request
with tools whose last user message says "use tool" carries tool_calls and a
reasoning_content; a later request whose assistant message has tool_calls
but no reasoning_content gets 400 "Missing `reasoning_content` field ...".
Many clients drop the field; with compat: {reasoning_content: restore}
dsgate remembers the reasoning of such answers (non-stream and streamed),
keyed by tool call id within the client's credential, and puts it back:

  * remembered from a non-stream and from a streamed answer, restored in the
    next request (the fake answers 200 instead of 400), also in place of a
    `"reasoning_content": null`, also in two assistant turns at once;
  * dsgate_compat_restored_total counts the restores;
  * every other byte of the request goes upstream as the client sent it;
  * nothing remembered, or reasoning already there: the request as it is;
  * one credential's reasoning never goes into another credential's request;
  * off by default: the request goes as it is and the 400 comes back.

Dsgates: "plain" (no compat key) and "restore"; each shared by the tests,
started on first use.  `test_compat.py NAME...` runs only those tests.
"""

import json
import os
import re
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402

CHAT = "/v1/chat/completions"
MODEL = "deepseek-reasoner"
KEY_A = "Bearer sk-compat-it-key-a"
KEY_B = "Bearer sk-compat-it-key-b"
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Looks something up",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
MISSING = "Missing `reasoning_content` field"

P = {}


def tid():
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- dsgates

CONFIGS = {
    "plain": "",
    "restore": "compat: {reasoning_content: restore}",
}


def dsgate(key):
    """The shared dsgate KEY, started on first use (again after a crash)."""
    if "fake" not in P:
        P["fake"] = H.Fake(name="compat")
    d = P.get(key)
    if d is None or not d.alive():
        P[key] = d = H.Dsgate(tag="compat-" + key, upstream_url=P["fake"].url,
                              api_key_env="DSGATE_IT_UNSET_KEY_VARIABLE", extra=CONFIGS[key])
    return d


def shared(fn):
    def run():
        try:
            fn()
        finally:
            for k in CONFIGS:
                d = P.get(k)
                if d is not None and H.wait_until(lambda: not d.alive(), 0.1, 0.01):
                    raise AssertionError("dsgate %s died during this test (exit %s): %s; log %s"
                                         % (k, d.proc.returncode, d.crash_summary(), d.log_path))
    return run


# ---------------------------------------------------------------- conversation

def post(d, raw, key=KEY_A, t=None):
    hs = [("Content-Type", "application/json"), ("Authorization", key)]
    if t:
        hs.append(("X-Test-Id", t))
    return H.request(d.port, "POST", CHAT, hs, raw)


def turn1_body(ask, stream=False):
    b = {"model": MODEL, "messages": [{"role": "user", "content": ask}], "tools": TOOLS}
    if stream:
        b["stream"] = True
    return json.dumps(b).encode()


def turn1(d, ask, key=KEY_A, stream=False):
    """The tool-call answer to ASK: (tool call id, reasoning_content)."""
    t = tid()
    if stream:
        hs = [("Authorization", key), ("X-Test-Id", t)]
        st = H.sse_request(d.port, turn1_body(ask, True), hs)
        check(st.error is None and st.resp.status == 200, "turn 1 stream: %s %r", st.error, st.resp)
        ids = []
        for ch in st.chunks():
            for c in ch.get("choices") or []:
                for tc in (c.get("delta") or {}).get("tool_calls") or []:
                    if tc.get("id"):
                        ids.append(tc["id"])
        check(len(ids) == 1, "turn 1 stream tool call ids %r", ids)
        return ids[0], st.joined("reasoning_content")
    r = post(d, turn1_body(ask), key, t)
    check(r.status == 200, "turn 1: %s %r", r.status, r.body[:300])
    m = r.json()["choices"][0]["message"]
    check(m.get("tool_calls") and m.get("reasoning_content"), "turn 1 answer %r", m)
    return m["tool_calls"][0]["id"], m["reasoning_content"]


def assistant(call_id, ask, reasoning=None, null=False):
    m = {"role": "assistant", "content": "",
         "tool_calls": [{"id": call_id, "type": "function",
                         "function": {"name": "lookup", "arguments": json.dumps({"query": ask})}}]}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    elif null:
        m["reasoning_content"] = None
    return m


def turn2_raw(ask, msgs, result="42 degrees"):
    """The follow-up request as a client would write it (odd white space on
    purpose: the bytes must travel as they are)."""
    b = {"model": MODEL, "temperature": 0.25,
         "messages": [{"role": "user", "content": ask}] + msgs +
                     [{"role": "tool", "tool_call_id": msgs[-1]["tool_calls"][0]["id"],
                       "content": result}],
         "tools": TOOLS}
    return json.dumps(b, indent=1, separators=(" ,", ":  ")).encode()


def received(t):
    e = P["fake"].find(t, timeout=2.0)
    check(e is not None, "request %s not at the fake", t)
    return e["body"].encode()


def without_restored(body, value):
    """BODY with each `"reasoning_content":VALUE` member dsgate added taken
    out again (wherever in its object it went); a restored null stays null."""
    tok = re.escape(json.dumps(value).encode())
    out = re.sub(rb'\s*,\s*"reasoning_content"\s*:\s*' + tok + rb'(?=\s*})', b"", body)
    out = re.sub(rb'"reasoning_content"\s*:\s*' + tok + rb'\s*,\s*', b"", out)
    return out


def restored_count(d):
    return sum(v for n, _, v in H.scrape(d.port) if n == "dsgate_compat_restored_total")


def check_as_is(t, raw):
    got = received(t)
    check(got == raw, "the request did not go as it was: sent %r, the fake got %r", raw[:300], got[:300])


# ---------------------------------------------------------------- tests

def t_off_by_default():
    d = dsgate("plain")
    ask = "please use tool lookup, plain %s" % tid()
    call, _ = turn1(d, ask)
    raw = turn2_raw(ask, [assistant(call, ask)])
    t = tid()
    r = post(d, raw, t=t)
    check(r.status == 400 and MISSING in r.body.decode("utf-8", "replace"),
          "without compat: %s %r, want the fake's 400", r.status, r.body[:300])
    check_as_is(t, raw)


def _restore(stream):
    d = dsgate("restore")
    ask = "please use tool lookup, %s %s" % ("stream" if stream else "nonstream", tid())
    call, reasoning = turn1(d, ask, stream=stream)
    check(reasoning == "thinking about: " + ask, "turn 1 reasoning %r", reasoning)
    before = restored_count(d)
    raw = turn2_raw(ask, [assistant(call, ask)])
    t = tid()
    r = post(d, raw, t=t)
    check(r.status == 200, "turn 2: %s %r (the reasoning was not restored)", r.status, r.body[:300])
    check(r.json()["choices"][0]["message"]["content"] == "echo: 42 degrees", "turn 2 %r", r.body[:300])
    got = received(t)
    m = json.loads(got)["messages"][1]
    check(m.get("reasoning_content") == reasoning, "the fake's assistant message %r", m)
    check(without_restored(got, reasoning) == raw,
          "other bytes changed: sent %r, the fake got %r", raw[:400], got[:400])
    check(restored_count(d) - before == 1, "dsgate_compat_restored_total grew by %s",
          restored_count(d) - before)


def t_restore_from_nonstream():
    _restore(False)


def t_restore_from_stream():
    _restore(True)


def t_restore_in_place_of_null():
    d = dsgate("restore")
    ask = "please use tool lookup, null %s" % tid()
    call, reasoning = turn1(d, ask)
    raw = turn2_raw(ask, [assistant(call, ask, null=True)])
    t = tid()
    r = post(d, raw, t=t)
    check(r.status == 200, "turn 2 with reasoning_content null: %s %r", r.status, r.body[:300])
    got = received(t)
    back = re.sub(rb'("reasoning_content"\s*:\s*)' + re.escape(json.dumps(reasoning).encode()),
                  rb"\1null", got)
    check(back == raw, "other bytes changed: sent %r, the fake got %r", raw[:400], got[:400])


def t_restore_two_turns():
    d = dsgate("restore")
    ask1 = "please use tool lookup, first %s" % tid()
    call1, r1 = turn1(d, ask1)
    # turn 2 asks for another tool call; dsgate restores turn 1's reasoning
    b = {"model": MODEL, "tools": TOOLS, "messages": [
        {"role": "user", "content": ask1}, assistant(call1, ask1),
        {"role": "tool", "tool_call_id": call1, "content": "first result"},
        {"role": "user", "content": "now use tool lookup again"}]}
    r = post(d, json.dumps(b).encode())
    check(r.status == 200, "turn 2: %s %r", r.status, r.body[:300])
    m2 = r.json()["choices"][0]["message"]
    check(m2.get("tool_calls"), "turn 2 made no tool call: %r", m2)
    call2, r2 = m2["tool_calls"][0]["id"], m2["reasoning_content"]
    before = restored_count(d)
    b["messages"] += [assistant(call2, "now use tool lookup again"),
                      {"role": "tool", "tool_call_id": call2, "content": "second result"}]
    t = tid()
    r = post(d, json.dumps(b).encode(), t=t)
    check(r.status == 200, "turn 3 with two assistant turns: %s %r", r.status, r.body[:300])
    ms = [m for m in json.loads(received(t))["messages"] if m["role"] == "assistant"]
    check([m.get("reasoning_content") for m in ms] == [r1, r2],
          "the fake's assistant messages %r", ms)
    check(restored_count(d) > before, "dsgate_compat_restored_total did not grow")


def t_nothing_remembered_as_is():
    d = dsgate("restore")
    ask = "please use tool lookup, unknown %s" % tid()
    before = restored_count(d)
    raw = turn2_raw(ask, [assistant("call_never_seen_%s" % tid(), ask)])
    t = tid()
    r = post(d, raw, t=t)
    check(r.status == 400 and MISSING in r.body.decode("utf-8", "replace"),
          "nothing remembered: %s %r, want the fake's 400 as it is", r.status, r.body[:300])
    check_as_is(t, raw)
    check(restored_count(d) == before, "dsgate_compat_restored_total grew")


def t_present_reasoning_untouched():
    d = dsgate("restore")
    ask = "please use tool lookup, present %s" % tid()
    call, _ = turn1(d, ask)
    before = restored_count(d)
    raw = turn2_raw(ask, [assistant(call, ask, reasoning="the client's own reasoning")])
    t = tid()
    r = post(d, raw, t=t)
    check(r.status == 200, "turn 2: %s %r", r.status, r.body[:300])
    check_as_is(t, raw)
    check(restored_count(d) == before, "dsgate_compat_restored_total grew")


def t_scoped_per_credential():
    d = dsgate("restore")
    ask = "please use tool lookup, scoped %s" % tid()
    call, reasoning = turn1(d, ask, key=KEY_A)
    raw = turn2_raw(ask, [assistant(call, ask)])
    t = tid()
    r = post(d, raw, key=KEY_B, t=t)
    got = received(t)
    check(reasoning.encode() not in got and b"reasoning_content" not in got,
          "credential A's reasoning went into credential B's request: %r", got[:400])
    check(r.status == 400, "credential B: %s %r, want the fake's 400", r.status, r.body[:300])
    check_as_is(t, raw)
    r = post(d, raw, key=KEY_A)
    check(r.status == 200, "credential A afterwards: %s %r", r.status, r.body[:300])


def t_stop_clean():
    H.check_stopped_clean({k: P.get(k) for k in CONFIGS})


TESTS = [
    ("off_by_default_400_passes_through", t_off_by_default),
    ("restore_from_nonstream_answer", t_restore_from_nonstream),
    ("restore_from_streamed_answer", t_restore_from_stream),
    ("restore_in_place_of_null", t_restore_in_place_of_null),
    ("restore_two_assistant_turns", t_restore_two_turns),
    ("nothing_remembered_request_as_is", t_nothing_remembered_as_is),
    ("present_reasoning_untouched", t_present_reasoning_untouched),
    ("scoped_per_credential", t_scoped_per_credential),
    ("dsgates_exit_0_no_sanitizer", t_stop_clean),
]


def main():
    tests = [(n, fn if fn is t_stop_clean else shared(fn)) for n, fn in TESTS]
    return H.main("test_compat", tests,
                  require=[(H.DSGATE, "build/asan/dsgate"), (H.FAKE, "build/fake_upstream")])


if __name__ == "__main__":
    sys.exit(main())
