"""A delaying TCP relay: the round-trip time of a distant teacher, added in user space (this kernel has no netem).

    python bench/relay.py relay --listen 10.77.0.1:9000 --upstream 127.0.0.1:8000 --rtt-ms 20 --control /tmp/r.sock
    python bench/relay.py echo --listen 10.77.0.1:7000          # an echo server, for `ping`
    python bench/relay.py ping --target 10.77.0.1:9000 -n 50    # connect + ping-pong RTTs, one JSON line
    python bench/relay.py bulk --listen 10.77.0.1:7001          # sends or swallows bulk data, for `blast`
    python bench/relay.py blast --target 10.77.0.1:7001 --mbytes 100 [--direction put]   # goodput, one JSON line

Each chunk read from one side is held for rtt/2 from the moment it arrived, then written to the other side, in
order: toxiproxy's latency toxic, applied in both directions, so a request/response round trip costs one RTT.
Back-pressure: at most `buffer_bytes` wait per direction (well above a path's bandwidth-delay product, 1.25 MB at
1 Gbit/s x 10 ms); beyond it the relay stops reading and the sender's TCP window closes, as on a full link.

What this model leaves out: the TCP handshake to the relay completes at once (a new connection costs no RTT, a
TLS handshake does, being data), and TCP's own window growth never sees the delay (the segments' RTT is the
veth's), so slow start over a long path is not modelled.

Faults (`RelayControl.set(mode=...)`, or `{"cmd": "set", "mode": ...}` on the control socket):
  forward  the default
  stall    nothing goes through, nothing is closed: no FIN, no RST; queued data flows again on `forward`
  drop     data is read and discarded, connections stay open (toxiproxy's timeout toxic with timeout 0); the
           streams are then missing bytes, so use it for "nothing arrives", not for recovery
  reset    every open connection is aborted with an RST, and so is each new one, until another mode is set
The control socket is a Unix socket: its path reaches across network namespaces. One JSON object per line in,
one JSON line out (the relay's stats): {"cmd": "stats"}, {"cmd": "set", "rtt_ms": 100, "mode": "stall"},
{"cmd": "reset_counters"}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import signal
import socket
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass

CHUNK = 256 << 10
MODES = ("forward", "stall", "drop", "reset")


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


@dataclass
class Stats:
    bytes_up: int = 0  # client -> upstream, payload forwarded
    bytes_down: int = 0  # upstream -> client
    dropped: int = 0  # payload discarded in mode drop
    connections: int = 0  # accepted so far
    open: int = 0  # open now
    rtt_ms: float = 0.0
    mode: str = "forward"
    late_ms: float = 0.0  # how late the last delayed chunk left, past its due time (negative: early)


class _Budget:
    """Bytes waiting in one direction's queue: the reader waits while the queue holds `limit` or more."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = asyncio.Condition()

    async def take(self, n: int) -> None:
        async with self.cond:
            await self.cond.wait_for(lambda: self.used < self.limit)
            self.used += n

    async def give(self, n: int) -> None:
        async with self.cond:
            self.used -= n
            self.cond.notify_all()


class Relay:
    """Listens on `listen`, opens one upstream connection per client, and delays both directions by rtt/2."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], rtt_ms: float = 0.0,
                 buffer_bytes: int = 16 << 20):
        self.listen, self.upstream, self.buffer_bytes = listen, upstream, buffer_bytes
        self.stats = Stats(rtt_ms=rtt_ms)
        self.forwarding = asyncio.Event()
        self.forwarding.set()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.oversleep_s = 0.0  # running mean of how late a timer wakes this process

    @property
    def half_rtt_s(self) -> float:
        return self.stats.rtt_ms / 2000.0

    def set(self, *, rtt_ms: float | None = None, mode: str | None = None) -> None:
        if rtt_ms is not None:
            if rtt_ms < 0:
                raise ValueError(f"rtt_ms={rtt_ms} must be >= 0")
            self.stats.rtt_ms = float(rtt_ms)
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
            self.stats.mode = mode
            if mode == "stall":
                self.forwarding.clear()
            else:
                self.forwarding.set()
            if mode == "reset":
                for w in list(self.writers):
                    _abort(w)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, *self.listen, limit=CHUNK, backlog=256)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # cancelled at shut-down: nothing left to report
            await self._connection(c_reader, c_writer)

    async def _connection(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        if self.stats.mode == "reset":
            _abort(c_writer)
            return
        self.stats.open += 1
        self.writers.add(c_writer)
        u_writer = None
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream, limit=CHUNK)
            self.writers.add(u_writer)
            for w in (c_writer, u_writer):  # write each chunk when due: Nagle would hold a small tail for an ACK
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pumps = {asyncio.ensure_future(self._pump(c_reader, u_writer, "bytes_up")),
                     asyncio.ensure_future(self._pump(u_reader, c_writer, "bytes_down"))}
            done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:  # one side failed (a reset, a closed peer): the connection is over
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), OSError):
                    raise task.exception()
        except OSError:
            pass
        finally:
            self.stats.open -= 1
            for w in (c_writer, u_writer):
                if w is not None:
                    self.writers.discard(w)
                    if self.stats.mode == "reset":
                        w.transport.abort()
                    else:
                        w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        """One direction: read chunks as they come, each due rtt/2 after it arrived, written in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        budget = _Budget(self.buffer_bytes)

        async def read_side() -> None:
            try:
                while True:
                    await self.forwarding.wait()  # stall: stop reading, the sender's window closes
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    if self.stats.mode == "drop":
                        self.stats.dropped += len(data)
                        continue
                    await budget.take(len(data))
                    queue.put_nowait((loop.time() + self.half_rtt_s, data))
            except OSError:
                pass
            queue.put_nowait((loop.time() + self.half_rtt_s, b""))  # EOF, after the data before it

        async def write_side() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    # wake early by how late wake-ups have been (a loaded machine schedules a sleeper late)
                    wake = loop.time() + max(0.0, wait - self.oversleep_s)
                    await asyncio.sleep(wake - loop.time())
                    self.oversleep_s += 0.1 * (loop.time() - wake - self.oversleep_s)
                    self.stats.late_ms = 1000 * (loop.time() - due)
                await self.forwarding.wait()  # stall holds what is queued too
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()  # half-close, as the sender did
                    return
                writer.write(data)
                await writer.drain()
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
                await budget.give(len(data))

        reading = asyncio.ensure_future(read_side())
        try:
            await write_side()
        finally:
            reading.cancel()

    async def control(self, path: str) -> asyncio.Server:
        """Serve JSON commands on a Unix socket at `path`."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while line := await reader.readline():
                    try:
                        msg = json.loads(line)
                        cmd = msg.get("cmd", "stats")
                        if cmd == "set":
                            self.set(rtt_ms=msg.get("rtt_ms"), mode=msg.get("mode"))
                        elif cmd == "reset_counters":
                            for k in ("bytes_up", "bytes_down", "dropped", "connections"):
                                setattr(self.stats, k, 0)
                        elif cmd != "stats":
                            raise ValueError(f"unknown cmd {cmd!r}: stats, set, reset_counters")
                        out = asdict(self.stats)
                    except (ValueError, AttributeError) as exc:
                        out = {"error": str(exc)}
                    writer.write(json.dumps(out).encode() + b"\n")
                    await writer.drain()
            finally:
                writer.close()

        if os.path.exists(path):
            os.unlink(path)
        return await asyncio.start_unix_server(handle, path)


class RelayControl:
    """The synchronous side of a relay's control socket (from any network namespace)."""

    def __init__(self, path: str, timeout_s: float = 10.0):
        self.path, self.timeout_s = path, timeout_s

    def _call(self, msg: dict) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout_s)
            s.connect(self.path)
            s.sendall(json.dumps(msg).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                part = s.recv(65536)
                if not part:
                    break
                buf += part
        out = json.loads(buf)
        if "error" in out:
            raise ValueError(out["error"])
        return out

    def stats(self) -> dict:
        return self._call({"cmd": "stats"})

    def set(self, *, rtt_ms: float | None = None, mode: str | None = None) -> dict:
        return self._call({"cmd": "set", "rtt_ms": rtt_ms, "mode": mode})

    def reset_counters(self) -> dict:
        return self._call({"cmd": "reset_counters"})

    def wait_ready(self, timeout_s: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.stats()
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------
# measuring tools: echo / ping for the RTT, bulk / blast for the rate
# ----------------------------------------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await _echo_loop(reader, writer)


async def _echo_loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """`put N\n` + N bytes: read them, answer `N\n`. `get N\n`: send N bytes."""
    with contextlib.suppress(asyncio.CancelledError):
        await _bulk_loop(reader, writer)


async def _bulk_loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        verb, n = (await reader.readline()).split()
        n = int(n)
        if verb == b"put":
            left = n
            while left > 0 and (data := await reader.read(min(left, 1 << 20))):
                left -= len(data)
            writer.write(f"{n - left}\n".encode())
        else:
            block = b"\0" * (1 << 20)
            for start in range(0, n, len(block)):
                writer.write(block[: min(len(block), n - start)])
                await writer.drain()
        await writer.drain()
    except (OSError, ValueError):
        pass
    finally:
        writer.close()


def ping(target: tuple[str, int], n: int = 20, size: int = 64) -> dict:
    """Connect, then `n` round trips of `size` bytes (TCP_NODELAY). Times in ms; the first exchange is dropped
    from the median (it includes the relay's upstream connect)."""
    t0 = time.perf_counter()
    s = socket.create_connection(target, timeout=30)
    connect_ms = 1000 * (time.perf_counter() - t0)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    rtts = []
    with s:
        for _ in range(n + 1):
            t = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < size:
                part = s.recv(size - got)
                if not part:
                    raise ConnectionError("echo closed the connection")
                got += len(part)
            rtts.append(1000 * (time.perf_counter() - t))
    return {"connect_ms": connect_ms, "first_ms": rtts[0], "median_ms": statistics.median(rtts[1:]),
            "min_ms": min(rtts[1:]), "max_ms": max(rtts[1:]), "n": n}


def blast(target: tuple[str, int], nbytes: int, direction: str = "get") -> dict:
    """Bulk transfer with a `bulk` server: goodput in Mbit/s (payload only). get: the server sends, timed from
    the first byte received to the last (the request's round trip excluded). put: this side sends, timed until
    the server's count arrives (one half round trip more, small against transfers of a second or more)."""
    s = socket.create_connection(target, timeout=120)
    with s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if direction == "get":
            s.sendall(f"get {nbytes}\n".encode())
            first = s.recv(1 << 20)
            t0, got = time.perf_counter(), 0
            while part := s.recv(1 << 20):
                got += len(part)
            dt = time.perf_counter() - t0
        else:
            buf = memoryview(b"\0" * (1 << 20))
            s.sendall(f"put {nbytes}\n".encode())
            t0, left = time.perf_counter(), nbytes
            while left > 0:
                left -= s.send(buf[: min(left, len(buf))])
            got = int(s.makefile().readline())
            dt, first = time.perf_counter() - t0, b""
    if len(first) + got != nbytes:
        raise ConnectionError(f"{direction}: {len(first) + got} of {nbytes} bytes arrived")
    return {"direction": direction, "bytes": nbytes, "seconds": dt, "mbit_s": got * 8 / dt / 1e6}


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closers = []
    if args.cmd == "relay":
        relay = Relay(_addr(args.listen), _addr(args.upstream), args.rtt_ms, args.buffer_mbytes << 20)
        await relay.start()
        closers.append(relay.close)
        if args.control:
            ctl = await relay.control(args.control)
            closers.append(lambda: _close_server(ctl))
    else:
        server = await asyncio.start_server(_echo if args.cmd == "echo" else _bulk, *_addr(args.listen), limit=CHUNK)
        closers.append(lambda: _close_server(server))
    print("ready", flush=True)
    await stop.wait()
    for close in closers:
        await close()


async def _close_server(server: asyncio.Server) -> None:
    server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relay", help="the delaying relay")
    r.add_argument("--listen", required=True, help="HOST:PORT to accept clients on")
    r.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    r.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time added (half in each direction)")
    r.add_argument("--buffer-mbytes", type=int, default=16, help="bytes held per direction before back-pressure")
    r.add_argument("--control", help="Unix socket path for commands (stats, set rtt/mode)")
    for name in ("echo", "bulk"):
        sub.add_parser(name, help=f"{name} server").add_argument("--listen", required=True)
    q = sub.add_parser("ping", help="connect + ping-pong RTT through a path to an echo server")
    q.add_argument("--target", required=True)
    q.add_argument("-n", type=int, default=20)
    q.add_argument("--size", type=int, default=64)
    b = sub.add_parser("blast", help="bulk transfer with a bulk server")
    b.add_argument("--target", required=True)
    b.add_argument("--mbytes", type=float, default=100)
    b.add_argument("--direction", choices=("get", "put"), default="get", help="get: the server sends; put: this side")
    args = p.parse_args(argv)
    if args.cmd == "ping":
        print(json.dumps(ping(_addr(args.target), args.n, args.size)))
    elif args.cmd == "blast":
        print(json.dumps(blast(_addr(args.target), int(args.mbytes * 1e6), args.direction)))
    else:
        # select(2) takes its timeout in microseconds; epoll's is rounded up to the next millisecond, which
        # would add up to 1 ms to every delayed chunk
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) as runner:
            runner.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
