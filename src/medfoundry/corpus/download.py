"""Download MEDLINE/PubMed XML from NCBI: resumable, MD5-verified, never half-written.

NCBI publishes ``{base}/baseline/pubmedYYnNNNN.xml.gz`` (and ``updatefiles/``), each with a
``.md5`` sibling. Each file is streamed into ``NAME.part`` (resumed with an HTTP ``Range``
request when the part exists), verified against the published MD5, fsynced and renamed into
place, so a file under its final name is always complete. Files already present with the right
MD5 are skipped, so re-running the same command only verifies.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from medfoundry.errors import MedfoundryError, StageFailed
from medfoundry.io import fsync_dir, write_json, write_text

NCBI_PUBMED_URL = "https://ftp.ncbi.nlm.nih.gov/pubmed"
MANIFEST_NAME = "download_manifest.json"

_CHUNK = 1 << 20
_BACKOFF = 2.0  # seconds before the first retry; doubles on each further retry
_USER_AGENT = "medfoundry (corpus download)"
_HREF = re.compile(r'href="(?:[^"]*/)?([^"/?#]+\.xml\.gz)"', re.IGNORECASE)
_MD5 = re.compile(r"(?:^|=\s*)([0-9a-fA-F]{32})(?:\s|$)")  # "MD5(name)= hash" or "hash  name"
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)

T = TypeVar("T")


class _Retry(Exception):
    """A failed attempt worth repeating (truncated body, MD5 mismatch)."""


@dataclass
class DownloadReport:
    """What a run did, by ``subset/name``. ``resumed`` and ``replaced`` are subsets of
    ``downloaded``; ``replaced`` files were present locally with a wrong MD5."""

    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0

    def add(self, key: str, entry: dict[str, Any]) -> None:
        if entry["status"] == "failed":
            self.failed[key] = entry["error"]
            return
        getattr(self, entry["status"]).append(key)
        for flag in ("resumed", "replaced"):
            if entry.get(flag):
                getattr(self, flag).append(key)
        self.bytes += entry.get("bytes", 0)

    def summary(self) -> str:
        return (
            f"{len(self.downloaded)} downloaded ({len(self.resumed)} resumed, "
            f"{len(self.replaced)} replaced), {len(self.skipped)} already verified, "
            f"{len(self.failed)} failed, {self.bytes / 1e6:.1f} MB fetched"
        )


class DownloadError(StageFailed):
    """Some files could not be downloaded; ``report`` holds what the run did."""

    def __init__(self, report: DownloadReport):
        self.report = report
        lines = "\n".join(f"  {key}: {error}" for key, error in report.failed.items())
        super().__init__(
            f"{len(report.failed)} file(s) failed to download (re-run the same command to retry and resume):\n{lines}"
        )


def list_remote_files(base_url: str, subset: str, *, retries: int = 3, timeout: float = 60) -> list[str]:
    """Sorted ``.xml.gz`` names listed on the index page of ``{base_url}/{subset}/``."""
    page = _get_text(f"{base_url.rstrip('/')}/{subset}/", retries, timeout)
    return sorted(set(_HREF.findall(page)))


def download_pubmed(
    dest: Path,
    *,
    subsets: tuple[str, ...] = ("baseline",),
    base_url: str = NCBI_PUBMED_URL,
    limit: int | None = None,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = True,
) -> DownloadReport:
    """Mirror ``{base_url}/{subset}/*.xml.gz`` into ``dest/{subset}/`` (the first ``limit`` files
    of each subset when given) and record the run in ``dest/download_manifest.json``.

    Files that fail are recorded and the others still downloaded; then ``DownloadError`` is raised.
    """
    dest, base_url = Path(dest), base_url.rstrip("/")
    report = DownloadReport()
    manifest = _load_manifest(dest / MANIFEST_NAME, base_url)
    try:
        for subset in subsets:
            names = list_remote_files(base_url, subset, retries=retries, timeout=timeout)[:limit]
            for name in tqdm(names, desc=f"pubmed/{subset}", unit="file", disable=not progress):
                key, url = f"{subset}/{name}", f"{base_url}/{subset}/{name}"
                try:
                    entry = _sync_file(url, dest / subset / name, retries, timeout, progress)
                except MedfoundryError as exc:
                    entry = {"status": "failed", "error": str(exc)}
                report.add(key, entry)
                manifest["files"][key] = {"url": url, **entry, "checked_at": _now()}
    finally:
        manifest["updated_at"] = _now()
        write_json(dest / MANIFEST_NAME, manifest)
    if report.failed:
        raise DownloadError(report)
    return report


def md5_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def parse_md5(text: str, source: str) -> str:
    """The hash in NCBI's ``MD5(name)= <hash>`` or md5sum's ``<hash>  name`` format."""
    match = _MD5.search(text.strip())
    if not match:
        raise MedfoundryError(f"{source}: expected 'MD5(name)= <hash>' or '<hash>  name', got {text[:80]!r}")
    return match.group(1).lower()


def _sync_file(url: str, final: Path, retries: int, timeout: float, progress: bool) -> dict[str, Any]:
    """Make ``final`` a verified copy of ``url``; return its manifest entry."""
    md5_text = _get_text(url + ".md5", retries, timeout)
    expected = parse_md5(md5_text, url + ".md5")
    sidecar = final.with_name(final.name + ".md5")
    entry: dict[str, Any] = {"status": "skipped", "md5": expected}
    if final.exists():
        if md5_file(final) == expected:
            if not sidecar.exists():
                write_text(sidecar, md5_text)
            return {**entry, "size": final.stat().st_size}
        final.unlink()
        entry["replaced"] = True
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    with tqdm(desc=final.name, unit="B", unit_scale=True, leave=False, disable=not progress) as bar:
        received, resumed = _download_verified(url, part, expected, retries, timeout, bar)
    os.replace(part, final)
    fsync_dir(final.parent)
    write_text(sidecar, md5_text)
    size = final.stat().st_size
    return {**entry, "status": "downloaded", "size": size, "bytes": received, "resumed": resumed}


def _download_verified(
    url: str, part: Path, expected: str, retries: int, timeout: float, bar: tqdm
) -> tuple[int, bool]:
    """Fill ``part`` until its MD5 is ``expected``; return (bytes received, whether Range resumed it)."""
    received, resumed = 0, False

    def on_bytes(n: int) -> None:
        nonlocal received
        received += n
        bar.update(n)

    def attempt() -> None:
        nonlocal resumed
        resumed |= _fetch_into(url, part, timeout, bar, on_bytes)
        actual = md5_file(part)
        if actual != expected:
            part.unlink()
            raise _Retry(f"MD5 mismatch: expected {expected}, got {actual}")

    _retrying(url, retries, attempt)
    return received, resumed


def _fetch_into(url: str, part: Path, timeout: float, bar: tqdm, on_bytes: Callable[[int], None]) -> bool:
    """One request: append the rest of ``url`` to ``part`` (or rewrite it if the server ignores
    ``Range``). Return True when the server resumed with 206. Raise ``_Retry`` on a short body."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = _open(url, timeout, headers)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the part already holds the whole file: the MD5 decides
            return False
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        bar.reset(total=start + int(length) if length else None)
        bar.update(start)
        written = 0
        with open(part, "ab" if resumed else "wb") as fh:
            while chunk := response.read(_CHUNK):
                fh.write(chunk)
                written += len(chunk)
                on_bytes(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    if length and written < int(length):
        raise _Retry(f"connection dropped after {start + written} of {start + int(length)} bytes")
    return resumed


def _open(url: str, timeout: float, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, **(headers or {})})
    return urllib.request.urlopen(request, timeout=timeout)


def _get_text(url: str, retries: int, timeout: float) -> str:
    def attempt() -> bytes:
        with _open(url, timeout) as response:
            return response.read()

    return _retrying(url, retries, attempt).decode("utf-8", "replace")


def _retrying(url: str, retries: int, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` up to ``retries + 1`` times with exponential backoff on transient errors
    (connection failures, timeouts, HTTP 5xx, ``_Retry``); other HTTP errors fail at once."""
    for n in range(retries + 1):
        try:
            return attempt()
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                hint = " (not on the server: check the base URL and subset)" if exc.code == 404 else ""
                raise StageFailed(f"{url}: HTTP {exc.code} {exc.reason}{hint}") from None
            error = f"HTTP {exc.code} {exc.reason}"
        except _Retry as exc:
            error = str(exc)
        except _TRANSIENT as exc:
            error = f"{type(exc).__name__}: {exc}"
        if n < retries:
            time.sleep(_BACKOFF * 2**n)
    raise StageFailed(f"{url}: failed after {retries + 1} attempt(s); last error: {error}")


def _load_manifest(path: Path, base_url: str) -> dict[str, Any]:
    """The previous run's manifest (entries of other subsets are kept), or a fresh one."""
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if previous.get("base_url") != base_url:
        previous = {}
    return {"base_url": base_url, "files": previous.get("files", {})}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
