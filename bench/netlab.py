"""Network test hosts on this machine: network namespaces on one switch, links shaped with tc, a delaying relay.

    with Lab(["teacher", "node1", "node2"]) as lab:     # hosts 10.77.0.1, .2, .3, each with eth0 on one bridge
        lab.shape("node1", mbit=200)                      # tbf, both directions of node1's link
        relay = lab.relay("teacher", 9000, ("127.0.0.1", 8000), rtt_ms=100)   # node1 -> 10.77.0.1:9000
        lab.measure_rtt("node1", "teacher", relay_rtt_ms=100)   # {"median_ms": ..., ...}
        proc = lab.popen("node1", [sys.executable, "-m", "student_trainer", ...])
        lab.link_down("teacher"); ...; lab.link_up("teacher")
    # every namespace, link and process started through the lab is gone here (also on an error, at exit, SIGTERM)

    python bench/netlab.py [--rtt-ms 20 --mbit 1000]     # builds a lab and measures what it produces

Topology: a switch namespace holding the bridge `br0`; each host is a namespace with `lo` up and one `eth0`
(10.77.0.<i+1>/24, in host order) whose veth peer `p-<host>` is a port of the bridge. No host has a default route
and nothing links to the machine's own namespace, so no packet can leave the lab. This kernel has no netem: the
rate comes from tc (tbf on both ends of a host's link), the round-trip time from `bench/relay.py` run inside a
host. Needs root and iproute2 (`Lab.unavailable()` says why not).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.relay import RelayControl  # noqa: E402

_LIVE: list[Lab] = []


def _close_all() -> None:
    for lab in list(_LIVE):
        lab.close()


def _on_sigterm(signum, frame):  # turn SIGTERM into an exception, so `finally` and atexit tear the lab down
    raise SystemExit(128 + signum)


@dataclass
class RelayProcess:
    """A relay running in a lab host: `url` to point a client at, `control` to change its RTT or mode."""

    proc: subprocess.Popen
    control: RelayControl
    host: str
    address: str  # where clients connect, host:port

    @property
    def url(self) -> str:
        return f"http://{self.address}"


class Lab:
    def __init__(self, hosts: list[str], subnet: str = "10.77.0"):
        if not hosts or len(set(hosts)) != len(hosts) or any(len(h) > 13 or not h.isalnum() for h in hosts):
            raise ValueError(f"hosts={hosts}: distinct alphanumeric names of at most 13 characters")
        self.hosts = list(hosts)
        self.subnet = subnet
        # unique per lab, so that labs of several processes (or of other users of this machine) never collide
        self.prefix = f"aopdlab-{os.getpid()}-{secrets.token_hex(2)}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.closed = False

    # ---- set-up and tear-down ---------------------------------------------------------------------------

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here (None when they can)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None or shutil.which("tc") is None:
            return "iproute2 (ip, tc) is not installed"
        probe = f"aopdlab-probe-{os.getpid()}-{secrets.token_hex(2)}"
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if r.returncode != 0:
            return f"ip netns add failed: {r.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    def __enter__(self) -> Lab:
        _LIVE.append(self)
        if len(_LIVE) == 1:
            atexit.register(_close_all)
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def _build(self) -> None:
        switch = f"{self.prefix}-switch"
        for name in [switch] + [self.ns(h) for h in self.hosts]:
            self._ip("netns", "add", name)
            self.namespaces.append(name)
            self._ip("-n", name, "link", "set", "lo", "up")
        self._ip("-n", switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", switch, "link", "set", "br0", "up")
        for host in self.hosts:
            # both ends made inside their namespaces: no interface ever appears in the machine's own namespace
            self._ip("-n", switch, "link", "add", f"p-{host}", "type", "veth", "peer", "name", "eth0", "netns", self.ns(host))
            self._ip("-n", switch, "link", "set", f"p-{host}", "master", "br0", "up")
            self._ip("-n", self.ns(host), "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            self._ip("-n", self.ns(host), "link", "set", "eth0", "up")

    def close(self) -> None:
        """Stop every process started through the lab (by its process group), then delete the namespaces."""
        if self.closed:
            return
        self.closed = True
        for proc in reversed(self.procs):
            self.stop(proc)
        for name in reversed(self.namespaces):  # a veth goes with either of its namespaces
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self in _LIVE:
            _LIVE.remove(self)

    # ---- processes in a host ----------------------------------------------------------------------------

    def cmd(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], *, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        r = subprocess.run(self.cmd(host, argv), timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"[{host}] {' '.join(argv)} exited {r.returncode}: {(r.stderr or '')[-2000:]}")
        return r

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start `argv` in `host`, in its own process group; stopped by `stop` or when the lab closes."""
        proc = subprocess.Popen(self.cmd(host, argv), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, timeout_s: float = 15) -> None:
        """SIGTERM to the process's group (torchrun's workers, a server's children), SIGKILL if it lingers."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        # children left in the group after the leader exited (the group id is still ours while they live)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def python(self, host: str, code: str, *args: str, timeout: float = 120) -> str:
        """Run a Python snippet in `host`; its stdout."""
        return self.run(host, [sys.executable, "-c", code, *args], timeout=timeout).stdout

    def wait_http(self, host: str, url: str, timeout_s: float = 180, proc: subprocess.Popen | None = None) -> None:
        """Wait until `url` answers 200 from inside `host` (the lab is not reachable from this namespace)."""
        code = ("import sys, time, urllib.request\n"
                "deadline = time.monotonic() + float(sys.argv[2])\n"
                "while True:\n"
                "    try:\n"
                "        urllib.request.urlopen(sys.argv[1], timeout=2); break\n"
                "    except Exception:\n"
                "        if time.monotonic() > deadline: sys.exit(1)\n"
                "        time.sleep(0.2)\n")
        deadline = time.monotonic() + timeout_s
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server in {host} exited with status {proc.returncode} while starting")
            r = self.run(host, [sys.executable, "-c", code, url, "5"], check=False, timeout=60)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer 200 from {host} within {timeout_s:.0f}s")

    # ---- links ------------------------------------------------------------------------------------------

    def _ends(self, host: str) -> list[tuple[str, str]]:
        return [(self.ns(host), "eth0"), (f"{self.prefix}-switch", f"p-{host}")]

    def shape(self, host: str, mbit: float, *, queue_ms: float = 20.0) -> None:
        """Limit `host`'s link to `mbit` Mbit/s each way (tbf on the egress of both veth ends; L2 bytes count).

        burst: 2 ms of the rate (at least 64 KiB, above one GSO segment), so the bucket refills smoothly on a
        high-resolution timer; queue: `queue_ms` of the rate before tbf drops, a switch's modest buffer."""
        rate = mbit * 1e6 / 8
        burst = max(64 << 10, int(rate * 0.002))
        for ns, dev in self._ends(host):
            tbf = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(mbit * 1e6)}bit",
                   "burst", str(burst), "latency", f"{queue_ms}ms"]
            subprocess.run(["ip", "netns", "exec", ns, *tbf], check=True, capture_output=True)

    def unshape(self, host: str) -> None:
        for ns, dev in self._ends(host):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)

    def link_down(self, host: str) -> None:
        """Pull `host`'s cable at the switch: its port goes down, `host`'s eth0 loses carrier but keeps its
        address; every packet to or from it is lost, with no RST and no error to a peer."""
        self._ip("-n", f"{self.prefix}-switch", "link", "set", f"p-{host}", "down")

    def link_up(self, host: str) -> None:
        self._ip("-n", f"{self.prefix}-switch", "link", "set", f"p-{host}", "up")

    def counters(self, host: str, dev: str = "eth0") -> dict[str, int]:
        """Bytes and packets through `host`'s interface so far (L2 bytes, as tc counts them)."""
        out = self.run(host, ["ip", "-j", "-s", "link", "show", "dev", dev]).stdout
        s = json.loads(out)[0]["stats64"]
        return {"rx_bytes": s["rx"]["bytes"], "tx_bytes": s["tx"]["bytes"], "rx_packets": s["rx"]["packets"],
                "tx_packets": s["tx"]["packets"], "tx_dropped": s["tx"]["dropped"]}

    # ---- the relay and the measuring tools (bench/relay.py) -----------------------------------------------

    def _tool(self, host: str, *args: str) -> subprocess.Popen:
        proc = self.popen(host, [sys.executable, str(BENCH / "relay.py"), *args], stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if line.strip() != "ready":
            self.stop(proc)
            raise RuntimeError(f"relay.py {' '.join(args)} in {host} did not start (said {line!r})")
        return proc

    def relay(self, host: str, port: int, upstream: tuple[str, int], rtt_ms: float = 0.0) -> RelayProcess:
        """A relay in `host` on its eth0 address:`port`, forwarding to `upstream` (as seen from `host`)."""
        path = str(self.tmp / f"relay-{host}-{port}.sock")
        proc = self._tool(host, "relay", "--listen", f"{self.ip(host)}:{port}", "--upstream", f"{upstream[0]}:{upstream[1]}",
                          "--rtt-ms", str(rtt_ms), "--control", path)
        control = RelayControl(path)
        control.wait_ready()
        return RelayProcess(proc, control, host, f"{self.ip(host)}:{port}")

    def server(self, host: str, kind: str, port: int) -> subprocess.Popen:
        """An `echo` or `bulk` server of bench/relay.py in `host` on its eth0 address (or 127.0.0.1 behind a relay)."""
        return self._tool(host, kind, "--listen", f"{self.ip(host)}:{port}")

    def local_server(self, host: str, kind: str, port: int) -> subprocess.Popen:
        return self._tool(host, kind, "--listen", f"127.0.0.1:{port}")

    def measure_rtt(self, client: str, address: str, n: int = 20) -> dict:
        """`relay.py ping` from `client` to an echo server (directly, or through a relay) at host:port."""
        return json.loads(self.run(client, [sys.executable, str(BENCH / "relay.py"), "ping", "--target", address,
                                            "-n", str(n)]).stdout)

    def measure_rate(self, client: str, address: str, mbytes: float, direction: str = "get") -> dict:
        """`relay.py blast` from `client` to a bulk server at host:port, with the wire rate from `client`'s eth0
        counters over the same transfer."""
        before = self.counters(client)
        out = json.loads(self.run(client, [sys.executable, str(BENCH / "relay.py"), "blast", "--target", address,
                                           "--mbytes", str(mbytes), "--direction", direction], timeout=300).stdout)
        after = self.counters(client)
        key = "rx_bytes" if direction == "get" else "tx_bytes"
        out["wire_bytes"] = after[key] - before[key]
        out["wire_mbit_s"] = out["wire_bytes"] * 8 / out["seconds"] / 1e6  # slightly high: includes the set-up
        return out


# --------------------------------------------------------------------------------------------------------------
# python bench/netlab.py: what the lab produces, against what it was set to
# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description="Build a two-host lab and measure the relay's RTT and tc's rate.")
    p.add_argument("--rtt-ms", type=float, nargs="+", default=[20.0, 100.0])
    p.add_argument("--mbit", type=float, nargs="+", default=[1000.0, 200.0])
    p.add_argument("--seconds", type=float, default=2.0, help="length of each bulk transfer")
    a = p.parse_args()
    if (why := Lab.unavailable()) is not None:
        sys.exit(f"netlab: {why}")
    with Lab(["server", "client"]) as lab:
        lab.local_server("server", "echo", 7000)
        lab.local_server("server", "bulk", 7001)
        lab.server("server", "echo", 7100)
        lab.server("server", "bulk", 7101)
        print(f"{'path':<34}{'target':>10}{'median':>10}{'min':>9}{'max':>9}")
        base = lab.measure_rtt("client", f"{lab.ip('server')}:7100")
        print(f"{'veth, no relay (RTT ms)':<34}{0:>10.1f}{base['median_ms']:>10.2f}{base['min_ms']:>9.2f}{base['max_ms']:>9.2f}")
        for rtt in a.rtt_ms:
            relay = lab.relay("server", 9000, ("127.0.0.1", 7000), rtt)
            r = lab.measure_rtt("client", relay.address)
            print(f"{f'relay {rtt:g} ms (RTT ms)':<34}{rtt:>10.1f}{r['median_ms']:>10.2f}{r['min_ms']:>9.2f}{r['max_ms']:>9.2f}")
            lab.stop(relay.proc)
        print(f"\n{'link':<34}{'tc Mbit/s':>10}{'goodput':>10}{'wire':>9}")
        for mbit in a.mbit:
            lab.shape("client", mbit)
            for direction in ("get", "put"):
                r = lab.measure_rate("client", f"{lab.ip('server')}:7101", mbit / 8 * a.seconds, direction)
                print(f"{f'tbf, {direction}':<34}{mbit:>10.0f}{r['mbit_s']:>10.1f}{r['wire_mbit_s']:>9.1f}")
            relay = lab.relay("server", 9001, ("127.0.0.1", 7001), a.rtt_ms[-1])
            r = lab.measure_rate("client", relay.address, mbit / 8 * a.seconds, "get")
            print(f"{f'tbf + relay {a.rtt_ms[-1]:g} ms, get':<34}{mbit:>10.0f}{r['mbit_s']:>10.1f}{r['wire_mbit_s']:>9.1f}")
            lab.stop(relay.proc)
            lab.unshape("client")


if __name__ == "__main__":
    main()
