#!/usr/bin/env python3
"""RSS per idle client connection of any proxy: opens N connections to 127.0.0.1:PORT, sends
nothing, and reads the VmRSS of PID before and after (benches/README.md, memory per connection).

    benches/tools/idle_conns.py PORT PID [N=10000]
"""
import resource
import socket
import sys
import time


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for pid {pid}")


def main():
    port, pid = int(sys.argv[1]), int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    before = rss_mib(pid)
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    time.sleep(2)  # let the proxy accept them all
    after = rss_mib(pid)
    print(f"idle {before:.1f} MiB, with {n} connections {after:.1f} MiB, "
          f"{(after - before) * 1024 / n:.1f} KiB each")
    for c in conns:
        c.close()


if __name__ == "__main__":
    main()
