#!/usr/bin/env python3
"""Checks the busy-DeepSeek modes of build/fake_upstream (tests/fake/README.md):
--hold / --capacity / --hold-max-ms / --hold-keepalive-ms, POST /_config,
--account-limit, X-Fake-First-Token-Ms, X-Fake-Hold-Close-Ms,
X-Fake-Reset-Reused.  Standard library only; timings with generous
tolerances.  Usage: python3 tests/fake/check_hold.py [path/to/fake_upstream]
"""
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "fake_upstream")
TOL = 0.35          # seconds of slack on every timing


class Fake:
    def __init__(self, *args):
        self.p = subprocess.Popen([FAKE, "--quiet", *args], stdout=subprocess.PIPE)
        line = self.p.stdout.readline().decode()
        assert line.startswith("READY "), line
        self.port = int(line.split()[1])

    def stop(self):
        self.p.terminate()
        assert self.p.wait(5) == 0

    def call(self, method, path, body=b"", headers=None):
        """One request on a fresh connection; (status, headers, body)."""
        r = Resp(self.port, method, path, body, headers)
        r.read_all()
        return r

    def get(self, path):
        return json.loads(self.call("GET", path).body)

    def config(self, **kw):
        r = self.call("POST", "/_config", json.dumps(kw).encode())
        assert r.status == 200 and json.loads(r.body) == {"ok": True}, (r.status, r.body)


def chat(stream=False, text="hello"):
    return json.dumps({"model": "deepseek-chat", "stream": stream,
                       "messages": [{"role": "user", "content": text}]}).encode()


def request_bytes(method, path, body, headers, port):
    h = {"Host": "127.0.0.1:%d" % port, "Content-Length": str(len(body)),
         "Content-Type": "application/json"}
    h.update(headers or {})
    head = "%s %s HTTP/1.1\r\n" % (method, path)
    head += "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
    return head.encode() + body


class Resp:
    """A response read by hand, with the time every piece arrived."""

    def __init__(self, port, method, path, body=b"", headers=None, sock=None):
        self.t0 = time.monotonic()
        self.s = sock or socket.create_connection(("127.0.0.1", port))
        self.s.sendall(request_bytes(method, path, body, headers, port))
        self.buf = b""
        self.t_last = 0.0       # when the bytes at the end of buf arrived
        self.status = None
        self.headers = {}
        self.chunks = []        # (seconds since the request, bytes)
        self.ended = False      # terminating chunk (or all of Content-Length) seen
        self.eof = False
        self.reset = False
        self.body = b""
        # a reader thread stamps every piece as it arrives
        self.q = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        s = self.s
        while True:
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                self.q.put((time.monotonic() - self.t0, None, True))
                return
            except OSError:
                d = b""
            self.q.put((time.monotonic() - self.t0, d, False))
            if not d:
                return

    def _more(self):
        if self.eof:
            return False
        t, d, rst = self.q.get(timeout=15)
        if not d:
            self.eof = True
            self.t_eof = t
            self.reset = rst
            return False
        self.buf += d
        self.t_last = t
        return True

    def read_head(self):
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                return False
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.t_head = self.t_last
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for l in lines[1:]:
            k, v = l.split(":", 1)
            self.headers[k.strip().lower()] = v.strip()
        return True

    def next_chunk(self):
        """The next chunk of a chunked body: bytes, b"" at the end, None at EOF."""
        while b"\r\n" not in self.buf:
            if not self._more():
                return None
        size_line, rest = self.buf.split(b"\r\n", 1)
        n = int(size_line.split(b";")[0], 16)
        while len(rest) < n + 2:
            if not self._more():
                return None
            size_line, rest = self.buf.split(b"\r\n", 1)
        data, self.buf = rest[:n], rest[n + 2:]
        if n == 0:
            self.ended = True
            return b""
        self.chunks.append((self.t_last, data))
        return data

    def read_all(self):
        if self.status is None and not self.read_head():
            return self
        if self.headers.get("transfer-encoding") == "chunked":
            while True:
                c = self.next_chunk()
                if not c:
                    break
            self.body = b"".join(d for _, d in self.chunks)
        elif "content-length" in self.headers:
            n = int(self.headers["content-length"])
            while len(self.buf) < n and self._more():
                pass
            self.body, self.buf = self.buf[:n], self.buf[n:]
            self.ended = len(self.body) == n
        self.close()
        return self

    def close(self):
        try:
            self.s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.s.close()

    def keepalives(self):
        return [t for t, d in self.chunks if d in (b": keep-alive\n\n", b"\n")]

    def data(self):
        return [(t, d) for t, d in self.chunks if d not in (b": keep-alive\n\n", b"\n")]


def near(got, want, what, tol=TOL):
    assert want - tol <= got <= want + tol, "%s: %.3f s, want %.3f +- %.2f" % (what, got, want, tol)


def log_entry(fake, test_id):
    es = [e for e in fake.get("/_log") if e["headers"].get("x-test-id") == test_id]
    assert len(es) == 1, (test_id, es)
    return es[0]


def in_thread(fn, *a):
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", fn(*a)))
    th.start()
    return th, out


def check_hold_stream_and_plain():
    f = Fake("--hold", "--capacity", "1", "--hold-keepalive-ms", "200")
    try:
        a = Resp(f.port, "POST", "/v1/chat/completions", chat(),
                 {"X-Fake-Delay-Ms": "1500", "X-Test-Id": "A"})
        time.sleep(0.1)
        b = Resp(f.port, "POST", "/v1/chat/completions", chat(True, "held stream"),
                 {"X-Fake-Delay-Ms": "300", "X-Test-Id": "B"})
        time.sleep(0.05)
        c = Resp(f.port, "POST", "/v1/chat/completions", chat(False, "held plain"),
                 {"X-Test-Id": "C"})
        assert b.read_head() and c.read_head()
        assert b.status == 200 and c.status == 200
        assert b.t_head < 0.2 and c.t_head < 0.2, (b.t_head, c.t_head)
        assert b.headers["content-type"] == "text/event-stream; charset=utf-8", b.headers
        assert b.headers["transfer-encoding"] == "chunked"
        assert c.headers["content-type"] == "application/json", c.headers
        assert c.headers["transfer-encoding"] == "chunked"
        time.sleep(0.5)
        st = f.get("/_stats")
        assert st["held"] == 2 and st["inflight"] == 3 and st["held_total"] == 2, st
        assert log_entry(f, "B")["held_ms"] is None        # still held
        a.read_all()
        assert a.status == 200 and "content-length" in a.headers
        b.read_all()
        c.read_all()
        # B: keep-alives every 200 ms while held (1.4 s) and during its 300 ms
        ka = b.keepalives()
        assert all(d == b": keep-alive\n\n" for t, d in b.chunks if t < 1.5), b.chunks[:3]
        assert 6 <= len(ka) <= 9, ka
        near(ka[0], 0.2, "first keep-alive")
        data = b.data()
        near(data[0][0], 1.5 + 0.3, "first data event after the slot + delay")
        assert data[0][1].startswith(b"data: {"), data[0]
        assert data[-1][1] == b"data: [DONE]\n\n" and b.ended
        text = "".join(json.loads(d[6:])["choices"][0]["delta"].get("content") or ""
                       for _, d in data[:-1])
        assert text == "echo: held stream", text
        # C waited for B (FIFO): admitted when B ended, answered at once
        assert set(d for _, d in c.chunks[:-1]) == {b"\n"}, c.chunks
        near(c.chunks[-1][0], 1.8, "plain body after B")
        body = json.loads(c.chunks[-1][1])
        assert body["choices"][0]["message"]["content"] == "echo: held plain" and c.ended
        eb, ec = log_entry(f, "B"), log_entry(f, "C")
        near(eb["held_ms"] / 1000, 1.4, "B held_ms")
        near(ec["held_ms"] / 1000, 1.75, "C held_ms")
        assert eb["status"] == 200 and ec["status"] == 200 and log_entry(f, "A")["held_ms"] is None
        st = f.get("/_stats")
        assert st["held"] == 0 and st["held_total"] == 2 and st["hold_closed"] == 0, st
        assert st["completed"] == 3 and st["inflight"] == 0, st
    finally:
        f.stop()
    print("ok hold: stream + non-stream held, keep-alives, served after the slot, FIFO")


def check_fifo_leave_and_max():
    f = Fake("--hold", "--capacity", "1", "--hold-max-ms", "1200", "--hold-keepalive-ms", "300")
    try:
        a = Resp(f.port, "POST", "/v1/chat/completions", chat(), {"X-Fake-Delay-Ms": "800"})
        time.sleep(0.05)
        held = []
        for name in "BCD":
            held.append(Resp(f.port, "POST", "/v1/chat/completions", chat(),
                             {"X-Fake-Delay-Ms": "200", "X-Test-Id": name}))
            time.sleep(0.05)
        for r in held:
            assert r.read_head() and r.status == 200
        # C leaves while held
        time.sleep(0.2)
        held[1].close()
        time.sleep(0.2)
        st = f.get("/_stats")
        assert st["held"] == 2 and st["client_closed"] == 1, st
        a.read_all()
        b, d = held[0].read_all(), held[2].read_all()
        # B admitted at 0.8 s, done at 1.0; D (C gone) admitted at 1.0, done 1.2
        near(b.chunks[-1][0], 1.0 - 0.05, "B answer")
        assert d.ended and json.loads(d.chunks[-1][1])["object"] == "chat.completion"
        near(d.chunks[-1][0], 1.2 - 0.15, "D answer")
        ec = log_entry(f, "C")
        assert ec["client_closed"] and ec["status"] == 200 and ec["held_ms"] is not None, ec
        near(ec["held_ms"] / 1000, 0.45, "C held_ms")
        st = f.get("/_stats")
        assert st["held"] == 0 and st["held_total"] == 3, st

        # --hold-max-ms: held too long -> closed after the keep-alives, no terminating chunk
        a = Resp(f.port, "POST", "/v1/chat/completions", chat(), {"X-Fake-Delay-Ms": "2500"})
        time.sleep(0.05)
        e = Resp(f.port, "POST", "/v1/chat/completions", chat(True), {"X-Test-Id": "E"})
        e.read_all()
        assert e.status == 200 and e.eof and not e.ended, (e.eof, e.ended)
        assert e.data() == [] and len(e.keepalives()) == 3, e.chunks   # 0.3 0.6 0.9, close at 1.2
        near(e.t_eof, 1.2, "hold-max close")
        ee = log_entry(f, "E")
        assert ee["status"] is None and not ee["client_closed"] and ee["t_end_ms"] is not None
        near(ee["held_ms"] / 1000, 1.2, "E held_ms")
        st = f.get("/_stats")
        assert st["hold_closed"] == 1 and st["held"] == 0, st
        a.read_all()
        assert a.status == 200
    finally:
        f.stop()
    print("ok hold: FIFO order, a client leaving while held, --hold-max-ms close")


def check_config():
    f = Fake("--hold", "--capacity", "1", "--hold-keepalive-ms", "5000")
    try:
        cfg = f.get("/_config")
        assert cfg == {"capacity": 1, "hold": True, "hold_max_ms": 600000,
                       "hold_keepalive_ms": 5000, "latency_ms": 0, "account_limit": 0,
                       "fail_next": 0, "fail_status": 503, "anthropic_done": False}, cfg
        a = Resp(f.port, "POST", "/v1/chat/completions", chat(), {"X-Fake-Delay-Ms": "2000"})
        time.sleep(0.05)
        b = Resp(f.port, "POST", "/v1/chat/completions", chat(True), {"X-Test-Id": "B"})
        assert b.read_head() and b.status == 200
        time.sleep(0.3)
        t = time.monotonic()
        f.config(capacity=2)                               # raising: B admitted at once
        b.read_all()
        near(b.data()[0][0] + b.t0 - t, 0.0, "B admitted on /_config", 0.2)
        assert b.ended
        # lowering does not kill the running ones
        b2 = Resp(f.port, "POST", "/v1/chat/completions", chat(), {"X-Fake-Delay-Ms": "500"})
        time.sleep(0.05)
        f.config(capacity=1)
        c = Resp(f.port, "POST", "/v1/chat/completions", chat(), {"X-Test-Id": "C"})
        assert c.read_head() and c.status == 200
        b2.read_all()
        assert b2.status == 200 and b2.body and json.loads(b2.body)["object"] == "chat.completion"
        time.sleep(0.1)
        assert f.get("/_stats")["held"] == 1                 # A still runs, capacity 1
        # hold_max_ms lowered at run time cuts C; hold_keepalive_ms applies at once
        f.config(hold_max_ms=300, hold_keepalive_ms=100)
        c.read_all()
        assert c.eof and not c.ended and log_entry(f, "C")["status"] is None
        assert f.get("/_stats")["hold_closed"] == 1
        a.read_all()
        assert a.status == 200
        # latency_ms
        f.config(latency_ms=400, capacity=0, hold_max_ms=600000)
        r = f.call("POST", "/v1/chat/completions", chat())
        assert r.status == 200
        near(r.t_head, 0.4, "latency_ms from /_config")
        f.config(latency_ms=0)
        bad = f.call("POST", "/_config", b'{"capacity":-1}')
        assert bad.status == 400 and "capacity" in json.loads(bad.body)["error"]["message"]
        bad = f.call("POST", "/_config", b'{"nope":1}')
        assert bad.status == 400
        assert f.get("/_config")["capacity"] == 0
    finally:
        f.stop()
    print("ok /_config: raise admits at once, lower keeps running ones, hold_max_ms, latency_ms, 400")


def check_account_limit():
    f = Fake("--hold", "--capacity", "1", "--account-limit", "2")
    try:
        a = Resp(f.port, "POST", "/v1/chat/completions", chat(), {"X-Fake-Delay-Ms": "800"})
        time.sleep(0.05)
        b = Resp(f.port, "POST", "/v1/chat/completions", chat(True))
        assert b.read_head() and b.status == 200                 # held
        time.sleep(0.05)
        c = f.call("POST", "/v1/chat/completions", chat(), {"X-Test-Id": "C"})
        assert c.status == 429 and c.t_head < 0.2, (c.status, c.t_head)
        assert c.headers.get("retry-after") == "1", c.headers
        err = json.loads(c.body)["error"]
        assert err["message"] == "Too many concurrent requests" and err["type"] == "rate_limit_error"
        assert log_entry(f, "C")["status"] == 429
        # not a completion endpoint: not limited
        assert f.call("GET", "/v1/models").status == 200
        a.read_all()
        b.read_all()
        assert b.ended
        assert f.call("POST", "/v1/chat/completions", chat()).status == 200
    finally:
        f.stop()
    f = Fake("--account-limit", "1", "--retry-after", "7")
    try:
        a = Resp(f.port, "POST", "/v1/chat/completions", chat(), {"X-Fake-Delay-Ms": "500"})
        time.sleep(0.05)
        c = f.call("POST", "/v1/embeddings", b'{"input":"x"}')
        assert c.status == 429 and c.headers.get("retry-after") == "7", c.headers
        a.read_all()
    finally:
        f.stop()
    print("ok --account-limit: 429 at once, Retry-After 1 / --retry-after, held ones count")


def check_first_token():
    f = Fake()
    try:
        for stream in (True, False):
            r = Resp(f.port, "POST", "/v1/chat/completions", chat(stream),
                     {"X-Fake-First-Token-Ms": "700"})
            r.read_all()
            assert r.status == 200 and r.t_head < 0.2, r.t_head
            assert r.headers["transfer-encoding"] == "chunked"
            assert r.keepalives() == [] and r.ended
            near(r.chunks[0][0], 0.7, "first token (stream=%s)" % stream)
            if not stream:
                assert len(r.chunks) == 1 and json.loads(r.chunks[0][1])["object"] == "chat.completion"
            r = Resp(f.port, "POST", "/v1/chat/completions", chat(stream),
                     {"X-Fake-First-Token-Ms": "700", "X-Fake-Keepalive-Ms": "200"})
            r.read_all()
            assert r.t_head < 0.2 and len(r.keepalives()) == 3, r.chunks
            near(r.data()[0][0], 0.7, "first token after keep-alives")
            # the same as X-Fake-Delay-Ms + X-Fake-Keepalive-Ms
            q = Resp(f.port, "POST", "/v1/chat/completions", chat(stream),
                     {"X-Fake-Delay-Ms": "700", "X-Fake-Keepalive-Ms": "200"})
            q.read_all()
            assert [d for _, d in q.chunks][:3] == [d for _, d in r.chunks][:3]
        # X-Fake-Delay-Ms alone still delays the head
        r = f.call("POST", "/v1/chat/completions", chat(), {"X-Fake-Delay-Ms": "400"})
        near(r.t_head, 0.4, "delay-ms head")
        assert "content-length" in r.headers
    finally:
        f.stop()
    print("ok X-Fake-First-Token-Ms: head at once, first data/body after N, keep-alives with K")


def check_hold_close():
    f = Fake()
    try:
        for stream, ka in ((True, None), (False, "250")):
            h = {"X-Fake-Hold-Close-Ms": "1100", "X-Test-Id": "HC%s" % stream}
            if ka:
                h["X-Fake-Keepalive-Ms"] = ka
            r = Resp(f.port, "POST", "/v1/chat/completions", chat(stream), h)
            r.read_all()
            assert r.status == 200 and r.t_head < 0.2 and r.eof and not r.ended
            want = b": keep-alive\n\n" if stream else b"\n"
            assert r.data() == [] and all(d == want for _, d in r.chunks), r.chunks
            assert len(r.chunks) == (1 if ka is None else 4), r.chunks
            near(r.t_eof, 1.1, "hold-close")
            e = log_entry(f, "HC%s" % stream)
            assert e["status"] is None and not e["client_closed"] and e["held_ms"] is None
            near((e["t_end_ms"] - e["t_start_ms"]) / 1000, 1.1, "hold-close in /_log")
        st = f.get("/_stats")
        assert st["completed"] == 2 and st["client_closed"] == 0, st
    finally:
        f.stop()
    print("ok X-Fake-Hold-Close-Ms: 200 head, keep-alives, close without data")


def check_reset_reused():
    f = Fake()
    try:
        s = socket.create_connection(("127.0.0.1", f.port))
        s.settimeout(5)
        h = {"X-Fake-Reset-Reused": "1", "X-Test-Id": "R1"}
        s.sendall(request_bytes("POST", "/v1/chat/completions", chat(), h, f.port))
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(65536)
        head, rest = got.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 "), head
        n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
                .split(b":")[1])
        while len(rest) < n:
            rest += s.recv(65536)
        assert json.loads(rest)["object"] == "chat.completion"
        h["X-Test-Id"] = "R2"
        s.sendall(request_bytes("POST", "/v1/chat/completions", chat(), h, f.port))
        try:
            got, reset = s.recv(100), False
        except ConnectionResetError:
            got, reset = b"", True
        assert got == b"" and reset, got
        s.close()
        e = log_entry(f, "R2")
        assert e["status"] is None and e["t_end_ms"] is not None and not e["client_closed"]
        assert log_entry(f, "R1")["status"] == 200
        # fresh connection: answered
        r = f.call("POST", "/v1/chat/completions", chat(), {"X-Fake-Reset-Reused": "1"})
        assert r.status == 200 and json.loads(r.body)["object"] == "chat.completion"
        assert f.get("/_stats")["completed"] == 3
    finally:
        f.stop()
    print("ok X-Fake-Reset-Reused: RST on a reused connection before any byte, fresh one answered")


def check_defaults():
    f = Fake("--capacity", "1")
    try:
        a = Resp(f.port, "POST", "/v1/chat/completions", chat(), {"X-Fake-Delay-Ms": "500"})
        time.sleep(0.05)
        b = f.call("POST", "/v1/chat/completions", chat())
        assert b.status == 503 and b.t_head < 0.2
        assert json.loads(b.body)["error"]["type"] == "server_busy"
        a.read_all()
        st = f.get("/_stats")
        assert st["held"] == 0 and st["held_total"] == 0 and st["hold_closed"] == 0, st
        assert all(e["held_ms"] is None for e in f.get("/_log"))
    finally:
        f.stop()
    print("ok without --hold: 503 at once as before")


def main():
    checks = [check_defaults, check_first_token, check_hold_close, check_reset_reused,
              check_account_limit, check_hold_stream_and_plain, check_fifo_leave_and_max,
              check_config]
    for c in checks:
        c()
    print("all %d checks passed" % len(checks))


if __name__ == "__main__":
    main()
