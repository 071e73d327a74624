"""Downloads against a local HTTP server thread: verification, resume, atomic rename, offline errors."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sadr.conf.schema import DatasetConfig
from sadr.data.download import ROME_DATA_URL, ChecksumError, DownloadError, RemoteFile, download
from sadr.data.load import MalformedDatasetError, load_cases
from sadr.data.registry import FORMATS, DatasetFormat
from tests.data_fixtures import FIXTURES

BODY = (FIXTURES / "counterfact.json").read_bytes()
SHA = hashlib.sha256(BODY).hexdigest()


class FileServer:
    """Serves `files` (name -> bytes); honours Range unless `ignore_range`, or answers it with the bytes from
    `range_served_from`; a request without one is answered with a 206 from `whole_served_from` where set; a 206
    says where its bytes start (Content-Range) unless not `content_range`; `cut_after` drops the connection; `delay`
    (seconds) holds each response back."""

    def __init__(self):
        self.files = {"counterfact.json": BODY}
        self.ranges: list[str | None] = []  # the Range header of every request
        self.ignore_range = False
        self.range_served_from: int | None = None
        self.whole_served_from: int | None = None
        self.content_range = True
        self.cut_after: int | None = None
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.ranges.append(self.headers.get("Range"))
                time.sleep(server.delay)
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and not server.ignore_range:
                    start = int(match[1]) if server.range_served_from is None else server.range_served_from
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    if server.content_range:
                        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                elif server.whole_served_from is not None:
                    start = server.whole_served_from
                    self.send_response(206)
                    if server.content_range:
                        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                end = len(body) if server.cut_after is None else min(len(body), start + server.cut_after)
                self.wfile.write(body[start:end])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


def remote(server, **kw):
    return RemoteFile(server.url + "counterfact.json", **kw)


def test_downloads_verifies_and_renames(server, tmp_path):
    path = download(remote(server, size=len(BODY), sha256=SHA), tmp_path)
    assert path == tmp_path / "counterfact.json" and path.read_bytes() == BODY
    assert not (tmp_path / "counterfact.json.part").exists()
    assert server.ranges == [None]


def test_an_existing_file_is_not_fetched_again(server, tmp_path):
    (tmp_path / "counterfact.json").write_bytes(b"[]")
    assert download(remote(server), tmp_path).read_bytes() == b"[]"
    assert server.ranges == []
    assert [path.name for path in tmp_path.iterdir()] == ["counterfact.json"]  # nor its folder written to (a lock)


def test_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    (tmp_path / "counterfact.json.part").write_bytes(BODY[:1000])
    path = download(remote(server, size=len(BODY), sha256=SHA), tmp_path)
    assert server.ranges == ["bytes=1000-"]
    assert path.read_bytes() == BODY


def test_restarts_when_the_server_ignores_the_range(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "counterfact.json.part").write_bytes(b"garbage that must not stay in front")
    assert download(remote(server, sha256=SHA), tmp_path).read_bytes() == BODY


@pytest.mark.parametrize("served_from", [0, 500])
def test_a_range_answered_from_another_byte_is_not_appended_to_the_partial_file(server, tmp_path, served_from):
    """A server (or proxy) whose 206 holds the bytes from 0 or from 500, not from 1000 as asked: the bytes from 0 are
    the file from its start; those from 500 are of no use, so the file is asked for again whole."""
    server.range_served_from = served_from
    (tmp_path / "counterfact.json.part").write_bytes(BODY[:1000])
    assert download(remote(server), tmp_path).read_bytes() == BODY  # neither size nor sha256 known to catch it
    assert server.ranges == ["bytes=1000-"] + [None] * (served_from != 0)


def test_a_range_answered_without_content_range_is_not_kept(server, tmp_path):
    """A 206 that does not say where its bytes start (here from 0, not from 1000 as asked) may hold any part of the
    file: neither appended to the partial file nor taken for the file from its start; the file is asked for whole."""
    server.range_served_from, server.content_range = 0, False
    (tmp_path / "counterfact.json.part").write_bytes(BODY[:1000])
    assert download(remote(server), tmp_path).read_bytes() == BODY
    assert server.ranges == ["bytes=1000-", None]


def test_part_of_the_file_sent_for_the_whole_is_an_error_that_keeps_nothing(server, tmp_path):
    server.whole_served_from = 500
    with pytest.raises(DownloadError, match=r"asked for the whole file, the server sent part of it \(bytes 500-"):
        download(remote(server), tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["counterfact.json.lock"]  # no partial file to resume


def test_a_complete_part_file_is_only_verified(server, tmp_path):
    (tmp_path / "counterfact.json.part").write_bytes(BODY)
    assert download(remote(server, size=len(BODY), sha256=SHA), tmp_path).read_bytes() == BODY
    assert server.ranges == []


def test_an_interrupted_download_keeps_its_part_and_the_next_call_resumes(server, tmp_path):
    server.cut_after = 700
    with pytest.raises(
        DownloadError, match="closed after 700 of .* bytes.*partial file .*counterfact.json.part is kept"
    ):
        download(remote(server, sha256=SHA), tmp_path)
    assert not (tmp_path / "counterfact.json").exists()  # nothing unverified under the final name
    assert (tmp_path / "counterfact.json.part").read_bytes() == BODY[:700]
    server.cut_after = None
    assert download(remote(server, sha256=SHA), tmp_path).read_bytes() == BODY
    assert server.ranges == [None, "bytes=700-"]


def test_concurrent_downloads_of_one_file_fetch_it_once(server, tmp_path):
    server.delay = 0.2
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(download(remote(server, sha256=SHA), tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.read_bytes() for p in results] == [BODY] * 3
    assert server.ranges == [None]


def test_checksum_mismatch_deletes_the_download(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"has sha256 {SHA}, expected {'0' * 64}; the download was deleted. set it"):
        download(remote(server, sha256="0" * 64), tmp_path, hint="set it")
    assert not (tmp_path / "counterfact.json").exists() and not (tmp_path / "counterfact.json.part").exists()


def test_a_mismatch_without_a_hint_ends_with_its_sentence(server, tmp_path):
    with pytest.raises(ChecksumError) as err:
        download(remote(server, sha256="0" * 64), tmp_path)
    assert str(err.value).endswith("expected " + "0" * 64 + "; the download was deleted.")


def test_size_mismatch_deletes_an_oversized_download(server, tmp_path):
    (tmp_path / "counterfact.json.part").write_bytes(BODY + b"extra")
    with pytest.raises(ChecksumError, match=f"has {len(BODY) + 5} bytes, expected {len(BODY)}"):
        download(remote(server, size=len(BODY)), tmp_path)
    assert not (tmp_path / "counterfact.json").exists() and not (tmp_path / "counterfact.json.part").exists()


def test_http_errors_name_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"could not download http://127\.0\.0\.1:\d+/missing.json: HTTP Error 404"):
        download(RemoteFile(server.url + "missing.json"), tmp_path)


def test_a_server_that_does_not_answer_in_http_is_a_download_error(tmp_path):
    """http.client's errors that are not OSErrors (here BadStatusLine) are reported as any other failed download."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer():
            connection, _ = listener.accept()
            with connection:
                connection.recv(1024)
                connection.sendall(b"garbage\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/counterfact.json"
        with pytest.raises(DownloadError, match=f"could not download {re.escape(url)}: .*garbage"):
            download(RemoteFile(url), tmp_path)
        thread.join()


def closed_port_url(name):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"  # nothing listens there any more


def test_offline_error_says_where_to_get_the_file_and_which_key_to_set(tmp_path, monkeypatch):
    url = closed_port_url("counterfact.json")
    monkeypatch.setitem(FORMATS, "counterfact", DatasetFormat(FORMATS["counterfact"].parse, RemoteFile(url)))
    with pytest.raises(DownloadError) as err:
        load_cases(DatasetConfig(name="counterfact"), tmp_path)
    message = str(err.value)
    assert f"could not download {url}" in message
    assert f"download {url} and set dataset.path=/path/to/counterfact.json" in message


def test_load_cases_downloads_into_the_cache(server, tmp_path):
    loaded = load_cases(DatasetConfig(name="counterfact", url=server.url + "counterfact.json", sha256=SHA), tmp_path)
    assert loaded.source == str(tmp_path / "datasets" / "counterfact.json")
    assert [c.case_id for c in loaded.cases] == [100, 101, 102]
    # the canonical checksum belongs to the canonical URL only; dataset.sha256 overrides it
    with pytest.raises(ChecksumError, match="set dataset.path="):
        load_cases(
            DatasetConfig(name="counterfact", url=server.url + "counterfact.json", sha256="f" * 64), tmp_path / "other"
        )


def test_canonical_checksum_applies_to_the_canonical_url(server, tmp_path, monkeypatch):
    url = server.url + "counterfact.json"
    canonical = DatasetFormat(FORMATS["counterfact"].parse, RemoteFile(url, size=len(BODY), sha256="e" * 64))
    monkeypatch.setitem(FORMATS, "counterfact", canonical)
    with pytest.raises(ChecksumError, match="expected " + "e" * 64):
        load_cases(DatasetConfig(name="counterfact", url=url), tmp_path)
    assert load_cases(DatasetConfig(name="counterfact", url=url, sha256=SHA), tmp_path).cases


def test_a_complete_part_file_of_unknown_size_is_finished_by_a_416(server, tmp_path):
    """Without a known size a whole .part is still asked for its rest; the server's 416 means it is complete."""
    (tmp_path / "counterfact.json.part").write_bytes(BODY)
    assert download(remote(server, sha256=SHA), tmp_path).read_bytes() == BODY
    assert server.ranges == [f"bytes={len(BODY)}-"]


def test_an_upper_case_sha256_is_accepted(server, tmp_path):
    """Digests are compared case-insensitively (a hex digest pasted in upper case is the same digest)."""
    assert download(remote(server, sha256=SHA.upper()), tmp_path).read_bytes() == BODY


def test_a_failed_request_promises_no_resume_when_nothing_was_kept(server, tmp_path):
    """A 404 leaves no partial file, so its message must not say that one is kept and resumed."""
    with pytest.raises(DownloadError) as err:
        download(RemoteFile(server.url + "missing.json"), tmp_path)
    assert "HTTP Error 404" in str(err.value) and "kept" not in str(err.value)
    assert not (tmp_path / "missing.json.part").exists()


def test_dataset_size_is_checked(server, tmp_path):
    """dataset.size, like dataset.sha256, is verified for a dataset.url."""
    cfg = DatasetConfig(name="counterfact", url=server.url + "counterfact.json", size=len(BODY) - 1)
    with pytest.raises(ChecksumError, match=f"has {len(BODY)} bytes, expected {len(BODY) - 1}"):
        load_cases(cfg, tmp_path)


def test_a_downloaded_file_that_is_not_json_advises_deleting_it(server, tmp_path):
    """A cached download that is not JSON (e.g. an HTML error page) is fixed by fetching it again."""
    server.files["page.json"] = b"<html>moved</html>"
    with pytest.raises(MalformedDatasetError, match=r"page\.json: not valid JSON .*; fix it, or delete it to download"):
        load_cases(DatasetConfig(name="counterfact", url=server.url + "page.json"), tmp_path)


def test_canonical_files_have_the_published_size_and_sha256():
    """The registry verifies the canonical downloads against the sizes and digests published in the data notes."""
    assert FORMATS["counterfact"].remote == RemoteFile(
        ROME_DATA_URL + "counterfact.json",
        45_108_470,
        "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f",
    )
    assert (FORMATS["sadr_merged"].remote.size, FORMATS["sadr_merged"].remote.sha256) == (
        3_746_414, "39ba477f5a69989e7b8b856a72f67f533893c7d0e6944437fec800af99392f83"
    )
