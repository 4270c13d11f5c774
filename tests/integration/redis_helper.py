"""
redis_helper: a private redis-server for the integration tests.

Starts `redis-server` (Debian package redis-server, installed by `make deps`)
on a free loopback port with persistence off, waits until it answers PING,
and can kill it (SIGKILL), pause it (SIGSTOP / SIGCONT) and start it again
on the same port.  A small RESP client over a raw socket (standard library
only) lets a test read and write keys directly.  Every server started here
is stopped at exit, also when a test fails: a paused one is continued first.
"""

import atexit
import os
import signal
import socket
import subprocess
import tempfile
import time

import harness as H

REDIS_SERVER = os.environ.get("REDIS_SERVER_BIN", "redis-server")

_servers = []


class RedisError(Exception):
    """An error reply (-ERR ...) from Redis."""


def _encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode("utf-8")
        elif isinstance(a, int):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _Reader:
    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()

    def _fill(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("redis: no answer in time")
        self.sock.settimeout(left)
        try:
            d = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("redis: no answer in time")
        if not d:
            raise ConnectionError("redis: connection closed")
        self.buf += d

    def line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                ln = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return ln
            self._fill()

    def take(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        d = bytes(self.buf[:n])
        del self.buf[:n + 2]
        return d

    def reply(self):
        ln = self.line()
        t, rest = ln[:1], ln[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            return RedisError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self.take(n)
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError("redis: bad reply line %r" % ln)


def command(port, *args, timeout=2.0):
    """One command on a fresh connection.  Error replies raise RedisError."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(_encode(args))
        r = _Reader(s, deadline).reply()
    if isinstance(r, RedisError):
        raise r
    return r


class Redis:
    """redis-server on 127.0.0.1:PORT (a free one unless given)."""

    def __init__(self, port=None, start_timeout=10.0):
        self.port = port or H.free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-", dir=H._tmp_root)
        self.proc = None
        self.paused = False
        self.log_path = None
        _servers.append(self)
        self.start(start_timeout)

    @property
    def url(self):
        return "redis://127.0.0.1:%d" % self.port

    def start(self, timeout=10.0):
        """Start (again) on self.port and wait until PING answers PONG."""
        deadline = time.monotonic() + timeout
        while True:
            self.log_path = os.path.join(H.LOGDIR, "redis-%d-%d.log" % (self.port, H._next_seq()))
            logf = open(self.log_path, "wb")
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.dir,
                 "--daemonize", "no", "--loglevel", "warning"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.dir)
            logf.close()
            H._procs.append(self.proc)
            self.paused = False
            if H.wait_until(self._pong, max(0.1, deadline - time.monotonic()), 0.02):
                return
            if self.proc.poll() is not None and time.monotonic() < deadline:
                continue            # the port was not free yet: try again
            H.stop_process(self.proc, 2.0)
            with open(self.log_path, "rb") as f:
                tail = f.read()[-500:].decode("utf-8", "replace")
            raise RuntimeError("redis-server on port %d did not answer PING: %s"
                               % (self.port, tail))

    def _pong(self):
        if self.proc.poll() is not None:
            return False
        try:
            return command(self.port, "PING", timeout=0.5) == "PONG"
        except (OSError, ConnectionError, TimeoutError, RedisError):
            return False

    def cmd(self, *args, timeout=2.0):
        return command(self.port, *args, timeout=timeout)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL, as a crash: no shutdown, connections reset."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.paused = False

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self):
        if self.proc is None:
            return None
        if self.paused:
            self.resume()
        return H.stop_process(self.proc, 5.0)


def _stop_servers():
    for r in _servers:
        try:
            r.stop()
        except Exception:           # noqa: BLE001
            pass


atexit.register(_stop_servers)
