#!/usr/bin/env python3
"""
test_differential_responses: what dsgate passes on to its client from an
untrusted upstream answer, against what strict readers make of the same
bytes.  The response-side twin of test_differential.py.

Every vector of tests/differential/responses.txt (raw bytes an upstream
sends as its whole answer, then closes; see the file's head) is served by
one harness.ScriptedUpstream to one dsgate (retry.max_attempts 1).  A
client sends TWO requests on one keep-alive connection, twice per vector:
one after the other, and pipelined.  The first request gets the vector (the
upstream closes the connection after it), the second a known good answer
(on a new upstream connection).  The client reads dsgate's bytes with h11
(python3-h11) as its parser: strict framing, strict header bytes.

The same upstream bytes are read by two references:
  - h11 as a client (max_incomplete_event_size 64 KiB, dsgate's head limit):
    accept (status, body), or reject / incomplete;
  - an RFC 9112 reader written here (rfc_read): strict header syntax
    (obs-fold unfolded, a bare LF line end allowed, as RFC 9112 allows a
    recipient), Transfer-Encoding over Content-Length, the transfer codings
    decoded in reverse order (chunked strictly, identity, gzip, deflate;
    any other is undecodable), equal Content-Length duplicates merged,
    204/304 without a body, 1xx skipped (101 refused: nothing asked to
    switch).  It is only asked when h11 does not accept: what "a faithful
    decoding" of an answer h11 refuses means.

Each client answer to the vector must be one of:
  forwarded  a complete answer, the reference's status and exactly its body
             (h11's when h11 accepts, else the RFC reader's; dsgate drops the
             white space before a non-stream body on purpose, so that prefix
             may be missing), exactly one framing header (Content-Length
             equal to the body, or Transfer-Encoding: chunked; none for
             204/304), no hop-by-hop header (Keep-Alive, Upgrade, TE,
             Trailer, Proxy-*, a Connection other than close/keep-alive, a
             field the upstream's Connection named), no header that is not
             one of the upstream's final head fields (or dsgate's own), no
             CTL byte in a header;
  502        dsgate's OpenAI-shaped JSON error, well framed;
  cut        a head and part of the body, then the connection closes: only
             where neither reference reads a complete answer, and what came
             is a prefix of what they decoded before they stopped;
and then the second answer, on the same connection (a new one after a
cut), must be exactly the good one, with nothing after it.  The upstream
must have seen the first request exactly once (no retry).  The upstream
sends each answer's last bytes and its FIN in one segment (harness "fin"),
so that dsgate never picks a closed connection from its pool (it does not
resend a request on its own: with max_attempts 1 that would be a 502 for a
request the upstream never saw; such a run is run again, alone).

dsgate runs in front of the upstream for the whole suite (8 clients at
once); when it dies, it is started again and every run that did not end
cleanly is run again alone, so that the death is pinned on its vector
(which fails, with the sanitizer's summary).

A vector fails when one of its two runs breaks a rule above: dsgate
forwards an answer that is not a faithful decoding (neither reference reads
one, or the bytes differ), forwards bad header bytes or hop-by-hop /
injected headers, or the client connection is desynchronised (a second
answer that is not the good one, bytes after it).  Where dsgate answers 502
to what h11 accepts, that is a disagreement, printed but not a failure
(dsgate is stricter on purpose), as is a faithful decoding of an answer h11
refuses.  A summary line gives the counts.

Run: python3 tests/integration/test_differential_responses.py [test names...]
(needs build/asan/dsgate and python3-h11; RDIFF_VERBOSE=1 prints every
vector's verdicts; RDIFF_ONLY=name,name runs only those vectors).
"""

import concurrent.futures
import gzip
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402

try:
    import h11
except ImportError:                     # a python3 other than Debian's
    sys.path.append("/usr/lib/python3/dist-packages")
    try:
        import h11
    except ImportError:
        h11 = None

CORPUS = os.path.join(H.ROOT, "tests", "differential", "responses.txt")
CHAT = "/v1/chat/completions"
HEAD_LIMIT = 64 * 1024                  # dsgate's response head limit (src/upstream.c)
WS = b" \t\r\n"
GOOD = b'{"id":"second","object":"chat.completion","choices":[]}'
GOOD_ANSWER = {"headers": [("Content-Type", "application/json")], "body": GOOD,
               "action": "close", "fin": True}
# headers dsgate writes itself (names, lower case; and every X-Dsgate-*)
OWN = {b"date", b"server", b"connection", b"content-length", b"transfer-encoding",
       b"x-request-id", b"x-cache"}
HOP = {b"keep-alive", b"upgrade", b"te", b"trailer", b"trailers", b"proxy-connection",
       b"proxy-authenticate", b"proxy-authorization", b"http2-settings"}

STARTED = []


def note(fmt, *args):
    print("# " + (fmt % args if args else fmt), flush=True)


# ---------------------------------------------------------------- the corpus



def show(b, n=160):
    """B as a short printable string for a report."""
    s = repr(bytes(b[:n]))
    return s + ("...(%d bytes)" % len(b) if len(b) > n else "")


# ---------------------------------------------------------------- reference 1: h11

class Verdict:
    """What a reader made of the upstream bytes."""

    def __init__(self, kind, status=None, body=b"", why="", headers=()):
        self.kind = kind            # accept, reject, incomplete
        self.status = status
        self.body = bytes(body)     # whole (accept) or what came before the stop
        self.why = why
        self.headers = list(headers)

    def __repr__(self):
        if self.kind == "accept":
            return "accept %s %d bytes" % (self.status, len(self.body))
        return "%s (%s)" % (self.kind, self.why[:70])


def h11_read(raw):
    c = h11.Connection(h11.CLIENT, max_incomplete_event_size=HEAD_LIMIT)
    c.send(h11.Request(method="POST", target=CHAT,
                       headers=[("Host", "upstream"), ("Content-Length", "2")]))
    c.send(h11.Data(data=b"{}"))
    c.send(h11.EndOfMessage())
    c.receive_data(raw)
    c.receive_data(b"")
    status, hs, body = None, [], b""
    while True:
        try:
            ev = c.next_event()
        except h11.RemoteProtocolError as e:
            kind = "incomplete" if "peer closed" in str(e) else "reject"
            return Verdict(kind, status, body, str(e), hs)
        if isinstance(ev, h11.Response):
            status, hs = ev.status_code, list(ev.headers)
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            return Verdict("accept", status, body, "", hs)
        elif isinstance(ev, h11.ConnectionClosed) or ev is h11.NEED_DATA:
            return Verdict("incomplete", status, body, "closed before an answer", hs)
        elif ev is h11.PAUSED:
            return Verdict("reject", status, body, "paused", hs)


# ---------------------------------------------------------------- reference 2: RFC 9112

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*", re.S)
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_CHUNK = re.compile(rb"([0-9A-Fa-f]+)((?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" +
                    _TOKEN + rb'|"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e'
                    rb'\x80-\xff])*"))?)*)[ \t]*')


class Stop(Exception):
    def __init__(self, kind, why, partial=b""):
        Exception.__init__(self, why)
        self.kind, self.why, self.partial = kind, why, partial


def _line(buf, pos, strict_crlf=False):
    """(line, next pos): a line ends at LF (CRLF, or a bare LF unless
    STRICT_CRLF); a bare CR anywhere is an error."""
    i = buf.find(b"\n", pos)
    if i < 0:
        raise Stop("incomplete", "connection closed in a line")
    line = buf[pos:i]
    if line.endswith(b"\r"):
        line = line[:-1]
    elif strict_crlf:
        raise Stop("reject", "bare LF")
    if b"\r" in line:
        raise Stop("reject", "bare CR")
    return line, i + 1


def _fields(buf, pos, strict_crlf=False):
    """Header (or trailer) fields from POS to the empty line: [(name, value)], pos."""
    out = []
    while True:
        line, pos = _line(buf, pos, strict_crlf)
        if not line:
            return out, pos
        if line[:1] in (b" ", b"\t"):
            if not out or not _VALUE.fullmatch(line):
                raise Stop("reject", "obs-fold without a field before it")
            out[-1] = (out[-1][0], (out[-1][1] + b" " + line.strip(b" \t")).strip(b" \t"))
            continue
        m = _FIELD.fullmatch(line)
        if not m or not _VALUE.fullmatch(m.group(2)):
            raise Stop("reject", "invalid field line %r" % line[:40])
        out.append((m.group(1).lower(), m.group(2)))


def _dechunk(buf, pos, whole):
    """Chunked data from POS: (data, pos after the trailer section).  WHOLE:
    it must end exactly at the end of BUF."""
    data = b""
    while True:
        try:
            line, p = _line(buf, pos, strict_crlf=True)
        except Stop as e:
            raise Stop(e.kind, "chunk size line: " + e.why, data)
        m = _CHUNK.fullmatch(line)
        if not m:
            raise Stop("reject", "bad chunk size line %r" % line[:30], data)
        size = int(m.group(1), 16)
        pos = p
        if size == 0:
            try:
                _, pos = _fields(buf, pos, strict_crlf=True)
            except Stop as e:
                raise Stop(e.kind, "trailer section: " + e.why, data)
            if whole and pos != len(buf):
                raise Stop("reject", "bytes after the last chunk", data)
            return data, pos
        if len(buf) - pos < size:
            raise Stop("incomplete", "connection closed in a chunk", data + buf[pos:])
        data += buf[pos:pos + size]
        pos += size
        if buf[pos:pos + 2] != b"\r\n":
            if len(buf) - pos < 2 and b"\r\n".startswith(buf[pos:]):
                raise Stop("incomplete", "connection closed after a chunk", data)
            raise Stop("reject", "no CRLF after chunk data", data)
        pos += 2


def _codings(fields):
    out = []
    for n, v in fields:
        if n == b"transfer-encoding":
            for t in v.split(b","):
                t = t.strip(b" \t").lower()
                if t:
                    out.append(t)
    return out


def rfc_read(raw):
    try:
        return _rfc_read(raw)
    except Stop as e:
        return Verdict(e.kind, None, e.partial, e.why)


def _rfc_read(raw):
    pos = 0
    while True:
        line, pos = _line(raw, pos)
        m = _STATUS.fullmatch(line)
        if not m:
            raise Stop("reject", "invalid status line %r" % line[:40])
        status = int(m.group(1))
        fields, pos = _fields(raw, pos)
        if status == 101:
            raise Stop("reject", "101 without an upgrade asked for")
        if status >= 200:
            break
    if status in (204, 304):
        return Verdict("accept", status, b"", "", fields)
    te = _codings(fields)
    try:
        if te:
            if te.count(b"chunked") > 1 or any(b";" in t for t in te if t.startswith(b"chunked")):
                raise Stop("reject", "chunked more than once, or with parameters")
            if te[-1] == b"chunked":
                data, _ = _dechunk(raw, pos, whole=False)
                te = te[:-1]
            else:
                data = raw[pos:]          # the connection's close ends it
            for t in reversed(te):
                if t == b"chunked":
                    data, _ = _dechunk(data, 0, whole=True)
                elif t == b"identity":
                    pass
                elif t in (b"gzip", b"x-gzip"):
                    data = gzip.decompress(data)
                elif t == b"deflate":
                    data = zlib.decompress(data)
                else:
                    raise Stop("reject", "transfer coding %r" % t)
            return Verdict("accept", status, data, "", fields)
        cls = [v for n, v in fields if n == b"content-length"]
        if cls:
            vals = {x.strip(b" \t") for v in cls for x in v.split(b",")}
            if len(vals) != 1 or not re.fullmatch(rb"[0-9]+", next(iter(vals))):
                raise Stop("reject", "Content-Length %r" % cls)
            n = int(next(iter(vals)))
            if len(raw) - pos < n:
                raise Stop("incomplete", "closed %d bytes short" % (n - len(raw) + pos),
                           raw[pos:])
            return Verdict("accept", status, raw[pos:pos + n], "", fields)
        return Verdict("accept", status, raw[pos:], "", fields)
    except Stop as e:
        raise Stop(e.kind, e.why, e.partial)
    except (OSError, EOFError, zlib.error) as e:
        raise Stop("reject", "coding: %s" % e)


def upstream_final_fields(raw):
    """The fields of the upstream's final head, read leniently (names lower
    case, values stripped, obs-fold joined): what dsgate may pass on."""
    out = []
    heads = re.split(rb"\r?\n\r?\n", raw)
    for h in heads:
        lines = re.split(rb"\r?\n", h)
        m = re.match(rb"HTTP/\S* ([0-9]{3})", lines[0])
        fields = []
        for ln in lines[1:]:
            if ln[:1] in (b" ", b"\t") and fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + b" " + ln.strip(b" \t"))
                continue
            n, c, v = ln.partition(b":")
            if c:
                fields.append((n.strip(b" \t").lower(), v.strip(b" \t")))
        out = fields
        if not m or not m.group(1).startswith(b"1"):
            break
    return out


def connection_listed(fields):
    out = set()
    for n, v in fields:
        if n == b"connection":
            for t in re.split(rb"[ \t,]+", v.lower()):
                if t and t not in (b"close", b"keep-alive"):
                    out.add(t)
    return out


# ---------------------------------------------------------------- the client

class Answer:
    def __init__(self):
        self.kind = None            # complete, cut, garbled, timeout, none
        self.status = None
        self.headers = []           # [(name lower, value)]
        self.interim = []
        self.body = b""
        self.why = ""

    def header_all(self, name):
        return [v for n, v in self.headers if n == name]

    def __repr__(self):
        if self.kind == "complete":
            return "%s %s" % (self.status, show(self.body, 80))
        return "%s (%s) status %s body %s" % (self.kind, self.why[:60], self.status,
                                             show(self.body, 60))


class Client:
    """One client connection to dsgate, read with h11."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.c = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 21)
        self.raw = bytearray()
        self.timeout = timeout
        self.eof = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    @staticmethod
    def request_events(content, close):
        body = json.dumps({"model": "deepseek-chat",
                           "messages": [{"role": "user", "content": content}]}).encode()
        hs = [("Host", "dsgate"), ("Content-Type", "application/json"),
              ("Content-Length", str(len(body)))]
        if close:
            hs.append(("Connection", "close"))
        return [h11.Request(method="POST", target=CHAT, headers=hs), h11.Data(data=body),
                h11.EndOfMessage()]

    def advance(self, events):
        """Bytes of EVENTS, and h11's client state moved past them."""
        return b"".join(self.c.send(e) or b"" for e in events)

    def send(self, data):
        self.sock.sendall(data)

    def _recv(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        self.sock.settimeout(left)
        try:
            d = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            d = b""
        if not d:
            self.eof = True
        self.raw += d
        return d

    def read_answer(self):
        a = Answer()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                ev = self.c.next_event()
            except h11.RemoteProtocolError as e:
                a.why = str(e)
                a.kind = "cut" if a.status is not None and "peer closed" in a.why else "garbled"
                return a
            if ev is h11.NEED_DATA:
                try:
                    self.c.receive_data(self._recv(deadline))
                except socket.timeout:
                    a.kind, a.why = "timeout", "no answer within %.0fs" % self.timeout
                    return a
                continue
            if isinstance(ev, h11.InformationalResponse):
                a.interim.append(ev.status_code)
            elif isinstance(ev, h11.Response):
                a.status = ev.status_code
                a.headers = [(bytes(n), bytes(v)) for n, v in ev.headers]
            elif isinstance(ev, h11.Data):
                a.body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                a.kind = "complete"
                return a
            elif isinstance(ev, h11.ConnectionClosed):
                a.kind, a.why = "none", "connection closed"
                return a
            else:
                a.kind, a.why = "garbled", "h11 event %r" % ev
                return a

    def rest(self, quiet=3.0):
        """Bytes after the last answer until EOF; (bytes, closed)."""
        got = bytes(self.c.trailing_data[0])
        deadline = time.monotonic() + quiet
        while not self.eof:
            try:
                got += self._recv(deadline)
            except socket.timeout:
                return got, False
        return got, True


class Run:
    """One vector, one mode: what the client got."""

    def __init__(self):
        self.a1 = None
        self.a2 = None
        self.a2_new_conn = False
        self.rest = b""
        self.closed = True
        self.raw = b""
        self.err = None


def exchange(port, tag, pipelined):
    r = Run()
    ev1 = Client.request_events("rdiff %s 1" % tag, close=False)
    ev2 = Client.request_events("rdiff %s 2" % tag, close=True)
    try:
        c = Client(port)
    except OSError as e:
        r.err = "connect: %s" % e
        return r
    try:
        b1 = c.advance(ev1)
        b2 = h11.Connection(h11.CLIENT)
        b2 = b"".join(b2.send(e) or b"" for e in ev2)
        c.send(b1 + b2 if pipelined else b1)
        r.a1 = c.read_answer()
        if r.a1.kind == "complete" and c.c.their_state is h11.DONE and \
                c.c.our_state is h11.DONE:
            c.c.start_next_cycle()
            c.advance(ev2)
            if not pipelined:
                c.send(b2)
            r.a2 = c.read_answer()
            if r.a2.kind == "complete":
                r.rest, r.closed = c.rest()
        r.raw = bytes(c.raw)
    except OSError as e:
        r.err = "%s: %s" % (type(e).__name__, e)
        r.raw = bytes(c.raw)
    finally:
        c.close()
    if r.a2 is None and r.a1 is not None and r.a1.kind != "complete":
        # the first answer ended the connection: the good one on a new connection
        r.a2_new_conn = True
        try:
            c = Client(port)
        except OSError as e:
            r.err = "second connection: %s" % e
            return r
        try:
            c.send(c.advance(ev2))
            r.a2 = c.read_answer()
            if r.a2.kind == "complete":
                r.rest, r.closed = c.rest()
        except OSError as e:
            r.err = "second connection: %s: %s" % (type(e).__name__, e)
        finally:
            c.close()
    return r


# ---------------------------------------------------------------- judging

def is_502(a):
    if a.kind != "complete" or a.status != 502:
        return False
    try:
        e = json.loads(a.body).get("error")
    except (ValueError, AttributeError):
        return False
    ct = b"".join(a.header_all(b"content-type")).lower()
    return (isinstance(e, dict) and all(k in e for k in ("message", "type", "code")) and
            b"application/json" in ct)


def own(name):
    return name in OWN or name.startswith(b"x-dsgate-")


def header_problems(a, up_fields, forwarded):
    """What is wrong in the head of dsgate's answer A."""
    bad = []
    cl, te = a.header_all(b"content-length"), a.header_all(b"transfer-encoding")
    if a.status in (204, 304):
        if te or a.body:
            bad.append("%d with a body or Transfer-Encoding %r" % (a.status, te))
    elif len(cl) + len(te) != 1:
        bad.append("framed by Content-Length %r + Transfer-Encoding %r" % (cl, te))
    elif te and te[0].lower() != b"chunked":
        bad.append("Transfer-Encoding %r" % te[0])
    elif cl and cl[0] != str(len(a.body)).encode():
        bad.append("Content-Length %r for %d bytes" % (cl[0], len(a.body)))
    listed = connection_listed(up_fields)
    up = set(up_fields)
    for n, v in a.headers:
        if re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", n + v):
            bad.append("CTL byte in %r: %r" % (n, v[:60]))
        if n in HOP or n.startswith(b"proxy-"):
            bad.append("hop-by-hop %s: %r" % (n.decode("latin-1"), v[:60]))
        elif n == b"connection":
            if any(t not in (b"close", b"keep-alive") for t in re.split(rb"[ \t,]+", v.lower())
                   if t):
                bad.append("Connection: %r" % v[:60])
        elif n in listed and not own(n) and (n, v) in up:
            bad.append("%s (named by the upstream's Connection) forwarded: %r"
                       % (n.decode("latin-1"), v[:60]))
        elif forwarded and not own(n) and (n, v) not in up:
            bad.append("header %s: %r is none of the upstream's fields"
                       % (n.decode("latin-1"), v[:60]))
        elif not forwarded and not own(n) and n != b"content-type" and (n, v) in up:
            bad.append("the upstream's %s went out with the 502" % n.decode("latin-1"))
    return bad


def faithful(body, want):
    return body == want or body == want.lstrip(WS)


def transport_only(r):
    """Did the run fail only by 502s of a dead pooled connection (upstream_reset,
    upstream_unreachable), every other answer being whole?"""
    seen = False
    for a in (r.a1, r.a2):
        if a is None:
            return False
        if a.kind == "complete" and is_502(a) and (b"upstream_reset" in a.body or
                                                   b"upstream_unreachable" in a.body or
                                                   b"upstream connection broke" in a.body):
            seen = True
        elif a.kind != "complete":
            return False
    return seen


def judge_run(name, raw, hv, rv, r, up_count):
    """(outcome, failure or None) for one run: outcome forwarded / 502 / cut / broken."""
    return _judge_run(name, raw, hv, rv, r, up_count)


def _judge_run(name, raw, hv, rv, r, up_count):
    up_fields = upstream_final_fields(raw)
    a1, fail = r.a1, None
    ref = hv if hv.kind == "accept" else rv if rv.kind == "accept" else None
    if r.err and (a1 is None or a1.kind != "cut"):
        fail = r.err
    if a1 is None:
        return "broken", fail or "no first answer"
    if up_count != 1:
        fail = fail or "the first request reached the upstream %d times" % up_count
    if a1.kind == "complete" and is_502(a1):
        outcome = "502"
        bad = header_problems(a1, up_fields, forwarded=False)
        if bad:
            fail = fail or "502 head: " + "; ".join(bad)
    elif a1.kind == "complete":
        outcome = "forwarded"
        bad = header_problems(a1, up_fields, forwarded=True)
        if ref is None:
            fail = fail or ("forwarded %s %s though h11 (%r) and the RFC reader (%r) read no "
                            "answer" % (a1.status, show(a1.body, 80), hv, rv))
        elif a1.status != ref.status or not faithful(a1.body, ref.body):
            fail = fail or ("forwarded %s %s, the %s reader decoded %s %s" % (
                a1.status, show(a1.body, 80), "h11" if ref is hv else "RFC", ref.status,
                show(ref.body, 80)))
        if bad:
            fail = fail or "forwarded head: " + "; ".join(bad)
    elif a1.kind == "cut":
        outcome = "cut"
        partial = [v.body for v in (hv, rv) if v.kind != "accept"]
        if ref is not None:
            fail = fail or ("cut after %s though %s reads a whole answer (%s %s)" % (
                show(a1.body, 60), "h11" if ref is hv else "the RFC reader", ref.status,
                show(ref.body, 60)))
        elif not any(p.startswith(a1.body) or p.lstrip(WS).startswith(a1.body)
                     for p in partial):
            fail = fail or "cut answer %s is no prefix of what the readers decoded" % show(
                a1.body, 80)
        bad = header_problems(a1, up_fields, forwarded=True)
        bad = [b for b in bad if not b.startswith("Content-Length")]
        if bad:
            fail = fail or "cut answer's head: " + "; ".join(bad)
    else:
        outcome = "broken"
        fail = fail or "first answer %r; client bytes %s" % (a1, show(r.raw, 200))
    a2 = r.a2
    if fail is None:
        if a2 is None:
            fail = "no second answer (first %r, client bytes %s)" % (a1, show(r.raw, 200))
        elif a2.kind != "complete" or a2.status != 200 or a2.body != GOOD:
            fail = "desync: second answer %r (first %r; client bytes %s)" % (
                a2, a1, show(r.raw, 240))
        elif header_problems(a2, [], forwarded=False):
            fail = "second answer's head: %s" % header_problems(a2, [], False)
        elif r.rest:
            fail = "desync: bytes after the second answer: %s" % show(r.rest, 200)
        elif not r.closed:
            fail = "the connection stayed open after Connection: close"
    return outcome, fail


# ---------------------------------------------------------------- the suite

class Gate:
    """The suite's dsgate in front of its ScriptedUpstream: restarted when it
    dies (the runs in flight then are attributed one at a time)."""

    def __init__(self, up):
        self.up = up
        self.d = None
        self.dead = []              # (log path, first sanitizer line)

    def ensure(self):
        if self.d is not None and self.d.alive():
            return self.d
        if self.d is not None:
            self.dead.append((self.d.log_path, self.d.crash_summary()))
            self.d.stop(2.0)
            STARTED.remove(self.d)
        self.d = H.Dsgate(upstream_url=self.up.url, retry_attempts=1, tag="rdiff",
                          timeouts={"first_data": "10s", "idle": "10s", "body": "10s"})
        STARTED.append(self.d)
        # one good exchange first: the state a long-running dsgate is in (an
        # easy handle already used once, a pooled connection closed)
        exchange(self.d.port, "warm-%s" % uuid.uuid4().hex[:8], False)
        return self.d


def _raced(r, counts, tag):
    """A run spoilt by the harness rather than by its vector: a 502 for a
    request that never reached the upstream (a pooled connection the
    upstream had just closed, which dsgate does not resend on its own)."""
    for a, n in ((r.a1, "1"), (r.a2, "2")):
        if a is not None and a.kind == "complete" and a.status == 502 and \
                counts.get((tag, n), 0) == 0:
            return True
    return False


def t_differential_responses():
    """Every vector of tests/differential/responses.txt through dsgate, two
    requests on one client connection, sequential and pipelined (see the
    docstring): fails on an unfaithful forward, bad or hop-by-hop header
    bytes going out, a desynchronised client connection, a retry, or a
    dsgate that dies on a vector."""
    check(h11 is not None, "python3-h11 is not installed (make deps)")
    vectors = H.load_corpus(CORPUS)
    check(len(vectors) >= 120, "only %d vectors in %s", len(vectors), CORPUS)
    only = [x for x in os.environ.get("RDIFF_ONLY", "").split(",") if x]
    if only:
        vectors = [v for v in vectors if v[0] in only]
    by_tag = {}
    counts = {}
    lock = threading.Lock()

    def script(req):
        try:
            _, tag, n = json.loads(req.body)["messages"][0]["content"].split(" ")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return dict(GOOD_ANSWER)
        with lock:
            counts[(tag, n)] = counts.get((tag, n), 0) + 1
            raw = by_tag.get(tag) if n == "1" else None
        if raw is not None:
            return {"raw": raw, "action": "close", "fin": True}
        return dict(GOOD_ANSWER)

    up = H.ScriptedUpstream(script, io_timeout=5.0)
    STARTED.append(up)
    gate = Gate(up)
    run_id = uuid.uuid4().hex[:6]
    seq = [0]

    def one(k, mode):
        with lock:
            seq[0] += 1
            tag = "%s-%d-%s-%d" % (run_id, k, mode, seq[0])
            by_tag[tag] = vectors[k][1]
        return exchange(gate.d.port, tag, mode == "pipe"), tag

    jobs = [(k, mode) for k in range(len(vectors)) for mode in ("seq", "pipe")]
    t0 = time.monotonic()
    results = {}
    crashed = {}                    # (k, mode) -> the dsgate log it died in
    reruns = []
    gate.ensure()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        futs = {ex.submit(one, k, mode): (k, mode) for k, mode in jobs}
        for f in concurrent.futures.as_completed(futs):
            results[futs[f]] = f.result()
    refs = [(h11_read(raw), rfc_read(raw)) for _, raw in vectors]

    def failed(j):
        r, tag = results[j]
        hv, rv = refs[j[0]]
        return (_raced(r, counts, tag) or
                judge_run(vectors[j[0]][0], vectors[j[0]][1], hv, rv, r,
                          counts.get((tag, "1"), 0))[1] is not None)

    # every run that failed (or died with dsgate) is run again alone, on a
    # live dsgate: a death is pinned on its vector, and a run that fails
    # only among others is interference between transfers (reported too)
    died = not gate.d.alive()       # then the failures among others say nothing
    pending = [j for j in jobs if died or failed(j)]
    first_fail = {j: results[j] for j in pending}
    interference = []
    for j in pending:
        for attempt in range(3):
            d = gate.ensure()
            r, tag = one(*j)
            time.sleep(0.05)
            results[j] = (r, tag)
            if not d.alive():
                crashed[j] = d.log_path
                break
            if not _raced(r, counts, tag):
                break
            reruns.append("%s/%s" % (vectors[j[0]][0], j[1]))
        if not died and j not in crashed and not failed(j) and gate.d.alive():
            old, _ = first_fail[j]
            line = "%s/%s (among the others: first %r, second %r)" % (
                vectors[j[0]][0], j[1], old.a1, old.a2)
            if transport_only(old):
                # a pooled upstream connection that another vector's upstream closed died
                # under this request: with retry.max_attempts 1 that is a counted 502
                # (dsgate never resends on its own), not a framing fault
                note("POOL %s", line)
            else:
                interference.append(line)
    dt = time.monotonic() - t0
    stats = {"forwarded": 0, "502": 0, "cut": 0, "broken": 0}
    agree = 0
    fails, differs, lines = [], [], []
    h11_acc = rfc_acc = 0
    for k, (name, raw) in enumerate(vectors):
        hv, rv = refs[k]
        h11_acc += hv.kind == "accept"
        rfc_acc += rv.kind == "accept"
        outs = []
        for mode in ("seq", "pipe"):
            r, tag = results[(k, mode)]
            if (k, mode) in crashed:
                outcome = "broken"
                fail = "dsgate died on this vector (first answer %r, client bytes %s); log %s" % (
                    r.a1, show(r.raw, 120), crashed[(k, mode)])
            else:
                outcome, fail = judge_run(name, raw, hv, rv, r, counts.get((tag, "1"), 0))
            stats[outcome] += 1
            outs.append(outcome)
            if fail:
                fails.append("%s [%s]: %s" % (name, mode, fail))
        line = "%s: h11 %r, RFC reader %r, dsgate %s" % (name, hv, rv,
                                                        "/".join(sorted(set(outs))))
        lines.append(line)
        if all((o == "forwarded") == (hv.kind == "accept") for o in outs):
            agree += 1
        else:
            differs.append(line)
    if os.environ.get("RDIFF_VERBOSE"):
        for line in lines:
            note("vector %s", line)
    for line in fails:
        note("FAILS %s", line)
    for line in differs:
        note("differs %s", line)
    for log, summary in gate.dead:
        note("dsgate died: %s (log %s)", summary, log)
    if reruns:
        note("%d run(s) spoilt by a closed pooled connection, run again: %s", len(reruns),
             ", ".join(reruns[:20]))
    for line in interference:
        note("INTERFERENCE %s", line)
    note("response differential: %d vectors (%d runs: %d forwarded, %d 502, %d cut, %d broken); "
         "h11 accepts %d, the RFC reader %d; dsgate agrees with h11 on %d vectors, differs on "
         "%d; %d failing run(s), %d dsgate death(s), %d run(s) broken only among others; %.1fs",
         len(vectors), len(jobs),
         stats["forwarded"], stats["502"], stats["cut"], stats["broken"], h11_acc, rfc_acc,
         agree, len(differs), len(fails), len(gate.dead) + (not gate.d.alive()),
         len(interference), dt)
    check(gate.d.alive(), "dsgate died; log %s", gate.d.log_path)
    # runs that failed only among others and passed alone are reported (# INTERFERENCE)
    # for a look, not failed: the verdict on a vector is its run alone
    check(not fails and not gate.dead,
          "%d failing run(s) (the # FAILS lines): %s; dsgate died %d time(s); %d run(s) "
          "broken only while other vectors were in flight (# INTERFERENCE)", len(fails),
          ", ".join(sorted({x.split(" ")[0] for x in fails})), len(gate.dead),
          len(interference))


def t_references_self_check():
    """The two references on answers whose verdict is known, so that a
    reader bug does not pass for a dsgate one."""
    check(h11 is not None, "python3-h11 is not installed (make deps)")
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    ch = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    cases = [
        (ok, "accept", b"{}", "accept", b"{}"),
        (ch, "accept", b"{}", "accept", b"{}"),
        (ch.replace(b"chunked", b"gzip, chunked"), "reject", None, "reject", None),
        (ch.replace(b"chunked", b"identity, chunked"), "reject", None, "accept", b"{}"),
        (ok.replace(b"2\r\n\r\n", b"2\r\nContent-Length: 3\r\n\r\n"), "reject", None,
         "reject", None),
        (ok.replace(b"2\r\n\r\n", b"9\r\n\r\n"), "incomplete", None, "incomplete", None),
        (ch[:-5], "incomplete", None, "incomplete", None),
        (ok.replace(b"OK\r\n", b"OK\r\nX: a\rb\r\n"), "reject", None, "reject", None),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "reject", None, "reject", None),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok, "accept", b"{}",
         "accept", b"{}"),
    ]
    bad = []
    for raw, hk, hb, rk, rb in cases:
        hv, rv = h11_read(raw), rfc_read(raw)
        if hv.kind != hk or (hb is not None and hv.body != hb):
            bad.append("h11 %r on %r (want %s)" % (hv, raw[:60], hk))
        if rv.kind != rk or (rb is not None and rv.body != rb):
            bad.append("RFC reader %r on %r (want %s)" % (rv, raw[:60], rk))
    check(not bad, "; ".join(bad))


TESTS = [
    ("references_self_check", t_references_self_check),
    ("differential_responses", t_differential_responses),
]


def main():
    return H.main("test_differential_responses", TESTS, started=STARTED,
                  require=[(H.DSGATE, "build/asan/dsgate")])


if __name__ == "__main__":
    sys.exit(main())
