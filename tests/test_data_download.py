"""Tests of bmrs.data.download against a local HTTP server (no internet needed)."""

from __future__ import annotations

import functools
import importlib
import hashlib
import http.server
import io
import os
import pickle
import re
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import bmrs.data.datasets as datasets_mod
from bmrs.data import SOURCES, Source, download, download_dataset, load_dataset, read_cifar10, write_idx
from bmrs.errors import DataError

# the package re-exports the function `download`, which shadows the submodule's attribute name
download_mod = importlib.import_module("bmrs.data.download")


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path == "/trickle":  # one byte every 0.1 s: each read arrives well within the socket timeout
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/'served' on 127.0.0.1 (random port) in a thread; yields (base URL, folder, server)."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(served)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served, httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_and_is_atomic(server, tmp_path, monkeypatch):
    base, served, httpd = server
    payload = os.urandom(3 * (1 << 20) + 123)  # several chunks
    (served / "blob.bin").write_bytes(payload)
    dest = tmp_path / "out" / "blob.bin"
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        # at rename time the destination does not exist yet and the full file sits next to it
        src, dst = Path(src), Path(dst)
        assert dst == dest and not dst.exists()
        assert src.parent == dst.parent and src.name.startswith(".blob.bin.")
        assert sha(src.read_bytes()) == sha(payload)
        replaced.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(download_mod.os, "replace", spy)
    assert download(f"{base}/blob.bin", dest, sha(payload), progress=False) == dest
    assert dest.read_bytes() == payload and len(replaced) == 1
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]
    assert (dest.stat().st_mode & 0o777) == 0o644

    # present with the right hash: no request at all (the server file may even be gone)
    (served / "blob.bin").unlink()
    count = len(httpd.requests)
    assert download(f"{base}/blob.bin", dest, sha(payload).upper(), progress=False) == dest
    assert len(httpd.requests) == count


def test_existing_file_with_wrong_hash_is_replaced(server, tmp_path):
    base, served, _ = server
    (served / "f").write_bytes(b"new content")
    dest = tmp_path / "f"
    dest.write_bytes(b"stale")
    download(f"{base}/f", dest, sha(b"new content"), progress=False)
    assert dest.read_bytes() == b"new content"


def test_progress_bar(server, tmp_path, capsys):
    base, served, _ = server
    (served / "f").write_bytes(b"abc" * 1000)
    download(f"{base}/f", tmp_path / "progress-file.bin", sha(b"abc" * 1000), progress=True)
    assert "progress-file.bin" in capsys.readouterr().err  # tqdm writes to stderr
    download(f"{base}/f", tmp_path / "quiet-file.bin", sha(b"abc" * 1000), progress=False)
    assert "quiet-file.bin" not in capsys.readouterr().err


def test_dest_is_a_folder(server, tmp_path):
    base, served, _ = server
    (served / "f").write_bytes(b"abc")
    (tmp_path / "out" / "f").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        download(f"{base}/f", tmp_path / "out" / "f", sha(b"abc"), progress=False)
    assert "cannot move" in str(e.value)
    assert no_leftovers(tmp_path / "out", ["f"])


def no_leftovers(folder: Path, allowed=()):
    return sorted(p.name for p in folder.iterdir()) == sorted(allowed)


def test_checksum_mismatch(server, tmp_path):
    base, served, _ = server
    (served / "f").write_bytes(b"tampered")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError) as e:
        download(f"{base}/f", out / "f", sha(b"original"), progress=False)
    msg = str(e.value)
    assert "SHA-256 mismatch" in msg and "\n" not in msg and ";" in msg
    assert no_leftovers(out)
    # an existing (older) dest stays untouched by a failed download
    (out / "f").write_bytes(b"old")
    with pytest.raises(DataError):
        download(f"{base}/f", out / "f", sha(b"original"), progress=False)
    assert (out / "f").read_bytes() == b"old" and no_leftovers(out, ["f"])


def test_http_404(server, tmp_path):
    base, _, _ = server
    with pytest.raises(DataError) as e:
        download(f"{base}/missing.gz", tmp_path / "missing.gz", "0" * 64, progress=False)
    assert "HTTP 404" in str(e.value) and "\n" not in str(e.value)
    assert no_leftovers(tmp_path, ["served"])


def test_truncated_body(server, tmp_path):
    base, _, _ = server
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        download(f"{base}/truncated", out / "t", progress=False, verify=False)
    assert re.search(r"10 bytes|10 of 1000|incomplete", str(e.value)), str(e.value)
    assert no_leftovers(out)


def test_a_trickling_server_is_a_stalled_download(server, tmp_path):
    base, _, _ = server
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(DataError, match="stalled"):
        download(f"{base}/trickle", out / "t", progress=False, verify=False, timeout=1.0)
    assert time.monotonic() - start < 10  # (the whole body would take 100 s)
    assert no_leftovers(out)


def test_connection_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as e:
        download(f"http://127.0.0.1:{port}/x", tmp_path / "x", "0" * 64, progress=False, timeout=5)
    assert "could not download" in str(e.value)
    assert no_leftovers(tmp_path)


def test_refuses_unverified_unless_asked(server, tmp_path):
    base, served, httpd = server
    (served / "f").write_bytes(b"data")
    with pytest.raises(DataError) as e:
        download(f"{base}/f", tmp_path / "f", progress=False)
    assert "verify=False" in str(e.value)
    assert not httpd.requests and no_leftovers(tmp_path, ["served"])
    with pytest.raises(DataError):
        download(f"{base}/f", tmp_path / "f", "abc", progress=False)  # malformed digest
    assert download(f"{base}/f", tmp_path / "f", progress=False, verify=False).read_bytes() == b"data"


def test_sources_registry():
    assert set(SOURCES) == {"mnist", "fashion-mnist", "cifar10", "tinyimagenet"}
    for name, source in SOURCES.items():
        assert source.mirrors and all(m.startswith(("http://", "https://")) for m in source.mirrors)
        for file_name, digest in source.files:
            assert digest is None or re.fullmatch(r"[0-9a-f]{64}", digest), (name, file_name)
    for name in ("mnist", "fashion-mnist"):
        names = [f for f, _ in SOURCES[name].files]
        assert names == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
        assert all(d is not None for _, d in SOURCES[name].files)
        assert len({d for _, d in SOURCES[name].files}) == 4
    assert dict(SOURCES["cifar10"].files)["cifar-10-python.tar.gz"].startswith("6d958be0")
    assert dict(SOURCES["fashion-mnist"].files)["train-images-idx3-ubyte.gz"].startswith("3aede38d")


def test_unverified_source_needs_verify_false(tmp_path):
    with pytest.raises(DataError) as e:
        download_dataset("tinyimagenet", tmp_path, mirror="http://127.0.0.1:9/", progress=False)
    # a command-line user has no verify=False: the message says where to fetch the file and put it
    assert "verify=False" in str(e.value) and "http://127.0.0.1:9/tiny-imagenet-200.zip" in str(e.value)
    assert str(tmp_path / "tinyimagenet") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError):
        download_dataset("imagenet", tmp_path)


def make_fashion_files(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(20) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(6) % 10).astype(np.uint8),
    }
    digests = {}
    for name, array in arrays.items():
        write_idx(folder / name, array)
        digests[name] = sha((folder / name).read_bytes())
    return digests


def test_load_dataset_download_from_mirror(server, tmp_path, monkeypatch):
    base, served, httpd = server
    digests = make_fashion_files(served)
    monkeypatch.setitem(SOURCES, "fashion-mnist",
                        Source("fashion-mnist", ("http://unused.invalid/",), tuple(digests.items())))
    monkeypatch.setattr(datasets_mod, "SYSTEM_DATA_DIRS", ())
    monkeypatch.delenv("BMRS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    with pytest.raises(DataError):
        load_dataset("fashion-mnist", data)  # download=False: not found
    splits = load_dataset("fashion-mnist", data, download=True, mirror=base + "/", progress=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 6)
    assert sorted(p.name for p in (data / "fashion-mnist").iterdir()) == sorted(digests)
    assert len(httpd.requests) == 4
    load_dataset("fashion-mnist", data, download=True, mirror=base, progress=False)
    assert len(httpd.requests) == 4  # found locally, nothing fetched again
    # default data dir when none is given
    load_dataset("fashion-mnist", download=True, mirror=base, progress=False)
    assert (tmp_path / "cache" / "bmrs" / "data" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_download_dataset_bad_mirror_file(server, tmp_path, monkeypatch):
    base, served, _ = server
    digests = make_fashion_files(served)
    digests["t10k-labels-idx1-ubyte.gz"] = "f" * 64
    monkeypatch.setitem(SOURCES, "fashion-mnist", Source("fashion-mnist", (base,), tuple(digests.items())))
    with pytest.raises(DataError) as e:
        download_dataset("fashion-mnist", tmp_path / "d", progress=False)
    assert "SHA-256 mismatch" in str(e.value) and "t10k-labels" in str(e.value)
    assert not (tmp_path / "d" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (tmp_path / "d" / "fashion-mnist").iterdir() if p.name.startswith(".")]


def make_tar(path: Path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cifar_members():
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3]}
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, protocol=2)
    return members


def test_download_and_extract_cifar(server, tmp_path, monkeypatch):
    base, served, httpd = server
    make_tar(served / "cifar-10-python.tar.gz", cifar_members())
    digest = sha((served / "cifar-10-python.tar.gz").read_bytes())
    monkeypatch.setitem(SOURCES, "cifar10", Source("cifar10", (base,), (("cifar-10-python.tar.gz", digest),), True))
    folder = download_dataset("cifar10", tmp_path / "d", progress=False)
    assert folder == tmp_path / "d" / "cifar10"
    x, y = read_cifar10(folder, train=True)
    assert x.shape == (15, 3, 32, 32) and y.tolist() == [1, 2, 3] * 5
    assert not [p for p in folder.iterdir() if p.name.startswith(".extract")]
    download_dataset("cifar10", tmp_path / "d", progress=False)  # idempotent
    assert len(httpd.requests) == 1


def test_malicious_tar_is_refused(server, tmp_path, monkeypatch):
    base, served, _ = server
    make_tar(served / "cifar-10-python.tar.gz", {"cifar-10-batches-py/ok": b"1", "../../escaped": b"evil"})
    digest = sha((served / "cifar-10-python.tar.gz").read_bytes())
    monkeypatch.setitem(SOURCES, "cifar10", Source("cifar10", (base,), (("cifar-10-python.tar.gz", digest),), True))
    with pytest.raises(DataError) as e:
        download_dataset("cifar10", tmp_path / "a" / "b", progress=False)
    assert "cannot extract" in str(e.value)
    assert not list(tmp_path.rglob("escaped"))
    assert not (tmp_path / "a" / "b" / "cifar10" / "cifar-10-batches-py").exists()


def test_corrupt_archive(server, tmp_path, monkeypatch):
    base, served, _ = server
    (served / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00not really a tarball")
    digest = sha((served / "cifar-10-python.tar.gz").read_bytes())
    monkeypatch.setitem(SOURCES, "cifar10", Source("cifar10", (base,), (("cifar-10-python.tar.gz", digest),), True))
    with pytest.raises(DataError) as e:
        download_dataset("cifar10", tmp_path, progress=False)
    assert "cannot extract" in str(e.value) and "download" in str(e.value)


def test_mirror_fallback(server, tmp_path, monkeypatch):
    base, served, httpd = server
    (served / "good").mkdir()
    (served / "good" / "f.bin").write_bytes(b"payload")
    monkeypatch.setitem(SOURCES, "mnist",
                        Source("mnist", (base + "/bad/", base + "/good/"), (("f.bin", sha(b"payload")),)))
    folder = download_dataset("mnist", tmp_path, progress=False)
    assert (folder / "f.bin").read_bytes() == b"payload"
    assert httpd.requests == ["/bad/f.bin", "/good/f.bin"]




def test_partial_downloads_abandoned_a_day_ago_are_removed(server, tmp_path):
    base, served, _ = server
    (served / "f.bin").write_bytes(b"payload")
    out = tmp_path / "out"
    out.mkdir()
    old, fresh = out / ".f.bin.abc123.part", out / ".f.bin.def456.part"
    for part in (old, fresh):
        part.write_bytes(b"half")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    download(f"{base}/f.bin", out / "f.bin", progress=False, verify=False)
    assert (out / "f.bin").read_bytes() == b"payload"
    assert not old.exists() and fresh.exists()  # (a fresh one may be another process's download)


def test_extraction_folders_abandoned_a_day_ago_are_removed(server, tmp_path, monkeypatch):
    base, served, _ = server
    make_tar(served / "cifar-10-python.tar.gz", cifar_members())
    digest = sha((served / "cifar-10-python.tar.gz").read_bytes())
    monkeypatch.setitem(SOURCES, "cifar10", Source("cifar10", (base,), (("cifar-10-python.tar.gz", digest),), True))
    folder = tmp_path / "d" / "cifar10"
    old, fresh = folder / ".extract-old", folder / ".extract-new"
    for leftover in (old, fresh):
        leftover.mkdir(parents=True)
        (leftover / "data_batch_1").write_bytes(b"half")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert download_dataset("cifar10", tmp_path / "d", progress=False) == folder
    assert not old.exists() and fresh.exists()
