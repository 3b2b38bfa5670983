"""A tiny TCP proxy for fault tests: forwards loopback connections and can misbehave on purpose.

It understands just enough HTTP/2 framing (9-byte frame headers; gRPC runs over HTTP/2 with prior
knowledge, so the client starts with the 24-byte preface) to recognise an *upload*: a client stream
whose DATA frames exceed `big_stream_bytes` (only PushDelta sends that much towards the
coordinator; heartbeats and leases are a few hundred bytes). Faults, each armed once:

- ``cut_upload_after(n)``: close the connection once an upload has sent n DATA bytes and has not
  ended: the server sees a truncated stream, the client UNAVAILABLE.
- ``cut_reply_to_upload()``: let an upload through completely, then close the connection when the
  server starts answering it (drop the reply): the server has handled the push, the client sees
  UNAVAILABLE and retries the same push (a replay).
- ``throttle_up_bps``: client-to-server bandwidth, so an upload stays in flight for a while.
- ``cut_all()``: close every connection now, with whatever it still buffers: the host behind the
  proxy vanished (a SIGKILLed process alone would still have its kernel send the bytes it had
  buffered, and a throttled upload could then arrive complete).

Events tell the test what happened: `upload_seen` (an upload passed `big_stream_bytes`),
`cut_done`. Everything runs in daemon threads; `close()` stops it.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS = 0x0, 0x1
END_STREAM = 0x1


class _Conn:
    def __init__(self, proxy: "Proxy", client: socket.socket, upstream: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.data_bytes: dict[int, int] = {}  # client stream id -> DATA bytes sent
        self.uploads: set[int] = set()  # streams that passed big_stream_bytes
        self.finished_uploads: set[int] = set()  # uploads whose END_STREAM went through

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", big_stream_bytes: int = 20_000):
        self.target = (target_host, target_port)
        self.big_stream_bytes = big_stream_bytes
        self.throttle_up_bps = 0.0
        self._cut_upload_at: int | None = None
        self._cut_reply = False
        self.upload_seen = threading.Event()
        self.upload_finished = threading.Event()
        self.cut_done = threading.Event()
        self.cuts: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ faults

    def cut_upload_after(self, n_bytes: int) -> None:
        with self._lock:
            self._cut_upload_at = n_bytes
            self.cut_done.clear()

    def cut_reply_to_upload(self) -> None:
        with self._lock:
            self._cut_reply = True
            self.cut_done.clear()

    def cut_all(self) -> None:
        for conn in list(self._conns):
            self._cut(conn, "every connection cut")

    def _cut(self, conn: _Conn, why: str) -> None:
        self.cuts.append(why)
        conn.close()
        self.cut_done.set()

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._stop.set()
        try:
            self._sock.close()
        except OSError:
            pass
        for c in list(self._conns):
            c.close()

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, client, upstream)
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._pump_up, args=(conn,), name="proxy-up", daemon=True).start()
            threading.Thread(target=self._pump_down, args=(conn,), name="proxy-down", daemon=True).start()

    def _frames(self, sock: socket.socket, conn: _Conn, preface: bool):
        """Yield (raw bytes, type, flags, stream id) per frame; the preface as type None."""
        buf = b""
        need_preface = preface
        while not conn.closed.is_set():
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            if need_preface:
                if len(buf) < len(PREFACE):
                    continue
                yield buf[: len(PREFACE)], None, 0, 0
                buf, need_preface = buf[len(PREFACE):], False
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                ftype, flags = buf[3], buf[4]
                stream = struct.unpack(">I", buf[5:9])[0] & 0x7FFFFFFF
                yield buf[: 9 + length], ftype, flags, stream
                buf = buf[9 + length:]

    def _pump_up(self, conn: _Conn) -> None:
        """Client -> server: watch DATA frames per stream, throttle, cut uploads."""
        try:
            for raw, ftype, flags, stream in self._frames(conn.client, conn, preface=True):
                if ftype == DATA:
                    sent = conn.data_bytes.get(stream, 0) + len(raw) - 9
                    conn.data_bytes[stream] = sent
                    if sent >= self.big_stream_bytes and stream not in conn.uploads:
                        conn.uploads.add(stream)
                        self.upload_seen.set()
                    with self._lock:
                        cut_at = self._cut_upload_at
                        if cut_at is not None and stream in conn.uploads and sent >= cut_at and not flags & END_STREAM:
                            self._cut_upload_at = None
                            self._cut(conn, f"upload on stream {stream} cut after {sent} bytes")
                            return
                    if flags & END_STREAM and stream in conn.uploads:
                        conn.finished_uploads.add(stream)
                        self.upload_finished.set()
                if self.throttle_up_bps > 0:
                    time.sleep(len(raw) / self.throttle_up_bps)
                conn.upstream.sendall(raw)
        except OSError:
            pass
        finally:
            conn.close()

    def _pump_down(self, conn: _Conn) -> None:
        """Server -> client: drop the reply to a finished upload when armed."""
        try:
            for raw, ftype, flags, stream in self._frames(conn.upstream, conn, preface=False):
                if ftype in (HEADERS, DATA) and stream in conn.finished_uploads:
                    with self._lock:
                        if self._cut_reply:
                            self._cut_reply = False
                            self._cut(conn, f"reply to upload on stream {stream} dropped")
                            return
                conn.client.sendall(raw)
        except OSError:
            pass
        finally:
            conn.close()
