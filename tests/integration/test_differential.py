#!/usr/bin/env python3
"""
test_differential: dsgate's own HTTP/1.1 request parser (src/http.c) against
two reference parsers, and the framing leniencies it once had, through the
real daemon over real sockets.

1. One test per leniency http.c used to have (each sends its bytes with a
   request pipelined behind, and wants a 400 (431 for too many header
   fields) with an OpenAI-shaped JSON error, the connection closed, nothing
   forwarded, the pipelined request neither answered nor forwarded):
   chunk sizes followed by junk, bare LF in chunk framing, trailer lines
   without a colon or with bare CR / NUL, a last chunk without its final
   CRLF followed by a request, GET/HEAD with a body, `Content_Length` /
   `Transfer_Encoding`, more than 128 header fields; and `close` in a
   Connection header longer than 256 bytes, which must close the
   connection after the answer.

2. The differential suite: every vector of tests/differential/requests.txt
   (raw bytes, see the file's head) is sent on a fresh connection to
   - dsgate in front of build/fake_upstream, whose /_log says which
     requests dsgate forwarded and with which body bytes;
   - Node's llhttp: tests/differential/node_ref.js, an http.Server with
     default options that answers each request it read with its body;
   - Python's h11 (python3-h11), fed the same bytes in this process.
   For each parser the result is the list of requests it accepted (method,
   path, body).  The test fails when dsgate accepts a request that both
   references refuse (or never see: a request smuggled by framing), or
   forwards a request whose method, path or body bytes differ from those of
   a reference that accepted it.  Where dsgate refuses what a reference
   accepts, that is a disagreement, printed but not a failure (dsgate is
   stricter on purpose).  A summary line gives the counts.

dsgate here runs with limits.max_headers 16KB, Node's default maxHeaderSize
and h11's max_incomplete_event_size, so that "too large" means the same.

Run: python3 tests/integration/test_differential.py [test names...]
(needs build/asan/dsgate, build/fake_upstream, node, python3-h11;
DIFF_VERBOSE=1 prints every disagreement, not only the first 40).
"""

import base64
import concurrent.futures
import json
import os
import re
import select
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check, note                                 # noqa: E402

try:
    import h11
except ImportError:                     # a python3 other than Debian's
    sys.path.append("/usr/lib/python3/dist-packages")
    try:
        import h11
    except ImportError:
        h11 = None

DIFF_DIR = os.path.join(H.ROOT, "tests", "differential")
CORPUS = os.path.join(DIFF_DIR, "requests.txt")
NODE_REF = os.path.join(DIFF_DIR, "node_ref.js")

STARTED = []


def tid():
    return H.test_id()


# ---------------------------------------------------------------- processes

def config(port, url, limits=None):
    lim = {"header_timeout": "1s", "body_timeout": "1s", "idle_timeout": "2s"}
    lim.update(limits or {})
    return H.make_config(port, url, limits=lim)


def pair(tag, limits=None):
    """A fake upstream and a dsgate in front of it."""
    f = H.Fake(name="diff-" + tag)
    STARTED.append(f)
    port = H.free_port()
    d = H.Dsgate(config_text=config(port, f.url, limits), port=port, tag="diff-" + tag)
    STARTED.append(d)
    return f, d


class NodeRef:
    """tests/differential/node_ref.js on a free port."""

    def __init__(self):
        self.proc = subprocess.Popen(["node", NODE_REF], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        H._procs.append(self.proc)
        deadline = time.monotonic() + 10
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not r or self.proc.poll() is not None:
                raise RuntimeError("node_ref.js did not print READY (got %r)" % line)
            c = os.read(self.proc.stdout.fileno(), 1)
            if not c:
                raise RuntimeError("node_ref.js exited (got %r)" % line)
            line += c
        self.port = int(line.split()[1])

    def stop(self):
        return H.stop_process(self.proc, 5.0)


# ---------------------------------------------------------------- raw sockets

def read_all(sock, timeout, quiet):
    """Bytes read until EOF or reset, TIMEOUT in all, or QUIET seconds without
    a byte; (data, closed)."""
    deadline = time.monotonic() + timeout
    got = b""
    while True:
        left = min(deadline - time.monotonic(), quiet)
        if left <= 0:
            return got, False
        sock.settimeout(left)
        try:
            d = sock.recv(65536)
        except socket.timeout:
            return got, False
        except (ConnectionResetError, BrokenPipeError):
            return got, True
        if not d:
            return got, True
        got += d


def send_raw(port, raw, timeout=3.0, quiet=0.5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except OSError:
            pass
        return read_all(s, timeout, quiet)


def split_responses(data):
    """DATA as a list of (status, headers, body); 1xx answers are left out;
    an answer without Content-Length or chunked framing takes the rest."""
    out = []
    buf = data
    while buf:
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            out.append((None, {}, buf))
            break
        lines = buf[:i].decode("latin-1").split("\r\n")
        buf = buf[i + 4:]
        m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
        if not m:
            out.append((None, {}, lines[0].encode("latin-1")))
            break
        st = int(m.group(1))
        hs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hs[k.strip().lower()] = v.strip()
        if 100 <= st < 200:
            continue
        if "chunked" in hs.get("transfer-encoding", "").lower():
            body = b""
            while True:
                j = buf.find(b"\r\n")
                if j < 0:
                    break
                size = int(buf[:j].split(b";")[0] or b"0", 16)
                buf = buf[j + 2:]
                if size == 0:
                    k = buf.find(b"\r\n")
                    while k > 0:
                        buf = buf[k + 2:]
                        k = buf.find(b"\r\n")
                    buf = buf[2:]
                    break
                body += buf[:size]
                buf = buf[size + 2:]
        elif "content-length" in hs:
            n = int(hs["content-length"])
            body, buf = buf[:n], buf[n:]
        else:
            body, buf = buf, b""
        out.append((st, hs, body))
    return out


def is_error_json(body):
    try:
        j = json.loads(body)
    except ValueError:
        return False
    e = j.get("error") if isinstance(j, dict) else None
    return isinstance(e, dict) and all(k in e for k in ("message", "type", "code"))


# ==================================================================== 1. the fixed leniencies

def smuggled_req(i):
    return (b"GET /v1/smuggled-%s HTTP/1.1\r\nHost: x\r\nX-Test-Id: smuggled-%s\r\n"
            b"Content-Length: 0\r\n\r\n" % (i.encode(), i.encode()))


def post_head(headers, method=b"POST", path=b"/v1/framing"):
    out = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    out += b"Content-Type: application/json\r\n"
    for h in headers:
        out += h + b"\r\n"
    return out + b"\r\n"


TE_HEAD = post_head([b"Transfer-Encoding: chunked"])


def refused(tag, cases, want=(400,)):
    """Send each (name, raw) of CASES with a request pipelined behind it: the
    answer must be one of WANT with a JSON error (no body for HEAD), alone,
    the connection closed; nothing reaches the upstream."""
    f, d = pair(tag)
    before = f.stats()["requests"]
    bad = []
    for name, raw in cases:
        i = tid()
        data, closed = send_raw(d.port, raw + smuggled_req(i), timeout=4.0, quiet=4.0)
        resps = split_responses(data)
        st = resps[0][0] if resps else None
        if st not in want:
            bad.append("%s: status %s (want %s)" % (name, st, "/".join(map(str, want))))
        elif not raw.startswith(b"HEAD ") and not is_error_json(resps[0][2]):
            bad.append("%s: %d without an OpenAI-shaped JSON error: %r"
                       % (name, st, resps[0][2][:80]))
        if len(resps) > 1:
            bad.append("%s: %d answers: bytes after the bad request were read as a request"
                       % (name, len(resps)))
        if not closed:
            bad.append("%s: connection still open after the error" % name)
    after = f.stats()["requests"]
    smuggled = [e.get("path") for e in f.log() if "smuggled" in (e.get("path") or "")]
    note("%s: %d requests, %d reached the upstream", tag, len(cases), after - before)
    check(not bad, "; ".join(bad))
    check(after == before, "%d request(s) reached the upstream: %r", after - before,
          [e.get("path") for e in f.log()][-5:])
    check(not smuggled, "pipelined requests reached the upstream: %r", smuggled)
    check(d.alive(), "dsgate died")


def t_chunk_size_junk():
    """Item 1: a chunk size followed by anything but `;` (an extension) or
    the line end: `5 xyz`, `5\\txyz`, `5 6`, and the trailing white space
    the grammar has no room for (`5 `).  Found failing: all were read as
    size 5 (chunk extensions in the old parser began at a space or tab)."""
    cases = []
    for name, line in [("space_junk", b"5 xyz"), ("tab_junk", b"5\txyz"), ("space_digit", b"5 6"),
                       ("space_hex", b"2 ff"), ("trailing_space", b"5 "),
                       ("trailing_tab", b"5\t")]:
        body = line + b"\r\nhello\r\n0\r\n\r\n"
        cases.append((name, TE_HEAD + body))
    refused("chunk-junk", cases)


def t_chunk_bare_lf():
    """Item 2: bare LF in chunk framing: the chunk-size line, after the chunk
    data, the last chunk, the final empty line.  Found failing: each was
    accepted as if it had been CRLF."""
    cases = [("size_line", TE_HEAD + b"2\n{}\r\n0\r\n\r\n"),
             ("after_data", TE_HEAD + b"2\r\n{}\n0\r\n\r\n"),
             ("last_chunk", TE_HEAD + b"2\r\n{}\r\n0\n\r\n"),
             ("final_line", TE_HEAD + b"2\r\n{}\r\n0\r\n\n"),
             ("all", TE_HEAD + b"2\n{}\n0\n\n"),
             ("trailer_line", TE_HEAD + b"2\r\n{}\r\n0\r\nX-T: 1\n\r\n")]
    refused("chunk-lf", cases)


def t_trailer_syntax():
    """Item 3: trailer lines must be header fields: a line without a colon,
    with a bare CR, NUL or another control byte, an invalid name or an
    obs-fold is refused.  Found failing: trailer lines were dropped unread."""
    cases = []
    for name, line in [("no_colon", b"X-T 1"), ("bare_cr", b"X-T: a\rb"), ("nul", b"X-T: a\x00b"),
                       ("nul_name", b"X\x00T: 1"), ("ctl", b"X-T: \x01"),
                       ("empty_name", b": 1"), ("space_before_colon", b"X-T : 1"),
                       ("bad_name", b"X(T): 1"), ("fold", b"X-T: 1\r\n 2")]:
        cases.append((name, TE_HEAD + b"2\r\n{}\r\n0\r\n" + line + b"\r\n\r\n"))
    refused("trailer", cases)


def t_last_chunk_without_crlf():
    """Item 4: a last chunk `0\\r\\n` without the final CRLF, followed by a
    pipelined request: the request line is not a trailer field, so this is
    a framing error (400), not a request whose trailers swallow the next
    one.  Found failing: the first request was forwarded and the next one
    was eaten as trailer lines."""
    cases = [("get", TE_HEAD + b"2\r\n{}\r\n0\r\n"),
             ("ext", TE_HEAD + b"2\r\n{}\r\n0;x=y\r\n"),
             ("after_trailer", TE_HEAD + b"2\r\n{}\r\n0\r\nX-T: 1\r\n")]
    refused("last-chunk", cases)


def t_get_head_with_body():
    """Item 7: GET or HEAD with a body (Content-Length > 0 or chunked) ->
    400.  Found failing: the body was read and silently dropped.  GET with
    Content-Length: 0 stays accepted."""
    cases = [("get_cl", post_head([b"Content-Length: 2"], method=b"GET") + b"{}"),
             ("head_cl", post_head([b"Content-Length: 2"], method=b"HEAD") + b"{}"),
             ("get_chunked", post_head([b"Transfer-Encoding: chunked"], method=b"GET") +
              b"2\r\n{}\r\n0\r\n\r\n"),
             ("head_chunked_empty", post_head([b"Transfer-Encoding: chunked"], method=b"HEAD") +
              b"0\r\n\r\n")]
    refused("get-body", cases)
    f, d = pair("get-cl0")
    i = tid()
    data, _ = send_raw(d.port, b"GET /v1/get-cl0 HTTP/1.1\r\nHost: x\r\nX-Test-Id: " +
                       i.encode() + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                       quiet=3.0)
    resps = split_responses(data)
    check(resps and resps[0][0] == 200, "GET with Content-Length: 0: %r", resps[:1])
    check(f.find(i) is not None, "GET with Content-Length: 0 not forwarded")


def t_underscore_framing_names():
    """Item 8: `Content_Length` and `Transfer_Encoding` (which some servers
    and CGI-style gateways read as Content-Length / Transfer-Encoding) are
    refused as ambiguous.  Found failing: forwarded as ordinary headers,
    the body read by the real framing header only."""
    cases = [("cl", post_head([b"Content_Length: 2"]) + b"{}"),
             ("cl_with_cl", post_head([b"Content-Length: 2", b"Content_Length: 40"]) + b"{}"),
             ("cl_lower", post_head([b"content_length: 2", b"Content-Length: 2"]) + b"{}"),
             ("te", post_head([b"Transfer_Encoding: chunked", b"Content-Length: 2"]) + b"{}"),
             ("te_with_te", post_head([b"Transfer-Encoding: chunked",
                                       b"TRANSFER_ENCODING: chunked"])
              + b"2\r\n{}\r\n0\r\n\r\n")]
    refused("underscore", cases)


def t_too_many_headers():
    """Item 6: more than 128 header fields (what dsgate can forward) -> 431
    and close.  Found failing: fields past the 128th were silently dropped
    on the way to the upstream.  128 fields in all are accepted and every
    one of them (but Host and Content-Length) is forwarded."""
    many = [b"X-H%d: %d" % (k, k) for k in range(127)]
    refused("headers-129", [("129", post_head(many + [b"Content-Length: 2"]) + b"{}"),
                            ("200", post_head([b"X-H%d: %d" % (k, k) for k in range(200)]))],
            want=(431,))
    f, d = pair("headers-128")
    i = tid()
    hs = [b"X-Test-Id: " + i.encode(), b"Connection: close"] + \
         [b"X-H%d: %d" % (k, k) for k in range(125)]      # + Host = 128
    raw = b"GET /v1/many HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in hs) + b"\r\n"
    data, _ = send_raw(d.port, raw, quiet=3.0)
    resps = split_responses(data)
    check(resps and resps[0][0] == 200, "128 header fields: %r", resps[:1])
    e = f.find(i)
    check(e is not None, "128 header fields: not forwarded")
    missing = [k for k in range(125) if e["headers"].get("x-h%d" % k) != str(k)]
    check(not missing, "128 header fields: X-H%r not forwarded", missing[:10])


def t_connection_close_long():
    """Item 5: `close` anywhere in a Connection header of any length (within
    limits.max_headers) closes the connection after the answer; the request
    pipelined behind is neither answered nor forwarded.  Found failing: the
    value was cut at 256 bytes, a `close` after that was lost and the
    pipelined request was served."""
    f, d = pair("connection")
    bad = []
    for name, value in [("close_last", b", ".join(b"x-o%d" % k for k in range(60)) + b", close"),
                        ("close_after_1000", b"x" * 1000 + b", close"),
                        ("close_first", b"close, " + b", ".join(b"x-o%d" % k for k in range(60))),
                        ("close_middle", b", ".join(b"x-o%d" % k for k in range(60)) + b",close," +
                         b"y" * 300),
                        ("second_header", None)]:
        i = tid()
        if value is None:
            conn = b"Connection: keep-alive\r\nConnection: " + b"z" * 400 + b" , close\r\n"
        else:
            conn = b"Connection: " + value + b"\r\n"
        raw = (b"GET /v1/first-" + i.encode() + b" HTTP/1.1\r\nHost: x\r\n" + conn + b"\r\n" +
               smuggled_req(i))
        data, closed = send_raw(d.port, raw, timeout=4.0, quiet=4.0)
        resps = split_responses(data)
        sts = [r[0] for r in resps]
        if sts != [200]:
            bad.append("%s: answers %r (want [200])" % (name, sts))
        elif resps[0][1].get("connection", "").lower() != "close":
            bad.append("%s: answer without Connection: close" % name)
        if not closed:
            bad.append("%s: connection still open" % name)
    smuggled = [e.get("path") for e in f.log() if "smuggled" in (e.get("path") or "")]
    check(not bad, "; ".join(bad))
    check(not smuggled, "pipelined requests reached the upstream: %r", smuggled)


# ==================================================================== 2. the differential suite



def vector_bytes(raw, k):
    return raw.replace(b"@ID@", b"%04d" % k)


def _path(target):
    return target.split("?", 1)[0]


def run_h11(data):
    """What h11 (as a server) accepts in DATA: [(method, path, body)], why it stopped."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    eof = False
    out = []
    cur = None
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as e:
            return out, "refused: %s" % e
        if ev is h11.NEED_DATA:
            if eof:
                return out, "incomplete"
            conn.receive_data(b"")
            eof = True
            continue
        if ev is h11.PAUSED:
            return out, "paused"
        if isinstance(ev, h11.Request):
            cur = [ev.method.decode("latin-1"), _path(ev.target.decode("latin-1")), b""]
        elif isinstance(ev, h11.Data):
            cur[2] += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            out.append(tuple(cur))
            cur = None
            try:
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError as e:
                return out, "local: %s" % e
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return out, "closed"
            conn.start_next_cycle()
        elif isinstance(ev, h11.ConnectionClosed):
            return out, "closed"


def run_node(port, data):
    got, _ = send_raw(port, data, timeout=3.0, quiet=0.4)
    out = []
    why = "closed"
    for st, hs, _ in split_responses(got):
        if st != 200:
            why = "refused: %s %s" % (st, hs.get("x-error", ""))
            break
        j = json.loads(base64.b64decode(hs.get("x-ref", "")))
        out.append((j["method"], _path(j["url"]), base64.b64decode(j["body"])))
    return out, why


def run_dsgate(port, data):
    got, _ = send_raw(port, data, timeout=3.0, quiet=0.5)
    return [r[0] for r in split_responses(got)]


def _norm_text(s):
    return re.sub("\ufffd+", "\ufffd", s)


def dsgate_accepted(entries, k):
    """The fake's /_log entries of vector K: [(method, path, body, body_bytes)]."""
    pre = "/v1/d/%04d/" % k
    out = []
    for e in entries:
        if (e.get("path") or "").startswith(pre):
            out.append((e.get("method"), e.get("path"), e.get("body") or "", e.get("body_bytes")))
    return out


def same_request(dreq, ref):
    m, p, body, nbytes = dreq
    rm, rp, rbody = ref
    return (m == rm and p == rp and nbytes == len(rbody) and
            _norm_text(body) == _norm_text(rbody.decode("utf-8", "replace")))


def judge(dsg, refs):
    """(agree, failure or None, what) for one vector: DSG dsgate's accepted
    requests, REFS {name: (accepted, why)}."""
    fail = None
    for i, dreq in enumerate(dsg):
        accepting = {n: r[0][i] for n, r in refs.items() if i < len(r[0])}
        if not accepting:
            fail = "dsgate accepted request %d (%s %s) that no reference accepted" % (
                i + 1, dreq[0], dreq[1])
            break
        for n, ref in accepting.items():
            if not same_request(dreq, ref):
                fail = "request %d: dsgate forwarded %s %s %r (%s bytes), %s accepted %s %s %r" % (
                    i + 1, dreq[0], dreq[1], dreq[2][:60], dreq[3], n, ref[0], ref[1], ref[2][:60])
                break
        if fail:
            break
    agree = all(len(r[0]) == len(dsg) and all(same_request(d, x) for d, x in zip(dsg, r[0]))
                for r in refs.values())
    return agree, fail


def t_differential():
    """The differential suite over tests/differential/requests.txt (see the
    file's docstring): fails on an accept both references refuse, a
    smuggled request, or a forwarded request that differs from an accepting
    reference's."""
    check(h11 is not None, "python3-h11 is not installed (make deps)")
    vectors = H.load_corpus(CORPUS)
    check(len(vectors) >= 200, "only %d vectors in %s", len(vectors), CORPUS)
    node = NodeRef()
    STARTED.append(node)
    f, d = pair("suite", limits={"max_headers": "16KB"})
    t0 = time.monotonic()

    def one(k):
        raw = vector_bytes(vectors[k][1], k)
        return run_dsgate(d.port, raw), run_node(node.port, raw), run_h11(raw)

    results = {}
    entries = []
    batch = 150                         # the fake's /_log keeps the last 1000 requests
    with concurrent.futures.ThreadPoolExecutor(24) as ex:
        for start in range(0, len(vectors), batch):
            ks = list(range(start, min(start + batch, len(vectors))))
            for k, r in zip(ks, ex.map(one, ks)):
                results[k] = r
            time.sleep(0.2)
            entries += f.log()
            f.reset()
    agree = 0
    fails = []
    disagree = []
    both_refs_agree = 0
    for k, (name, _) in enumerate(vectors):
        statuses, node_r, h11_r = results[k]
        dsg = dsgate_accepted(entries, k)
        refs = {"node": node_r, "h11": h11_r}
        ok, fail = judge(dsg, refs)
        if len(node_r[0]) == len(h11_r[0]) and all(
                a == b for a, b in zip(node_r[0], h11_r[0])):
            both_refs_agree += 1
        line = "%s: dsgate %d accepted (answers %s), node %d (%s), h11 %d (%s)" % (
            name, len(dsg), statuses, len(node_r[0]), node_r[1], len(h11_r[0]), h11_r[1][:60])
        if fail:
            fails.append("%s: %s [%s]" % (name, fail, line))
        if ok:
            agree += 1
        else:
            disagree.append(line)
    verbose = os.environ.get("DIFF_VERBOSE")
    for line in fails:
        note("FAILS %s", line)
    for line in disagree if verbose else disagree[:40]:
        note("differs %s", line)
    if not verbose and len(disagree) > 40:
        note("... %d more (DIFF_VERBOSE=1 prints them all)", len(disagree) - 40)
    note("differential: %d vectors, %d agree, %d disagree (%d failures); the two references "
         "agree with each other on %d; %.1fs", len(vectors), agree, len(disagree), len(fails),
         both_refs_agree, time.monotonic() - t0)
    check(d.alive(), "dsgate died")
    check(not fails, "%d failure(s) (the # FAILS lines): %s", len(fails),
          ", ".join(x.split(":")[0] for x in fails))


# ---------------------------------------------------------------- runner

TESTS = [
    ("chunk_size_junk_400", t_chunk_size_junk),
    ("chunk_bare_lf_400", t_chunk_bare_lf),
    ("trailer_syntax_400", t_trailer_syntax),
    ("last_chunk_without_crlf_400", t_last_chunk_without_crlf),
    ("connection_close_long_value", t_connection_close_long),
    ("too_many_headers_431", t_too_many_headers),
    ("get_head_with_body_400", t_get_head_with_body),
    ("underscore_framing_names_400", t_underscore_framing_names),
    ("differential_node_h11", t_differential),
]


def main():
    return H.main("test_differential", TESTS, started=STARTED,
                  require=[(H.DSGATE, "build/asan/dsgate"), (H.FAKE, "build/fake_upstream")])


if __name__ == "__main__":
    sys.exit(main())
