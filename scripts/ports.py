"""Loopback ports for local clusters started by the tests and the benchmark.

Ports come from below the kernel's ephemeral range, so an outgoing connection (of any process)
never takes the port of a node that is down for a restart, and a port handed out once is never
handed out again by the same process (they are only checked, not held)."""
import random
import socket

_GIVEN: set[int] = set()


def port_range() -> tuple[int, int]:
    """[low, high) below the ephemeral range (net.ipv4.ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    high = max(low, 12000)
    return high - 10000, high


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base(count: int) -> int:
    """A base port with `count` free ports after it, none handed out before by this process.
    Raises RuntimeError when no such range is found."""
    low, high = port_range()
    for _ in range(500):
        base = random.randint(low, high - count)
        ports = range(base, base + count)
        if not _GIVEN.intersection(ports) and all(_bindable(p) for p in ports):
            _GIVEN.update(ports)
            return base
    raise RuntimeError(f"no {count} free ports in {low}-{high}")
