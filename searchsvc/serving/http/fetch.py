"""Fetching a query photo by URL (``image_url`` of ``POST /v1/search``), off by default.

A fetch can do no more than an upload would: http or https only, no user information in
the URL, the host and port on the allowlist (``SEARCHSVC_API_IMAGE_URL_HOSTS``; an entry
without a port allows the scheme's default port only), at most :data:`MAX_REDIRECTS`
redirects each checked again, at most ``max_bytes`` read (from Content-Length before
reading, and while reading), the whole fetch within ``timeout_s``. No proxy, ``.netrc`` or
cookie from the environment is used; bodies are never echoed into a reason.

The allowlist names hosts, not addresses: what an allowed name resolves to is the
operator's DNS's answer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable

import httpx

MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}


class FetchError(Exception):
    """A fetch refused or failed: ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ImageFetcher:
    """Fetches one photo per :meth:`fetch` call (thread-safe: each call its own client)."""

    def __init__(
        self, hosts: Iterable[tuple[str, int | None]], *, max_bytes: int, timeout_s: float
    ) -> None:
        self.hosts = frozenset((host.lower(), port) for host, port in hosts)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._tls = httpx.create_ssl_context()  # once: certifi's store, as httpx's default

    # ------------------------------------------------------------------ checks
    def check(self, url: httpx.URL) -> None:
        """Raise FetchError (422) unless ``url`` may be fetched."""
        if url.scheme not in DEFAULT_PORTS:
            raise FetchError(422, f"only http and https URLs are fetched, not {url.scheme!r}")
        if url.userinfo:
            raise FetchError(422, "a URL with user information (user:password@) is refused")
        host = url.raw_host.decode("ascii", "replace").lower()  # IDNA names as xn--
        if not host:
            raise FetchError(422, "the URL names no host")
        port = url.port or DEFAULT_PORTS[url.scheme]
        allowed = (host, port) in self.hosts or (
            port == DEFAULT_PORTS[url.scheme] and (host, None) in self.hosts
        )
        if not allowed:
            shown = f"[{host}]" if ":" in host else host
            raise FetchError(
                422,
                f"host {shown}:{port} is not on SEARCHSVC_API_IMAGE_URL_HOSTS",
            )

    @staticmethod
    def parse(url: str) -> httpx.URL:
        try:
            return httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise FetchError(422, f"not a valid URL ({exc})") from None

    # ------------------------------------------------------------------ fetch
    def fetch(self, url: str) -> bytes:
        """The file at ``url`` (following allowed redirects), or FetchError."""
        deadline = time.monotonic() + self.timeout_s
        current = self.parse(url)
        self.check(current)
        with httpx.Client(follow_redirects=False, trust_env=False, verify=self._tls) as client:
            for hop in range(MAX_REDIRECTS + 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out()
                request = client.build_request(
                    "GET",
                    current,
                    headers={"Accept": "image/*", "Accept-Encoding": "identity"},
                    timeout=httpx.Timeout(remaining),
                )
                try:
                    response = client.send(request, stream=True)
                except httpx.TimeoutException:
                    raise self._timed_out() from None
                except httpx.HTTPError as exc:
                    raise FetchError(422, f"could not fetch: {_describe(exc)}") from None
                try:
                    if response.status_code in REDIRECTS:
                        location = response.headers.get("location")
                        if not location:
                            raise FetchError(
                                422, f"upstream answered {response.status_code} without Location"
                            )
                        if hop == MAX_REDIRECTS:
                            raise FetchError(422, f"more than {MAX_REDIRECTS} redirects")
                        try:
                            current = current.join(location)
                        except (httpx.InvalidURL, TypeError, ValueError) as exc:
                            raise FetchError(422, f"redirect to an invalid URL ({exc})") from None
                        try:
                            self.check(current)
                        except FetchError as exc:
                            raise FetchError(422, f"redirect refused: {exc.reason}") from None
                        continue
                    if not 200 <= response.status_code < 300:
                        raise FetchError(
                            422,
                            f"upstream answered {response.status_code} "
                            f"{response.reason_phrase}".rstrip(),
                        )
                    return self._body(response, deadline)
                finally:
                    response.close()
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def _body(self, response: httpx.Response, deadline: float) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise FetchError(422, "upstream sent an invalid Content-Length") from None
            if size > self.max_bytes:
                raise FetchError(413, f"image is {size} bytes, over the limit of {self.max_bytes}")
        # A byte trickle could hold each read just under the read timeout: at the deadline
        # the socket is shut down, which ends a read that is waiting.
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, (response,))
        watchdog.daemon = True
        watchdog.start()
        chunks: list[bytes] = []
        received = 0
        try:
            for chunk in response.iter_raw():
                received += len(chunk)
                if received > self.max_bytes:
                    raise FetchError(413, f"image is over the limit of {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise self._timed_out()
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise self._timed_out() from None
        except httpx.HTTPError as exc:
            if time.monotonic() >= deadline:
                raise self._timed_out() from None
            raise FetchError(422, f"could not fetch: {_describe(exc)}") from None
        finally:
            watchdog.cancel()
        data = b"".join(chunks)
        if not data:
            raise FetchError(422, "the fetched file is empty")
        return data

    def _timed_out(self) -> FetchError:
        return FetchError(
            408, f"not fetched within SEARCHSVC_API_IMAGE_URL_TIMEOUT_S ({self.timeout_s:g} s)"
        )


def _shut(response: httpx.Response) -> None:
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # not SSLSocket's: no TLS goodbye
        except OSError:
            pass


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
