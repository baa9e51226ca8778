"""`make pod-check`'s probe of JAX's coordinator port, on one worker (copied into its home).

    python PROBE_SCRIPT listen PORT PEERS SECONDS          worker 0, where the coordinator runs
    python PROBE_SCRIPT connect HOST PORT WORKER SECONDS   every other worker

Worker 0 listens on PORT on every interface, as JAX's coordinator does, until PEERS workers have
connected or SECONDS have passed; the others try to connect to worker 0's internal IP for
SECONDS. Each prints one line (`ok: ...` or `FAILED: ...`) and exits 0 when it worked; the
listener 1 when not every worker connected, CANNOT_LISTEN or IN_USE (the port is taken); a
connector UNREACHABLE. Standard library only.
"""

import argparse
import errno
import socket
import sys
import time

CANNOT_LISTEN, IN_USE, UNREACHABLE = 2, 3, 4


def listen(port: int, peers: int, seconds: float) -> int:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As gRPC does: connections of an earlier listener in TIME_WAIT do not hold the port.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("", port))
        server.listen(peers + 16)
    except OSError as e:
        server.close()
        if e.errno == errno.EADDRINUSE:
            print(f"FAILED: port {port} is in use here: another process listens on it (a stale "
                  "trainer's JAX coordinator?)")
            return IN_USE
        print(f"FAILED: cannot listen on port {port} ({e.strerror or e})")
        return CANNOT_LISTEN
    seen, deadline = set(), time.monotonic() + seconds
    with server:
        while len(seen) < peers and time.monotonic() < deadline:
            server.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                conn, address = server.accept()
            except TimeoutError:
                break
            data = b""
            with conn:  # a peer sends its index and closes first
                conn.settimeout(3)
                try:
                    while chunk := conn.recv(64):
                        data += chunk
                except OSError:
                    pass
            seen.add(data.decode(errors="replace").strip() or address[0])
    if len(seen) < peers:
        print(f"FAILED: listened on port {port} for {seconds:g} s: {len(seen)} of {peers} "
              "worker(s) connected")
        return 1
    print(f"ok: port {port} free here" + (f", {peers} worker(s) connected" if peers else ""))
    return 0


def connect(host: str, port: int, worker: int, seconds: float) -> int:
    deadline, why = time.monotonic() + seconds, "no attempt"
    while True:
        try:
            left = max(0.5, min(3.0, deadline - time.monotonic()))
            with socket.create_connection((host, port), timeout=left) as conn:
                conn.sendall(f"{worker}\n".encode())
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(3)
                try:  # until worker 0 closes: a listener that never answers was reached too
                    while conn.recv(64):
                        pass
                except OSError:
                    pass
            print(f"ok: reached worker 0 at {host}:{port}")
            return 0
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    print(f"FAILED: cannot reach worker 0 at {host}:{port} within {seconds:g} s ({why})")
    return UNREACHABLE


def main() -> int:
    parser = argparse.ArgumentParser()
    verbs = parser.add_subparsers(dest="verb", required=True)
    on = verbs.add_parser("listen")
    on.add_argument("port", type=int)
    on.add_argument("peers", type=int)
    on.add_argument("seconds", type=float)
    to = verbs.add_parser("connect")
    to.add_argument("host")
    to.add_argument("port", type=int)
    to.add_argument("worker", type=int)
    to.add_argument("seconds", type=float)
    args = parser.parse_args()
    if args.verb == "listen":
        return listen(args.port, args.peers, args.seconds)
    return connect(args.host, args.port, args.worker, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
