#!/usr/bin/env python3
"""
seeds.py: write the committed seed corpus tests/fuzz/corpus/<target>/ and
the dictionaries tests/fuzz/dict/*.dict (run from anywhere; rewrites them).

The seeds are small meaningful inputs taken from the unit tests, design.md
and real requests (what the openai SDK and curl send).  Crash reproducers
found later are added to the corpus directories by hand (name them
crash-<what>) and are not touched by this script.
"""

import hashlib
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- conf
with open(os.path.join(ROOT, "conf", "dsgate.yaml"), "rb") as f:
    put("conf", "repo-default.yaml", f.read())
put("conf", "minimal.yaml", "listen: 127.0.0.1:8080\n")
put("conf", "empty.yaml", "")
put("conf", "valid-variants.yaml",
    "listen: \"[::1]:0\"\n"
    "admin_listen: \"[::1]:0\"\n"
    "routing: WEIGHTED\n"
    "upstreams:\n"
    "  - {name: local, url: 'http://127.0.0.1:8000/v1/', insecure: true,\n"
    "     models: {deepseek-v4-pro: DeepSeek-R1, \"a\": b}, api_key_env: \"\",\n"
    "     ca_file: /etc/ssl/x.pem}\n"
    "  - name: v6\n"
    "    url: https://[::1]:8443\n"
    "    weight: 3\n"
    "    insecure: true\n"
    "    timeouts: {idle: 0}\n"
    "  - {name: cloud.2_x, url: \"HTTPS://Cloud.Example.com:443/a/b//\"}\n"
    "retry: {on: [], budget: 0, base: 5ms, cap: 5ms, jitter: Decorrelated}\n"
    "cache: {paths: [], redis: {url: \"redis://:pw@127.0.0.1:6379/2\", prefix: \"\"}}\n"
    "fleet: {redis: \"unix:///run/redis.sock\"}\n"
    "clients:\n"
    "  - {token_env: APP1_TOKEN, priority: high}\n"
    "  - {token_env: _app2}\n"
    "log: {level: DEBUG, format: text, file: /var/log/dsgate.log}\n"
    "shutdown_timeout: 0\n")
put("conf", "many-errors.yaml",
    "listen: nope\n"
    "upstreams:\n"
    "  - name: a\n"
    "    url: ftp://a\n"
    "    max_inflight: 0\n"
    "  - name: a\n"
    "    url: http://b\n"
    "    insecure: true\n"
    "  - {url: http://c}\n"
    "queue: {max_wait: 5x, nope: 1}\n"
    "retry: {on: [1000], jitter: none, jitter: full}\n"
    "limits: {max_body: 2GB}\n"
    "extra: 1\n")
put("conf", "anchors-and-docs.yaml",
    "x: &t {connect: 1s, first_data: 2s}\n"
    "upstreams:\n"
    "  - {name: a, url: http://127.0.0.1:1, timeouts: *t}\n"
    "---\n"
    "listen: 1\n")
put("conf", "test-harness.yaml",
    "listen: 127.0.0.1:18080\n"
    "upstreams:\n"
    "  - name: fake\n"
    "    url: \"http://127.0.0.1:18081\"\n"
    "    api_key_env: \"DSGATE_CANARY\"\n"
    "    max_inflight: 64\n"
    "    timeouts: {connect: 2s, first_data: 30s, idle: 30s, total: 0}\n"
    "retry:\n  max_attempts: 3\n  budget: 0.1\n"
    "cache:\n  enabled: true\n  redis: {url: \"redis://127.0.0.1:6390/0\", timeout: 50ms}\n"
    "limits:\n  max_connections: 20\n  header_timeout: 1s\n"
    "shutdown_timeout: 3s\nlog: {level: debug, format: json}\n")
put("conf", "syntax-error.yaml", "upstreams: [ {name: a, url: \n  - :\n\t- x\n")

# ---------------------------------------------------------------- JSON bodies
chat = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hello"}]}
put("cache_key", "chat.json", json.dumps(chat))
put("cache_key", "chat-compact.json", json.dumps(chat, separators=(",", ":"), sort_keys=True))
put("cache_key", "chat-stream-sdk.json",
    json.dumps({"messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "\u4f60\u597d \U0001F600"}],
                "model": "deepseek-v4-pro", "stream": True, "temperature": 0.7,
                "max_tokens": 1024, "stream_options": {"include_usage": True}}))
put("cache_key", "tools.json",
    json.dumps({"model": "deepseek-chat", "messages": [{"role": "user", "content": "w"}],
                "tools": [{"type": "function", "function": {
                    "name": "get_weather", "parameters": {"type": "object", "properties": {
                        "city": {"type": "string"}}, "required": ["city"]}}}],
                "tool_choice": "auto", "top_p": 1e-3, "seed": -12345678901234,
                "stop": None, "logprobs": False}))
put("cache_key", "embeddings.json",
    json.dumps({"model": "deepseek-embed", "input": ["a", "b", "\u00e9\u0301"]}))
put("cache_key", "escapes.json",
    '{"b":"\\u00e9\\ud83d\\ude00\\n\\"\\\\\\/","a":[1,-0,0.1,1E+2,-1.5e-7,[],{}],"a ":null}')
put("cache_key", "dup-keys.json", '{"model":"x","model":"y","z":{"k":1,"k":2}}')
put("cache_key", "scalar.json", '"just a string"')
put("cache_key", "nested.json", "[" * 40 + "]" * 40)

# ---------------------------------------------------------------- jscan (same bodies + edges)
for name in ("chat.json", "chat-stream-sdk.json", "tools.json", "escapes.json", "dup-keys.json"):
    with open(os.path.join(HERE, "corpus", "cache_key", name), "rb") as f:
        put("jscan", name, f.read())
put("jscan", "empty-object.json", " {} \n")
put("jscan", "numbers.json", '{"a":[0,-0,1.5,-2e10,3E+2,4e-2,12345678901234567890,1e400]}')
put("jscan", "bad-number.json", '{"a":01}')
put("jscan", "depth-2047.json", '{"a":' + "[" * 2046 + "]" * 2046 + "}")
put("jscan", "depth-2048.json", '{"a":' + "[" * 2047 + "]" * 2047 + "}")
put("jscan", "utf8.json", "{\"k\":\"\u00e9 \u4f60 \U0001F600\"}")
put("jscan", "utf8-bad.json", b'{"k":"\xed\xa0\x80 \xc0\xaf \xf4\x90\x80\x80"}')
put("jscan", "escapes-all.json", r'{"k":"\" \\ \/ \b \f \n \r \t \u0041"}')
put("jscan", "trailing.json", '{"a":1} x')
put("jscan", "array-top.json", "[1,2]")


# first byte: bit 7 clear = SSE, set = plain body; also the cut point
stream = (": keep-alive\n\n"
          "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\","
          "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n"
          "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n"
          "data: [DONE]\n\n")
put("sse", "stream", b"\x11" + stream.encode())
put("sse", "keepalive-only", b"\x05" + b": keep-alive\r\n\r\n: keep-alive\r\n\r\n\r\n")
put("sse", "crlf-split", b"\x03" + b"\r\n\r\ndata: x\r\n\r\n")
put("sse", "cr-only", b"\x02" + b":c\r\rdata:1\r\r")
put("sse", "event-error", b"\x20" + b"event: error\ndata: {\"error\":{\"message\":\"x\"}}\n\n")
put("sse", "plain-json", b"\x81" + b"\n\n \n{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\"}")
put("sse", "plain-blank", b"\x90" + b" \t\r\n\n\n   ")

# ---------------------------------------------------------------- Retry-After
for name, v in [("seconds", "120"), ("zero", "0"), ("spaces", "  7\t"),
                ("imf", "Wed, 21 Oct 2015 07:28:30 GMT"),
                ("rfc850", "Wednesday, 21-Oct-15 07:28:30 GMT"),
                ("asctime", "Wed Oct 21 07:28:10 2015"),
                ("past", "Thu, 01 Jan 1970 00:00:00 GMT"),
                ("far", "Fri, 31 Dec 9999 23:59:59 GMT"),
                ("overlong", "1234567890"), ("junk", "soon"),
                ("trailing", "Wed, 21 Oct 2015 07:28:30 GMT x")]:
    put("retry_after", name, v)

# ---------------------------------------------------------------- cache entries
def fnv1a64(b):
    h = 14695981039346656037
    for c in b:
        h = ((h ^ c) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def entry(sse, ctype, body, expires=1700000000000, key=None, version=1, flags=None,
          body_len_delta=0, seal=True):
    """An encoded record as src/cache.c writes it (FNV-1a 64 trailer)."""
    key = key or hashlib.sha256(b"seed-" + body).digest()
    if isinstance(ctype, str):
        ctype = ctype.encode()
    f = (1 if sse else 0) if flags is None else flags
    rec = (b"DSGC" + bytes([version, f]) + struct.pack(">Q", expires) + key +
           struct.pack(">H", len(ctype)) + ctype + struct.pack(">I", len(body) + body_len_delta) +
           body)
    return rec + struct.pack(">Q", fnv1a64(rec) if seal else 0)


put("entry", "json", entry(False, "application/json",
                           b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'))
put("entry", "sse", entry(True, "text/event-stream; charset=utf-8",
                          b"data: {\"id\":\"c\"}\n\ndata: [DONE]\n\n"))
put("entry", "empty-ctype", entry(False, "", b"{}"))
put("entry", "old-version", entry(False, "application/json", b"{}", version=0))
put("entry", "bad-flags", entry(False, "application/json", b"{}", flags=2))
put("entry", "error-body", entry(False, "application/json", b'{"error":{"message":"x"}}'))
put("entry", "sse-no-done", entry(True, "text/event-stream", b"data: x\n\n"))
put("entry", "short", b"DSGC\x01\x00")
put("entry", "len-mismatch", entry(False, "application/json", b"{}", body_len_delta=1))
put("entry", "bad-checksum", entry(False, "application/json", b"{}", seal=False))
put("entry", "cut-short", entry(False, "application/json", b'{"a":1}')[:-3])

# ---------------------------------------------------------------- HTTP requests
body = json.dumps(chat).encode()


def req(method, target, headers, body=b"", crlf=b"\r\n"):
    out = b"%s %s HTTP/1.1" % (method, target) + crlf
    for k, v in headers:
        out += k + b": " + v + crlf
    return out + crlf + body


sdk = [(b"Host", b"127.0.0.1:8080"), (b"Accept", b"application/json"),
       (b"Content-Type", b"application/json"), (b"User-Agent", b"OpenAI/JS 5.10.1"),
       (b"X-Stainless-Lang", b"js"), (b"Authorization", b"Bearer sk-test"),
       (b"X-Priority", b"high"), (b"Content-Length", b"%d" % len(body))]
put("http", "sdk-post", req(b"POST", b"/v1/chat/completions", sdk, body))
put("http", "curl-get", req(b"GET", b"/v1/models?x=1", [(b"Host", b"localhost:8080"),
                                                      (b"User-Agent", b"curl/7.88.1"),
                                                      (b"Accept", b"*/*")]))
chunked = b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x;ext=1\r\n%s\r\n" % (len(body) - 10, body[10:]) \
    + b"0\r\nX-Trailer: t\r\n\r\n"
put("http", "chunked", req(b"POST", b"/v1/chat/completions",
                           [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")], chunked))
put("http", "bare-lf", req(b"POST", b"/chat/completions",
                           [(b"Host", b"x"), (b"Content-Length", b"2")], b"{}", crlf=b"\n"))
put("http", "http10-keepalive", b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
put("http", "expect-100", req(b"POST", b"/v1/embeddings",
                              [(b"Host", b"x"), (b"Expect", b"100-continue"),
                               (b"Content-Length", b"2")], b"{}"))
put("http", "cl-te", req(b"POST", b"/v1/chat/completions",
                         [(b"Host", b"x"), (b"Content-Length", b"5"),
                          (b"Transfer-Encoding", b"chunked")], b"0\r\n\r\n"))
put("http", "dup-cl", req(b"POST", b"/v1/x", [(b"Host", b"x"), (b"Content-Length", b"2"),
                                              (b"Content-Length", b"2")], b"{}"))
put("http", "te-gzip", req(b"POST", b"/v1/x", [(b"Host", b"x"),
                                               (b"Transfer-Encoding", b"gzip, chunked")],
                           b"0\r\n\r\n"))
put("http", "folding", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n")
put("http", "absolute", b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
put("http", "connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
put("http", "dotdot-enc", b"GET /v1/%2e%2e/%2fx HTTP/1.1\r\nHost: x\r\n\r\n")
put("http", "chunk-overflow", req(b"POST", b"/v1/x", [(b"Host", b"x"),
                                                      (b"Transfer-Encoding", b"chunked")],
                                  b"ffffffffffffffffffff\r\nx\r\n0\r\n\r\n"))
put("http", "pipelined", req(b"GET", b"/healthz", [(b"Host", b"x")]) +
    req(b"GET", b"/readyz", [(b"Host", b"x")]))
put("http", "ctl-in-value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n")

# ---------------------------------------------------------------- model rewrite
def rw(frm, to, body):
    frm, to = frm.encode(), to.encode()
    return bytes([len(frm), len(to)]) + frm + to + body


put("rewrite", "nonstream", rw("DeepSeek-R1", "deepseek-v4-pro",
    b'{"id":"chatcmpl-1","object":"chat.completion","model":"DeepSeek-R1",'
    b'"choices":[{"message":{"content":"\\"model\\":\\"DeepSeek-R1\\""}}]}'))
put("rewrite", "stream", rw("DeepSeek-R1", "deepseek-v4-pro",
    b'data: {"id":"c","model":"DeepSeek-R1","choices":[]}\n\n'
    b'data: {"id":"c","model" : "DeepSeek-R1","choices":[]}\n\ndata: [DONE]\n\n'))
put("rewrite", "partial-end", rw("X", "Y", b'{"model":"X"}{"model":"'))
put("rewrite", "quotes", rw("X", "Y", b'""""model"""":"X"""model":"X""'))
put("rewrite", "slash-colon", rw("qwen/deepseek:7b", "deepseek-chat",
                                 b'{"model":"qwen/deepseek:7b"}'))
put("rewrite", "empty-to", rw("a", "", b'{"model":"a","model":\n"a"}'))

# ---------------------------------------------------------------- upstream response heads
# The header lines after the status line, as libcurl hands them over
# (fuzz_uphead): good heads and each kind test_untrusted sends.
put("uphead", "deepseek-json",
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Type: application/json\r\n"
    b"Content-Length: 123\r\nConnection: keep-alive\r\nvary: origin, access-control-request-method\r\n"
    b"x-ds-trace-id: 0123456789abcdef\r\n\r\n")
put("uphead", "deepseek-sse",
    b"Content-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n"
    b"Cache-Control: no-cache\r\n\r\n")
put("uphead", "cl-and-te", b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n")
put("uphead", "two-cl", b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n")
put("uphead", "cl-odd", b"Content-Length: +3\r\nContent-Length:  007 \r\n\r\n")
put("uphead", "cl-big", b"Content-Length: 99999999999999999999\r\n\r\n")
put("uphead", "gzip", b"Content-Encoding: identity, gzip\r\nContent-Type: application/json\r\n\n")
put("uphead", "bare-lf", b"X-A: foo\nContent-Length: 2\n\n")
put("uphead", "bare-cr", b"X-A: foo\rbar\r\nX-B: x\r\r\n\r\n")
put("uphead", "nul", b"X-A: foo\x00bar\r\n\r\n")
put("uphead", "fold", b"X-A: foo\r\n  Set-Cookie: x=1\r\n\tmore\r\n\r\n")
put("uphead", "space-colon", b"X-A : foo\r\nX(A): b\r\n: empty\r\nno colon\r\n\r\n")
put("uphead", "ctl-obs-text", b"X-A: \x01\x7f\r\nX-B: caf\xc3\xa9 \t \r\nX-C:\r\n\r\n")
put("uphead", "no-line-end", b"X-A: foo")

# ---------------------------------------------------------------- compat (byte 0: a cut point)
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{}"}}
put("compat", "turn-lacking.json", b"\x07" + json.dumps(
    {"model": "deepseek-reasoner", "tools": TOOLS, "messages": [
        {"role": "user", "content": "use tool"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x"}]}).encode())
put("compat", "turns-pretty-null.json", b"\x20" + json.dumps(
    {"messages": [
        {"role": "assistant", "reasoning_content": None, "tool_calls": [CALL]},
        {"role": "assistant", "tool_calls": [dict(CALL, id="call_\u00e9\"2")]},
        {"role": "assistant", "reasoning_content": "kept", "tool_calls": [CALL]}],
     "model": "pro"}, indent=2).encode())
put("compat", "answer-stream.sse", b"\x33" + (
    'data: {"choices":[{"index":0,"delta":{"reasoning_content":"Let me \\"check\\""}}]}\n\n'
    'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a"}]}}]}\r\n\r\n'
    ': keep-alive\n\ndata: [DONE]\n\n').encode())
put("compat", "answer-whole.json", b"\x11" + json.dumps(
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "",
                                          "reasoning_content": "hm \u00e9",
                                          "tool_calls": [CALL]}}]}).encode())

# ---------------------------------------------------------------- dictionaries
DICTS = {
    "http": ["GET", "POST", "HEAD", "CONNECT", "OPTIONS", " HTTP/1.1\r\n", " HTTP/1.0\r\n",
             "HTTP/2.0", "\r\n", "\r\n\r\n", "\n", "Host: ", "Content-Length: ",
             "Transfer-Encoding: ", "chunked", "Connection: ", "close", "keep-alive",
             "Expect: ", "100-continue", "X-Priority: ", ":", ";", "0\r\n\r\n", "%2e", "%2f",
             "%5c", "/..", "/.", "?", "#", "\\", "\x00", "\t", " ", "\r", "ffffffff",
             "/v1/chat/completions", "*", "http://"],
    "conf": ["listen", "admin_listen", "upstreams", "name", "url", "api_key_env",
             "max_inflight", "adaptive", "weight", "models", "timeouts", "connect",
             "first_data", "idle", "total", "ca_file", "insecure", "queue", "max_queued",
             "max_wait", "default_priority", "aging", "retry", "max_attempts", "base", "cap",
             "jitter", "full", "equal", "decorrelated", "none", "on", "budget", "cache",
             "enabled", "ttl", "memory", "max_entries", "max_bytes", "redis", "prefix",
             "timeout", "shared", "paths", "routing", "failover", "weighted", "fleet",
             "lease_ttl", "fallback_instances", "clients", "token_env", "priority", "limits",
             "max_body", "max_headers", "max_connections", "header_timeout", "body_timeout",
             "idle_timeout", "shutdown_timeout", "log", "level", "format", "file", "json",
             "text", "debug", "http://127.0.0.1:1", "https://", "redis://", "unix://",
             "[::1]:0", "ms", "s", "m", "h", "KB", "MB", "GB", "true", "false", "null", "~",
             ": ", "- ", "{", "}", "[", "]", "&a", "*a", "!!str", "---", "\n  "],
    "json": ["{", "}", "[", "]", ":", ",", "\"", "\\u0000", "\\ud83d\\ude00", "\\u00e9",
             "true", "false", "null", "-0", "1e308", "-1e-308", "9223372036854775807",
             "\"model\"", "\"model\":", "\"messages\"", "\"content\"", "\"stream\"",
             "DeepSeek-R1", "deepseek-v4-pro", "\"tool_calls\"", "\"reasoning_content\"",
             "\"assistant\"", "\"role\"", "\"id\"", "\"choices\"", "\"delta\"", "data: "],
    "sse": ["data: ", "data:", "event: ", "id: ", ": keep-alive", "\n\n", "\r\n", "\r",
            "[DONE]", ":"],
    "uphead": ["Content-Length: ", "Transfer-Encoding: ", "chunked", "identity",
               "Content-Encoding: ", "gzip", "Connection: ", "Content-Type: ", "\r\n", "\n",
               "\r", "\x00", "\t", " ", ":", ",", "0", "+", "-", "\x7f", "\xff"],
    "retry_after": ["Mon", "Wed", "Sun", "Monday", "Wednesday", "Jan", "Oct", "Dec", "GMT",
                    ", ", " ", "-", ":", "1970", "2015", "9999", "07:28:30", "\t"],
}
for name, words in DICTS.items():
    with open(os.path.join(HERE, "dict", name + ".dict"), "w") as f:
        f.write("# %s.dict: libFuzzer dictionary (written by seeds.py)\n" % name)
        for w in words:
            f.write('"%s"\n' % "".join(
                c if 0x20 <= ord(c) < 0x7f and c not in '"\\' else "\\x%02x" % ord(c)
                for c in w))
print("seeds and dictionaries written under", HERE)
