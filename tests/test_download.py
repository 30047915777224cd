"""PubMed downloader against a local HTTP server that can drop, corrupt, refuse ranges and 404."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medfoundry.corpus import download
from medfoundry.corpus.download import DownloadError, download_pubmed, list_remote_files, parse_md5
from medfoundry.errors import MedfoundryError

BASELINE = ["pubmed25n0001.xml.gz", "pubmed25n0002.xml.gz", "pubmed25n0003.xml.gz"]
UPDATE = "pubmed25n0004.xml.gz"


@dataclass
class ServerState:
    root: Path
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    cut: dict[str, int] = field(default_factory=dict)  # path -> send only N bytes, once
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> serve a bad body this many times
    fail: dict[str, list[int]] = field(default_factory=dict)  # path -> error statuses to send first
    ignore_range: bool = False

    def ranges(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        state, path = self.state, self.path
        state.requests.append((path, self.headers.get("Range")))
        if state.fail.get(path):
            return self.send_error(state.fail[path].pop(0))
        file = state.root / path.lstrip("/")
        file = file / "index.html" if file.is_dir() else file
        if not file.is_file():
            return self.send_error(404)
        data = file.read_bytes()
        if state.corrupt.get(path):
            state.corrupt[path] -= 1
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start, status = 0, 200
        if self.headers.get("Range") and not state.ignore_range:
            start, status = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if path in state.cut:
            body = body[: state.cut.pop(path)]
            self.close_connection = True
        self.wfile.write(body)


def _publish(directory: Path, names: list[str]) -> None:
    directory.mkdir(parents=True)
    links = ['<a href="../">Parent Directory</a>', '<a href="README.txt">README.txt</a>']
    for name in names:
        rng = random.Random(name)
        xml = b"<PubmedArticleSet>" + rng.randbytes(40_000).hex().encode() + b"</PubmedArticleSet>"
        data = gzip.compress(xml, mtime=0)
        (directory / name).write_bytes(data)
        (directory / f"{name}.md5").write_text(f"MD5({name})= {hashlib.md5(data).hexdigest()}\n")
        links += [f'<a href="{name}">{name}</a>', f'<a href="{name}.md5">{name}.md5</a>']
    links.append('<a href="pubmed25_stats.html">stats</a>')
    listing = "\n".join(reversed(links))  # unsorted, like a listing sorted by date
    (directory / "index.html").write_text(f"<html><body><pre>\n{listing}\n</pre></body></html>")


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "_BACKOFF", 0)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "remote"
    _publish(root / "pubmed" / "baseline", BASELINE)
    _publish(root / "pubmed" / "updatefiles", [UPDATE])
    state = ServerState(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("BoundHandler", (Handler,), {"state": state}))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/pubmed"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _run(server: ServerState, dest: Path, **kwargs) -> download.DownloadReport:
    return download_pubmed(dest, base_url=server.url, progress=False, timeout=5, **kwargs)


def _remote(server: ServerState, name: str, subset: str = "baseline") -> bytes:
    return (server.root / "pubmed" / subset / name).read_bytes()


def _keys(names: list[str], subset: str = "baseline") -> list[str]:
    return [f"{subset}/{name}" for name in names]


def test_parse_md5_formats():
    digest = "0123456789abcdef0123456789ABCDEF"
    assert parse_md5(f"MD5(pubmed25n0001.xml.gz)= {digest}\n", "x") == digest.lower()
    assert parse_md5(f"{digest}  pubmed25n0001.xml.gz\n", "x") == digest.lower()
    with pytest.raises(MedfoundryError, match="x.md5"):
        parse_md5("<html>not found</html>", "x.md5")


def test_list_remote_files(server):
    assert list_remote_files(server.url, "baseline") == BASELINE
    with pytest.raises(MedfoundryError, match=r"/pubmed/nope/: HTTP 404"):
        list_remote_files(server.url, "nope")


def test_full_download_then_rerun_skips(server, tmp_path):
    dest = tmp_path / "out"
    report = _run(server, dest)
    assert report.downloaded == _keys(BASELINE)
    assert report.skipped == report.resumed == report.replaced == [] and report.failed == {}
    assert report.bytes == sum(len(_remote(server, name)) for name in BASELINE)
    for name in BASELINE:
        assert (dest / "baseline" / name).read_bytes() == _remote(server, name)
        published = (server.root / "pubmed" / "baseline" / f"{name}.md5").read_text()
        assert (dest / "baseline" / f"{name}.md5").read_text() == published
    assert not list(dest.rglob("*.part"))
    manifest = json.loads((dest / "download_manifest.json").read_text())
    assert manifest["base_url"] == server.url
    entry = manifest["files"]["baseline/pubmed25n0001.xml.gz"]
    assert entry["status"] == "downloaded" and entry["size"] == len(_remote(server, BASELINE[0]))
    assert entry["md5"] == hashlib.md5(_remote(server, BASELINE[0])).hexdigest() and entry["checked_at"]

    server.requests.clear()
    again = _run(server, dest)
    assert again.skipped == _keys(BASELINE) and again.downloaded == [] and again.bytes == 0
    assert not [p for p, _ in server.requests if p.endswith(".xml.gz")]
    manifest = json.loads((dest / "download_manifest.json").read_text())
    assert {entry["status"] for entry in manifest["files"].values()} == {"skipped"}


def test_resume_from_existing_part_uses_range(server, tmp_path):
    dest, name = tmp_path / "out", BASELINE[1]
    data = _remote(server, name)
    (dest / "baseline").mkdir(parents=True)
    (dest / "baseline" / f"{name}.part").write_bytes(data[:1000])
    report = _run(server, dest)
    assert server.ranges(f"/pubmed/baseline/{name}") == ["bytes=1000-"]
    assert report.resumed == [f"baseline/{name}"]
    assert (dest / "baseline" / name).read_bytes() == data
    assert report.bytes == sum(len(_remote(server, n)) for n in BASELINE) - 1000


def test_complete_part_left_before_rename_is_verified_and_kept(server, tmp_path):
    dest, name = tmp_path / "out", BASELINE[0]
    (dest / "baseline").mkdir(parents=True)
    (dest / "baseline" / f"{name}.part").write_bytes(_remote(server, name))
    _run(server, dest, limit=1)  # the server answers 416 to the range past the end
    assert (dest / "baseline" / name).read_bytes() == _remote(server, name)


def test_dropped_connection_leaves_only_part_then_rerun_completes(server, tmp_path):
    dest, name = tmp_path / "out", BASELINE[0]
    path = f"/pubmed/baseline/{name}"
    server.cut[path] = 5000
    with pytest.raises(DownloadError, match="connection dropped after 5000 of"):
        _run(server, dest, limit=1, retries=0)
    assert not (dest / "baseline" / name).exists()
    assert (dest / "baseline" / f"{name}.part").stat().st_size == 5000
    report = _run(server, dest, limit=1)
    assert server.ranges(path) == [None, "bytes=5000-"]
    assert report.resumed == [f"baseline/{name}"]
    assert (dest / "baseline" / name).read_bytes() == _remote(server, name)


def test_dropped_connection_is_retried_within_a_run(server, tmp_path):
    dest, name = tmp_path / "out", BASELINE[2]
    server.cut[f"/pubmed/baseline/{name}"] = 3000
    report = _run(server, dest)
    assert report.downloaded == _keys(BASELINE) and report.resumed == [f"baseline/{name}"]
    assert (dest / "baseline" / name).read_bytes() == _remote(server, name)


def test_corrupted_download_is_retried(server, tmp_path):
    dest, name = tmp_path / "out", BASELINE[0]
    path = f"/pubmed/baseline/{name}"
    server.corrupt[path] = 1
    report = _run(server, dest, limit=1)
    assert report.downloaded == [f"baseline/{name}"]
    assert server.ranges(path) == [None, None]  # the bad part was deleted, not resumed
    assert (dest / "baseline" / name).read_bytes() == _remote(server, name)


def test_persistent_corruption_fails_clearly(server, tmp_path):
    dest, name = tmp_path / "out", BASELINE[1]
    path = f"/pubmed/baseline/{name}"
    server.corrupt[path] = 99
    data = _remote(server, name)
    bad = data[:-1] + bytes([data[-1] ^ 0xFF])
    with pytest.raises(DownloadError) as info:
        _run(server, dest, retries=2)
    message = str(info.value)
    assert f"{server.url}/baseline/{name}" in message
    assert hashlib.md5(data).hexdigest() in message and hashlib.md5(bad).hexdigest() in message
    assert len(server.ranges(path)) == 3
    assert not (dest / "baseline" / name).exists() and not (dest / "baseline" / f"{name}.part").exists()
    assert info.value.report.downloaded == _keys([BASELINE[0], BASELINE[2]])
    manifest = json.loads((dest / "download_manifest.json").read_text())
    assert manifest["files"][f"baseline/{name}"]["status"] == "failed"


def test_404_fails_clearly_without_retrying(server, tmp_path):
    path = f"/pubmed/baseline/{BASELINE[0]}"
    server.fail[path] = [404]
    with pytest.raises(DownloadError, match=rf"{server.url}/baseline/{BASELINE[0]}: HTTP 404"):
        _run(server, tmp_path / "out", limit=1)
    assert len(server.ranges(path)) == 1


def test_server_errors_are_retried(server, tmp_path):
    path = f"/pubmed/baseline/{BASELINE[0]}"
    server.fail[path] = [503, 500]
    server.fail[path + ".md5"] = [502]
    report = _run(server, tmp_path / "out", limit=1)
    assert report.downloaded == [f"baseline/{BASELINE[0]}"] and len(server.ranges(path)) == 3


def test_limit_applies_per_subset(server, tmp_path):
    report = _run(server, tmp_path / "out", subsets=("baseline", "updatefiles"), limit=2)
    assert report.downloaded == _keys(BASELINE[:2]) + [f"updatefiles/{UPDATE}"]
    assert sorted(p.name for p in (tmp_path / "out" / "baseline").glob("*.xml.gz")) == BASELINE[:2]


def test_server_without_range_support_restarts(server, tmp_path):
    dest, name = tmp_path / "out", BASELINE[0]
    server.ignore_range = True
    (dest / "baseline").mkdir(parents=True)
    (dest / "baseline" / f"{name}.part").write_bytes(_remote(server, name)[:2000])
    report = _run(server, dest, limit=1)
    assert server.ranges(f"/pubmed/baseline/{name}") == ["bytes=2000-"]
    assert report.resumed == [] and report.bytes == len(_remote(server, name))
    assert (dest / "baseline" / name).read_bytes() == _remote(server, name)


def test_corrupt_local_file_is_replaced(server, tmp_path):
    dest, name = tmp_path / "out", BASELINE[0]
    (dest / "baseline").mkdir(parents=True)
    (dest / "baseline" / name).write_bytes(b"not what NCBI published")
    report = _run(server, dest, limit=1)
    assert report.replaced == report.downloaded == [f"baseline/{name}"]
    assert (dest / "baseline" / name).read_bytes() == _remote(server, name)
