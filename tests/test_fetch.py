"""fetch.download against a real HTTP server on 127.0.0.1, and extract_zip on crafted archives.

The network never leaves 127.0.0.1. Faults are real where they can be (a cut
connection, a 404, a closed port); a full disk and Ctrl-C are injected.
"""

from __future__ import annotations

import errno
import hashlib
import io
import re
import shutil
import socket
import stat
import struct
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src import fetch
from src.errors import UserError

# --- an archive of real images -----------------------------------------------------


def _image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    # Noise does not compress, so the archive spans many download chunks.
    pixels = rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def archive_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("scenes/coast/a.png", _image_bytes(rng, "PNG"))
        zf.writestr("scenes/coast/b.jpg", _image_bytes(rng, "JPEG"))
        zf.writestr("scenes/street/c.png", _image_bytes(rng, "PNG"))
        zf.writestr("scenes/street/d.jpg", _image_bytes(rng, "JPEG"))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a local HTTP server with fault modes ------------------------------------------


@dataclass
class Server:
    url: str
    body: bytes
    mode: str = "ok"  # ok | cut | 404 | 500 | norange
    cut_after: int = 150_000  # bytes of body sent before a "cut" drops the connection
    ranges: list = field(default_factory=list)  # the Range header of each request, or None


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv: Server = self.server.state
        srv.ranges.append(self.headers.get("Range"))
        if srv.mode in ("404", "500"):
            self.send_error(int(srv.mode))
            return
        body, start = srv.body, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and srv.mode != "norange":
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if srv.mode == "cut":
            payload = payload[: srv.cut_after]
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
            pass


@pytest.fixture
def server(archive_bytes):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    httpd.state = Server(url=f"http://{host}:{port}/scenes.zip", body=archive_bytes)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # A proxy from the environment must not carry 127.0.0.1 requests off this machine.
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- download ------------------------------------------------------------------


def test_download_whole_file_with_progress(server, tmp_path, capsys):
    dest = tmp_path / "cache" / "scenes.zip"
    assert fetch.download(server.url, dest, sha256=_sha(server.body)) == dest
    assert dest.read_bytes() == server.body
    assert not dest.with_name("scenes.zip.part").exists()
    assert server.ranges == [None]
    err = capsys.readouterr().err
    assert "scenes.zip" in err and "100%" in err


def test_no_progress_bar_when_disabled(server, tmp_path, capsys):
    fetch.download(server.url, tmp_path / "scenes.zip", progress=False)
    assert (tmp_path / "scenes.zip").read_bytes() == server.body
    assert "100%" not in capsys.readouterr().err


def test_existing_file_is_used_without_network(server, tmp_path):
    dest = tmp_path / "scenes.zip"
    fetch.download(server.url, dest, progress=False)
    fetch.download(server.url, dest, progress=False)
    fetch.download(server.url, dest, sha256=_sha(server.body), progress=False)
    assert len(server.ranges) == 1


def test_existing_file_failing_the_pin_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "scenes.zip"
    dest.write_bytes(b"stale archive")
    fetch.download(server.url, dest, sha256=_sha(server.body), progress=False)
    assert dest.read_bytes() == server.body
    assert len(server.ranges) == 1


def test_resume_after_a_cut(server, tmp_path):
    dest = tmp_path / "scenes.zip"
    part = tmp_path / "scenes.zip.part"
    server.mode = "cut"
    with pytest.raises(UserError, match="re-run to resume"):
        fetch.download(server.url, dest, progress=False)
    assert not dest.exists()
    kept = part.stat().st_size  # whole chunks up to the cut: the last partial read is lost
    assert 0 < kept <= server.cut_after
    server.mode = "ok"
    fetch.download(server.url, dest, sha256=_sha(server.body), progress=False)
    assert server.ranges == [None, f"bytes={kept}-"]
    assert _sha(dest.read_bytes()) == _sha(server.body)
    assert not part.exists()


def test_complete_part_is_finished_on_416(server, tmp_path):
    (tmp_path / "scenes.zip.part").write_bytes(server.body)
    dest = fetch.download(server.url, tmp_path / "scenes.zip", progress=False)
    assert server.ranges == [f"bytes={len(server.body)}-"]
    assert dest.read_bytes() == server.body


def test_server_ignoring_range_starts_over(server, tmp_path):
    (tmp_path / "scenes.zip.part").write_bytes(b"x" * 1000)  # not a prefix: must be discarded
    server.mode = "norange"
    dest = fetch.download(server.url, tmp_path / "scenes.zip", progress=False)
    assert server.ranges == ["bytes=1000-"]
    assert dest.read_bytes() == server.body


def test_checksum_mismatch_removes_the_file(server, tmp_path):
    dest = tmp_path / "scenes.zip"
    with pytest.raises(UserError) as info:
        fetch.download(server.url, dest, sha256="0" * 64, progress=False)
    message = str(info.value)
    assert "0" * 64 in message and _sha(server.body) in message and "data.sha256" in message
    assert not dest.exists() and not (tmp_path / "scenes.zip.part").exists()


@pytest.mark.parametrize("code", ["404", "500"])
def test_http_error_names_the_code_and_url(server, tmp_path, code):
    server.mode = code
    with pytest.raises(UserError, match=f"HTTP {code}") as info:
        fetch.download(server.url, tmp_path / "scenes.zip", progress=False)
    assert server.url in str(info.value)
    assert not (tmp_path / "scenes.zip").exists()


def test_unreachable_host_points_to_offline_sources(tmp_path):
    port = _closed_port()
    with pytest.raises(UserError) as info:
        fetch.download(
            f"http://127.0.0.1:{port}/scenes.zip",
            tmp_path / "scenes.zip",
            progress=False,
            timeout=2,
        )
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "data.source=synthetic" in message
    assert "data.source=samples" in message  # real photos, offline too
    assert "\n" not in message


def test_ctrl_c_keeps_the_part_and_the_next_run_resumes(server, tmp_path, monkeypatch):
    class InterruptedBar(fetch.tqdm):
        def update(self, n=1):
            super().update(n)
            raise KeyboardInterrupt  # after the first chunk is on disk

    monkeypatch.setattr(fetch, "tqdm", InterruptedBar)
    dest = tmp_path / "scenes.zip"
    part = tmp_path / "scenes.zip.part"
    with pytest.raises(KeyboardInterrupt):
        fetch.download(server.url, dest, progress=False)
    assert not dest.exists()
    kept = part.stat().st_size
    assert 0 < kept < len(server.body)

    monkeypatch.undo()
    fetch.download(server.url, dest, progress=False)
    assert server.ranges[-1] == f"bytes={kept}-"
    assert _sha(dest.read_bytes()) == _sha(server.body)


def test_full_disk_keeps_the_part_and_says_how_much_is_needed(server, tmp_path, monkeypatch):
    class FullDisk(io.FileIO):
        def write(self, data):
            if self.tell() > 0:  # the first chunk fits, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(fetch, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    dest = tmp_path / "scenes.zip"
    part = tmp_path / "scenes.zip.part"
    with pytest.raises(UserError, match="no space left") as info:
        fetch.download(server.url, dest, progress=False)
    kept = part.stat().st_size
    assert 0 < kept < len(server.body)
    assert f"({len(server.body) - kept} bytes) more" in str(info.value)
    assert "free" in str(info.value)
    assert not dest.exists()

    monkeypatch.undo()
    fetch.download(server.url, dest, progress=False)
    assert server.ranges[-1] == f"bytes={kept}-"
    assert dest.read_bytes() == server.body


# --- extract_zip -----------------------------------------------------------------


def _zip(path: Path, entries: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_extract_all_images(tmp_path, archive_bytes):
    archive = tmp_path / "scenes.zip"
    archive.write_bytes(archive_bytes)
    files = fetch.extract_zip(archive, tmp_path / "out")
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in files)
    assert names == [
        "scenes/coast/a.png",
        "scenes/coast/b.jpg",
        "scenes/street/c.png",
        "scenes/street/d.jpg",
    ]
    with zipfile.ZipFile(archive) as zf:
        assert (tmp_path / "out/scenes/street/d.jpg").read_bytes() == zf.read("scenes/street/d.jpg")
    with Image.open(tmp_path / "out/scenes/coast/a.png") as image:
        assert image.size == (192, 192)


def test_members_filter_and_directories_skipped(tmp_path, archive_bytes):
    archive = tmp_path / "scenes.zip"
    archive.write_bytes(archive_bytes)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.mkdir("scenes/empty")
    files = fetch.extract_zip(archive, tmp_path / "out", members=lambda name: "/coast/" in name)
    assert sorted(p.name for p in files) == ["a.png", "b.jpg"]
    assert not (tmp_path / "out/scenes/street").exists()
    assert not (tmp_path / "out/scenes/empty").exists()


def test_entries_landing_on_one_path_are_written_once_the_first_winning(tmp_path):
    archive = tmp_path / "repeats.zip"
    entries = [("x/a.png", b"1"), ("x/./a.png", b"2"), ("x/a.png", b"3"), ("x\\a.png", b"4")]
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(archive, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    files = fetch.extract_zip(archive, tmp_path / "out")
    assert files == [tmp_path / "out/x/a.png"]
    assert files[0].read_bytes() == b"1"
    assert {fetch.entry_path(name) for name, _ in entries} == {"x/a.png"}


@pytest.mark.parametrize(
    "name",
    [
        "../evil.png",
        "images/../../evil.png",
        "/abs/path.png",
        "C:/windows/evil.png",
        "..\\evil.png",
    ],
)
def test_zip_slip_is_rejected(tmp_path, name):
    archive = _zip(tmp_path / "bad.zip", {"ok.png": b"fine", name: b"evil"})
    with pytest.raises(UserError, match="outside the extraction folder") as info:
        fetch.extract_zip(archive, tmp_path / "out" / "inner")
    assert repr(name) in str(info.value)
    assert not list(tmp_path.rglob("evil.png"))
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_symlink_entry_is_rejected(tmp_path):
    archive = _zip(tmp_path / "bad.zip", {"ok.png": b"fine"}, symlink="link.png")
    with pytest.raises(UserError, match="'link.png' is a symbolic link"):
        fetch.extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_many_entries_is_rejected(tmp_path):
    archive = _zip(tmp_path / "many.zip", {f"{i}.png": b"x" for i in range(11)})
    with pytest.raises(UserError, match="11 entries, more than the 10"):
        fetch.extract_zip(archive, tmp_path / "out", max_entries=10)
    assert len(fetch.extract_zip(archive, tmp_path / "out", max_entries=11)) == 11


def test_declared_total_over_the_cap_is_rejected(tmp_path):
    archive = _zip(tmp_path / "bomb.zip", {"a.bin": b"\0" * 600, "b.bin": b"\0" * 600})
    with pytest.raises(UserError, match="zip bomb"):
        fetch.extract_zip(archive, tmp_path / "out", max_total_bytes=1000)
    assert not (tmp_path / "out").exists()
    # The cap counts only the chosen members.
    assert (
        len(
            fetch.extract_zip(
                archive,
                tmp_path / "out",
                max_total_bytes=1000,
                members=lambda name: name == "a.bin",
            )
        )
        == 1
    )


def test_lying_size_header_never_writes_past_the_cap(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.bin", b"\0" * 100_000)
    data = bytearray(buf.getvalue())
    # Claim 100 bytes in both the local and the central header.
    struct.pack_into("<I", data, data.find(b"PK\x03\x04") + 22, 100)
    struct.pack_into("<I", data, data.find(b"PK\x01\x02") + 24, 100)
    archive = tmp_path / "liar.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(UserError, match="bomb.bin"):
        fetch.extract_zip(archive, tmp_path / "out", max_total_bytes=1000)
    written = sum(p.stat().st_size for p in tmp_path.joinpath("out").rglob("*") if p.is_file())
    assert written <= 1000


def test_streaming_cap_stops_a_body_larger_than_declared():
    out = io.BytesIO()
    writer = fetch._CappedWriter(out, limit=1000)
    with pytest.raises(fetch._OverCap):
        shutil.copyfileobj(io.BytesIO(b"\0" * 5000), writer, 256)
    assert len(out.getvalue()) <= 1000


@pytest.mark.parametrize("content", [b"this is not a zip", b""])
def test_corrupt_archive_is_a_user_error(tmp_path, content):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(content)
    with pytest.raises(UserError, match="not a readable zip"):
        fetch.extract_zip(archive, tmp_path / "out")


def test_truncated_archive_is_a_user_error(tmp_path, archive_bytes):
    archive = tmp_path / "cut.zip"
    archive.write_bytes(archive_bytes[: len(archive_bytes) // 2])
    with pytest.raises(UserError, match="cut.zip"):
        fetch.extract_zip(archive, tmp_path / "out")
