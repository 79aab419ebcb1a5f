"""The ``image_url`` fetcher against a real HTTP server on a loopback port: allowlist,
redirects, size and time limits, refused URLs; every refusal names its problem."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from searchsvc.serving.http.fetch import MAX_REDIRECTS, FetchError, ImageFetcher

LIMIT = 10_000
TIMEOUT_S = 0.5


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 90)).save(out, "JPEG")
    return out.getvalue()


PHOTO = jpeg()


@dataclass
class Site:
    port: int
    release: threading.Event
    hits: list[str]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def handler_for(release: threading.Event, hits: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked bodies

        def log_message(self, *args: object) -> None:
            pass

        def send(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            hits.append(self.path)
            port = self.server.server_address[1]
            if self.path == "/photo.jpg":
                self.send(200, PHOTO, Content_Type="image/jpeg")
            elif self.path == "/missing":
                self.send(404, b"nothing here")
            elif self.path == "/broken":
                self.send(500, b"secret upstream body")
            elif self.path == "/empty":
                self.send(200)
            elif self.path == "/redirect":
                self.send(302, Location="/photo.jpg")
            elif self.path == "/redirect-absolute":
                self.send(301, Location=f"http://127.0.0.1:{port}/photo.jpg")
            elif self.path == "/redirect-localhost":
                self.send(302, Location=f"http://localhost:{port}/photo.jpg")
            elif self.path == "/redirect-other-port":
                self.send(307, Location=f"http://127.0.0.1:{port + 1}/photo.jpg")
            elif self.path == "/redirect-file":
                self.send(302, Location="file:///etc/passwd")
            elif self.path.startswith("/chain/"):
                left = int(self.path.rsplit("/", 1)[1])
                self.send(302, Location=f"/chain/{left - 1}" if left else "/photo.jpg")
            elif self.path == "/big":
                self.send(200, b"x" * (LIMIT + 1))
            elif self.path == "/big-chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(2 * LIMIT // 1000):
                    self.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            elif self.path == "/slow":
                release.wait(10)  # past the timeout; the test releases it at the end
                self.send(200, PHOTO)
            elif self.path == "/trickle":
                # Headers at once, then a byte just under each read's timeout: only the
                # whole-fetch deadline stops it.
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    if release.wait(0.9 * 2 * TIMEOUT_S):
                        return
            else:
                self.send(400)

    return Handler


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    release = threading.Event()
    hits: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(release, hits))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Site(server.server_address[1], release, hits)
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def fetcher(site: Site) -> ImageFetcher:
    return ImageFetcher([("127.0.0.1", site.port)], max_bytes=LIMIT, timeout_s=TIMEOUT_S)


def refused(fetcher: ImageFetcher, url: str) -> FetchError:
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(url)
    return caught.value


def test_an_allowed_photo_is_fetched_whole(fetcher: ImageFetcher, site: Site) -> None:
    data = fetcher.fetch(site.url("/photo.jpg"))
    assert data == PHOTO
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (16, 12)


def test_the_host_matches_case_insensitively(site: Site) -> None:
    fetcher = ImageFetcher([("localhost", site.port)], max_bytes=LIMIT, timeout_s=TIMEOUT_S)
    assert fetcher.fetch(site.url("/photo.jpg", host="LocalHost")) == PHOTO


@pytest.mark.parametrize("path", ["/redirect", "/redirect-absolute", "/chain/2"])
def test_redirects_within_the_allowlist_are_followed(
    fetcher: ImageFetcher, site: Site, path: str
) -> None:
    assert fetcher.fetch(site.url(path)) == PHOTO


def test_more_than_three_redirects_are_refused(fetcher: ImageFetcher, site: Site) -> None:
    assert fetcher.fetch(site.url(f"/chain/{MAX_REDIRECTS - 1}")) == PHOTO  # 3 hops: fine
    error = refused(fetcher, site.url(f"/chain/{MAX_REDIRECTS}"))
    assert error.status == 422 and "more than 3 redirects" in error.reason


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/redirect-localhost", "host localhost:"),
        ("/redirect-other-port", "host 127.0.0.1:"),
        ("/redirect-file", "only http and https"),
    ],
)
def test_a_redirect_off_the_allowlist_is_refused_before_it_is_followed(
    fetcher: ImageFetcher, site: Site, path: str, says: str
) -> None:
    site.hits.clear()
    error = refused(fetcher, site.url(path))
    assert error.status == 422
    assert error.reason.startswith("redirect refused") and says in error.reason
    assert site.hits == [path]  # the refused hop was never requested


def test_a_host_not_on_the_list_is_refused_without_a_request(
    fetcher: ImageFetcher, site: Site
) -> None:
    site.hits.clear()
    error = refused(fetcher, site.url("/photo.jpg", host="localhost"))
    assert error.status == 422
    assert f"localhost:{site.port}" in error.reason
    assert "SEARCHSVC_API_IMAGE_URL_HOSTS" in error.reason
    assert site.hits == []


def test_an_entry_without_a_port_allows_the_default_port_only(site: Site) -> None:
    fetcher = ImageFetcher([("127.0.0.1", None)], max_bytes=LIMIT, timeout_s=TIMEOUT_S)
    error = refused(fetcher, site.url("/photo.jpg"))
    assert error.status == 422 and f"127.0.0.1:{site.port} is not on" in error.reason
    fetcher.check(fetcher.parse("http://127.0.0.1/x"))  # :80 is
    fetcher.check(fetcher.parse("https://127.0.0.1/x"))  # and :443
    with pytest.raises(FetchError):
        fetcher.check(fetcher.parse("https://127.0.0.1:80/x"))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://user:pw@127.0.0.1:{port}/photo.jpg", "user information"),
        ("http://user@127.0.0.1:{port}/photo.jpg", "user information"),
        ("file:///etc/passwd", "only http and https"),
        ("ftp://127.0.0.1:{port}/photo.jpg", "only http and https"),
        ("//127.0.0.1:{port}/photo.jpg", "only http and https"),
        ("photo.jpg", "only http and https"),
        ("http:///photo.jpg", "no host"),
    ],
)
def test_refused_urls_name_the_problem(
    fetcher: ImageFetcher, site: Site, url: str, says: str
) -> None:
    site.hits.clear()
    error = refused(fetcher, url.format(port=site.port))
    assert error.status == 422 and says in error.reason
    assert "pw" not in error.reason
    assert site.hits == []


@pytest.mark.parametrize(("path", "status"), [("/missing", 404), ("/broken", 500)])
def test_an_upstream_error_names_its_status_not_its_body(
    fetcher: ImageFetcher, site: Site, path: str, status: int
) -> None:
    error = refused(fetcher, site.url(path))
    assert error.status == 422 and f"upstream answered {status}" in error.reason
    assert "nothing here" not in error.reason and "secret" not in error.reason


def test_an_empty_body_is_refused(fetcher: ImageFetcher, site: Site) -> None:
    error = refused(fetcher, site.url("/empty"))
    assert error.status == 422 and "empty" in error.reason


def test_a_declared_size_over_the_limit_is_refused(fetcher: ImageFetcher, site: Site) -> None:
    error = refused(fetcher, site.url("/big"))
    assert error.status == 413
    assert f"{LIMIT + 1} bytes" in error.reason and str(LIMIT) in error.reason


def test_a_chunked_body_over_the_limit_is_cut_off(fetcher: ImageFetcher, site: Site) -> None:
    error = refused(fetcher, site.url("/big-chunked"))
    assert error.status == 413 and f"over the limit of {LIMIT} bytes" in error.reason


def test_a_slow_answer_times_out(fetcher: ImageFetcher, site: Site) -> None:
    started = time.monotonic()
    error = refused(fetcher, site.url("/slow"))
    elapsed = time.monotonic() - started
    assert error.status == 408 and "SEARCHSVC_API_IMAGE_URL_TIMEOUT_S" in error.reason
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 1.5


def test_a_trickled_body_is_stopped_at_the_deadline(site: Site) -> None:
    # Each byte comes before a read times out; the deadline is 1 s after the start.
    fetcher = ImageFetcher([("127.0.0.1", site.port)], max_bytes=LIMIT, timeout_s=2 * TIMEOUT_S)
    started = time.monotonic()
    error = refused(fetcher, site.url("/trickle"))
    elapsed = time.monotonic() - started
    assert error.status == 408
    # Without the deadline's watchdog the read in progress at 1 s would end at ~1.8 s.
    assert 2 * TIMEOUT_S * 0.9 <= elapsed < 2 * TIMEOUT_S + 0.6


def test_a_connection_error_is_named(site: Site) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fetcher = ImageFetcher([("127.0.0.1", port)], max_bytes=LIMIT, timeout_s=TIMEOUT_S)
    error = refused(fetcher, f"http://127.0.0.1:{port}/photo.jpg")
    assert error.status == 422 and "could not fetch: ConnectError" in error.reason
