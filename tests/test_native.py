"""Tests for etfs._sendfile_cffi: real sockets (socketpair and loopback TCP) and temp files.

Build the extension in place first: ``python etfs/_sendfile_cffi/build.py``.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import random
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

try:
    import etfs._sendfile_cffi as native
except ModuleNotFoundError as e:  # only a missing build is a skip; a missing `etfs` is an error
    if e.name != "etfs._sendfile_cffi._native":
        raise
    pytest.skip("cffi module not built: run `python etfs/_sendfile_cffi/build.py`", allow_module_level=True)

SIZES = [0, 1, 8 * 1024 * 1024 + 3]
SRC_OFF = 4097  # deliberately unaligned
DST_OFF = 12289
TIMEOUT = 60.0


class Worker(threading.Thread):
    """Run fn(*args) in a thread; finish() re-raises its exception or returns its result."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self._args = args
        self.result: Any = None
        self.exc: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as e:
            self.exc = e

    def finish(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "worker thread hung"
        if self.exc is not None:
            raise self.exc
        return self.result


def _data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


@pytest.fixture(params=["unix", "tcp"])
def sock_pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sending end, receiving end), both blocking."""
    if request.param == "unix":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        a, b = _tcp_pair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def fd_opener(tmp_path: Path) -> Iterator[Callable[..., int]]:
    fds: list[int] = []

    def opener(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        fd = os.open(path, flags, mode)
        fds.append(fd)
        return fd

    yield opener
    for fd in fds:
        os.close(fd)


def _src_file(tmp_path: Path, payload: bytes, tail: int = 17) -> tuple[Path, bytes]:
    """A file holding junk, payload at SRC_OFF, then more junk; returns (path, payload)."""
    p = tmp_path / "src"
    p.write_bytes(b"\x11" * SRC_OFF + payload + b"\x22" * tail)
    return p, payload


def _dst_file(tmp_path: Path, size: int) -> Path:
    """A destination prefilled with 0xAA so stray writes outside the range show."""
    p = tmp_path / "dst"
    p.write_bytes(b"\xaa" * (DST_OFF + size + 33))
    return p


def _check_dst(path: Path, payload: bytes) -> None:
    got = path.read_bytes()
    n = len(payload)
    assert got[:DST_OFF] == b"\xaa" * DST_OFF
    assert got[DST_OFF : DST_OFF + n] == payload
    assert got[DST_OFF + n :] == b"\xaa" * 33


# ---------------------------------------------------------------------------- senders


SenderFn = Callable[[int, int, int, int], int]


def _sendfile(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    return int(native.sendfile(sock_fd, file_fd, offset, count))


_LAST_BUF: dict[str, bytes] = {}


def _read_send_big(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    # buffer larger than the block: the whole block must be in buf afterwards
    buf = bytearray(count + 5)
    n = int(native.read_send(file_fd, sock_fd, offset, count, buf))
    _LAST_BUF["read_send"] = bytes(buf[:count])
    return n


def _read_send_small(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    # buffer smaller than the block: chunked transfer
    return int(native.read_send(file_fd, sock_fd, offset, count, memoryview(bytearray(65536 + 7))))


SENDERS: dict[str, SenderFn] = {
    "sendfile": _sendfile,
    "read_send_bigbuf": _read_send_big,
    "read_send_smallbuf": _read_send_small,
}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
@pytest.mark.parametrize("sender", list(SENDERS))
def test_sender_moves_exact_range(
    sender: str,
    size: int,
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
) -> None:
    a, b = sock_pair
    src, payload = _src_file(tmp_path, _data(size))
    fd = fd_opener(src)
    os.lseek(fd, 3, os.SEEK_SET)
    w = Worker(SENDERS[sender], a.fileno(), fd, SRC_OFF, size)
    got = _recv_exactly(b, size)
    assert w.finish() == size
    a.shutdown(socket.SHUT_WR)
    assert b.recv(16) == b"", "sender sent more than count"
    assert got == payload
    assert os.lseek(fd, 0, os.SEEK_CUR) == 3, "file position must not move"
    if sender == "read_send_bigbuf":
        assert _LAST_BUF["read_send"] == payload


@pytest.mark.parametrize("sender", list(SENDERS))
def test_sender_short_source_returns_short_count(
    sender: str,
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
) -> None:
    a, b = sock_pair
    src = tmp_path / "short"
    src.write_bytes(b"0123456789")
    fd = fd_opener(src)
    w = Worker(SENDERS[sender], a.fileno(), fd, 4, 100)
    got = _recv_exactly(b, 6)
    assert w.finish() == 6
    assert got == b"456789"


@pytest.mark.parametrize("sender", ["sendfile", "read_send_bigbuf"])
def test_sender_peer_closed_raises(
    sender: str,
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
) -> None:
    a, b = sock_pair
    src, _ = _src_file(tmp_path, _data(16 * 1024 * 1024))
    fd = fd_opener(src)
    b.close()
    with pytest.raises(OSError) as ei:
        SENDERS[sender](a.fileno(), fd, SRC_OFF, 16 * 1024 * 1024)
    assert ei.value.errno in (errno.EPIPE, errno.ECONNRESET)


def test_sender_nonblocking_socket_waits(tmp_path: Path, fd_opener: Callable[..., int]) -> None:
    a, b = _tcp_pair()
    try:
        a.setblocking(False)
        size = 8 * 1024 * 1024 + 3
        src, payload = _src_file(tmp_path, _data(size))
        fd = fd_opener(src)
        w = Worker(native.sendfile, a.fileno(), fd, SRC_OFF, size)
        got = _recv_exactly(b, size)
        assert w.finish() == size
        assert got == payload
        w = Worker(native.read_send, fd, a.fileno(), SRC_OFF, size, bytearray(1 << 20))
        assert _recv_exactly(b, size) == payload
        assert w.finish() == size
    finally:
        a.close()
        b.close()


def test_sender_rejects_bad_args(tmp_path: Path, fd_opener: Callable[..., int]) -> None:
    fd = fd_opener(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    with pytest.raises(ValueError):
        native.sendfile(0, fd, -1, 1)
    with pytest.raises(ValueError):
        native.read_send(fd, 0, 0, 1, bytearray())
    with pytest.raises(BufferError):  # read_send fills buf, so it must be writable
        native.read_send(fd, 0, 0, 1, cast(Any, b"immutable"))


# -------------------------------------------------------------------------- receivers


class RecvCase:
    """A receiver under test: call(sock_fd, file_fd, offset, count) -> int; buf if any."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.pipe: Any = None
        self.buf: bytearray | None = None
        if kind == "recv_write_bigbuf":
            self.buf = bytearray(size + 11)
        elif kind == "recv_write_smallbuf":
            self.buf = bytearray(65536 + 7)
        elif kind == "splice_recv":
            self.pipe = native.Pipe()
        else:
            raise AssertionError(kind)

    def __call__(self, sock_fd: int, file_fd: int, offset: int, count: int) -> int:
        if self.pipe is not None:
            return int(native.splice_recv(sock_fd, file_fd, offset, count, self.pipe))
        assert self.buf is not None
        return int(native.recv_write(sock_fd, file_fd, offset, count, memoryview(self.buf)))

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()


RECEIVERS = ["recv_write_bigbuf", "recv_write_smallbuf", "splice_recv"]


@pytest.fixture
def make_receiver() -> Iterator[Callable[[str, int], RecvCase]]:
    cases: list[RecvCase] = []

    def make(kind: str, size: int) -> RecvCase:
        c = RecvCase(kind, size)
        cases.append(c)
        return c

    yield make
    for c in cases:
        c.close()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
@pytest.mark.parametrize("receiver", RECEIVERS)
def test_receiver_moves_exact_range(
    receiver: str,
    size: int,
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
    make_receiver: Callable[[str, int], RecvCase],
) -> None:
    a, b = sock_pair
    payload = _data(size, seed=2)
    trailer = b"NEXT-BLOCK"
    dst = _dst_file(tmp_path, size)
    fd = fd_opener(dst, os.O_RDWR)
    rx = make_receiver(receiver, size)
    w = Worker(a.sendall, payload + trailer)
    assert rx(b.fileno(), fd, DST_OFF, size) == size
    # nothing beyond count was consumed from the stream
    assert _recv_exactly(b, len(trailer)) == trailer
    w.finish()
    _check_dst(dst, payload)
    assert os.lseek(fd, 0, os.SEEK_CUR) == 0, "file position must not move"
    if receiver == "recv_write_bigbuf":
        assert rx.buf is not None
        assert bytes(rx.buf[:size]) == payload


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_receiver_blocks_back_to_back(
    receiver: str,
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
    make_receiver: Callable[[str, int], RecvCase],
) -> None:
    """Several blocks on one stream land at their offsets, out of file order."""
    a, b = sock_pair
    block = 1024 * 1024 + 1
    payload = _data(4 * block, seed=3)
    order = [2, 0, 3, 1]
    dst = tmp_path / "dst"
    fd = fd_opener(dst, os.O_RDWR | os.O_CREAT)
    rx = make_receiver(receiver, block)
    w = Worker(a.sendall, b"".join(payload[i * block : (i + 1) * block] for i in order))
    for i in order:
        assert rx(b.fileno(), fd, i * block, block) == block
    w.finish()
    assert dst.read_bytes() == payload


def _send_then_close(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("receiver", RECEIVERS)
@pytest.mark.parametrize("sent", [0, 100, 3 * 65536 + 1])
def test_receiver_early_eof_raises(
    receiver: str,
    sent: int,
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
    make_receiver: Callable[[str, int], RecvCase],
) -> None:
    a, b = sock_pair
    want = 1024 * 1024
    fd = fd_opener(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    rx = make_receiver(receiver, want)
    w = Worker(_send_then_close, a, _data(sent))
    with pytest.raises(ConnectionResetError):
        rx(b.fileno(), fd, DST_OFF, want)
    w.finish()


def _pipe_pending(pipe: Any) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(pipe.r, termios.FIONREAD, buf)
    return buf[0]


def test_splice_recv_pipe_reset_after_error(
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
) -> None:
    """A failed splice (unwritable destination) leaves no stray bytes in the pipe."""
    a, b = sock_pair
    ro = fd_opener(_dst_file(tmp_path, 0))  # O_RDONLY: splice into it fails with EBADF
    with native.Pipe() as pipe:
        a.sendall(b"x" * 1000)
        with pytest.raises(OSError) as ei:
            native.splice_recv(b.fileno(), ro, 0, 1000, pipe)
        assert ei.value.errno == errno.EBADF
        assert not pipe.closed
        assert _pipe_pending(pipe) == 0
        # the pipe is usable for the next block
        dst = tmp_path / "ok"
        fd = fd_opener(dst, os.O_RDWR | os.O_CREAT)
        a.sendall(b"z" * 10)
        assert native.splice_recv(b.fileno(), fd, 0, 10, pipe) == 10
        assert dst.read_bytes() == b"z" * 10
    assert pipe.closed


def test_receiver_nonblocking_socket_waits(tmp_path: Path, fd_opener: Callable[..., int]) -> None:
    a, b = _tcp_pair()
    try:
        b.setblocking(False)
        size = 8 * 1024 * 1024 + 3
        payload = _data(size, seed=4)
        fd = fd_opener(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
        w = Worker(a.sendall, payload)
        assert native.recv_write(b.fileno(), fd, 0, size, bytearray(1 << 20)) == size
        w.finish()
        w = Worker(a.sendall, payload)
        with native.Pipe() as pipe:
            assert native.splice_recv(b.fileno(), fd, size, size, pipe) == size
        w.finish()
        assert (tmp_path / "dst").read_bytes() == payload + payload
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------- socket timeouts
#
# The data path uses blocking sockets whose SO_RCVTIMEO/SO_SNDTIMEO bound every wait;
# EAGAIN on such a socket means the timeout expired and must end the call with
# ETIMEDOUT instead of polling forever on a silent peer.

SOCK_TIMEOUT = 0.5
JOIN_TIMEOUT = 10.0  # the test itself must never hang, whatever the C code does


def _set_timeout(sock: socket.socket, opt: int, seconds: float) -> None:
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def _timed_call(fn: Callable[..., Any], *args: Any) -> tuple[BaseException | None, float]:
    """Run fn(*args) in a daemon thread; return (its exception, seconds it took)."""
    t0 = time.monotonic()
    w = Worker(fn, *args)
    w.join(JOIN_TIMEOUT)
    assert not w.is_alive(), f"{getattr(fn, '__name__', fn)} hung past its socket timeout"
    return w.exc, time.monotonic() - t0


@pytest.mark.parametrize("receiver", RECEIVERS)
@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
def test_receiver_times_out_on_silent_peer(
    receiver: str,
    nonblocking: bool,
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
    make_receiver: Callable[[str, int], RecvCase],
) -> None:
    a, b = sock_pair
    _set_timeout(b, socket.SO_RCVTIMEO, SOCK_TIMEOUT)
    if nonblocking:
        os.set_blocking(b.fileno(), False)
    fd = fd_opener(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    rx = make_receiver(receiver, 1 << 20)
    a.sendall(b"x" * 1000)  # some data, then silence: the timeout applies mid-block too
    exc, took = _timed_call(rx, b.fileno(), fd, 0, 1 << 20)
    assert isinstance(exc, TimeoutError), repr(exc)
    assert exc.errno == errno.ETIMEDOUT
    assert took < SOCK_TIMEOUT + 1.5
    if receiver == "splice_recv":
        assert not rx.pipe.closed  # reset, still usable


def _fill_and_stall(
    sock_pair: tuple[socket.socket, socket.socket], nonblocking: bool
) -> tuple[socket.socket, socket.socket]:
    """Small buffers and a 0.5 s send timeout on the sender; the peer never reads."""
    a, b = sock_pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    _set_timeout(a, socket.SO_SNDTIMEO, SOCK_TIMEOUT)
    if nonblocking:
        os.set_blocking(a.fileno(), False)
    return a, b


@pytest.mark.parametrize("sender", list(SENDERS))
@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking", "nonblocking"])
def test_sender_times_out_on_full_buffer(
    sender: str,
    nonblocking: bool,
    sock_pair: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    fd_opener: Callable[..., int],
) -> None:
    a, _ = _fill_and_stall(sock_pair, nonblocking)
    size = 64 * 1024 * 1024
    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.truncate(size)  # sparse: reading it costs nothing
    fd = fd_opener(src)
    exc, took = _timed_call(SENDERS[sender], a.fileno(), fd, 0, size)
    assert isinstance(exc, TimeoutError), repr(exc)
    assert exc.errno == errno.ETIMEDOUT
    assert took < SOCK_TIMEOUT + 2.0


def test_pipe_size() -> None:
    with native.Pipe() as p:
        assert p.size >= 65536
        try:
            max_size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        except OSError:
            max_size = p.size
        assert p.size == max_size or os.geteuid() != 0
        assert not os.get_inheritable(p.r)
        assert not os.get_inheritable(p.w)
    with native.Pipe(size=65536) as p:
        assert p.size == 65536
    p.close()  # idempotent


# ---------------------------------------------------------------------------- openat2


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """root/a/b/file.txt, root/inner -> a/b/file.txt, root/out_abs -> /etc,
    root/out_rel -> ../outside; yields (O_PATH dirfd of root, root)."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "file.txt").write_bytes(b"inside")
    (tmp_path / "outside").write_bytes(b"secret")
    (root / "inner").symlink_to("a/b/file.txt")
    (root / "out_abs").symlink_to("/etc")
    (root / "out_rel").symlink_to("../outside")
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        yield dirfd, root
    finally:
        os.close(dirfd)


def _read_fd(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def test_openat2_nested_path_allowed(tree: tuple[int, Path]) -> None:
    dirfd, _ = tree
    beneath = native.RESOLVE_BENEATH | native.RESOLVE_NO_MAGICLINKS
    fd = native.openat2(dirfd, "a/b/file.txt", os.O_RDONLY, resolve=beneath)
    assert not os.get_inheritable(fd), "O_CLOEXEC must be set"
    assert _read_fd(fd) == b"inside"
    # '..' that stays inside and a relative symlink inside are fine
    assert _read_fd(native.openat2(dirfd, "a/b/../b/file.txt", os.O_RDONLY, resolve=beneath)) == b"inside"
    assert _read_fd(native.openat2(dirfd, Path("inner"), os.O_RDONLY, resolve=beneath)) == b"inside"
    assert _read_fd(native.openat2(dirfd, b"a/b/file.txt", os.O_RDONLY)) == b"inside"


@pytest.mark.parametrize(
    "path",
    ["../outside", "a/../../outside", "/etc/passwd", "out_abs/passwd", "out_rel"],
)
def test_openat2_beneath_refuses_escape(tree: tuple[int, Path], path: str) -> None:
    dirfd, _ = tree
    with pytest.raises(OSError) as ei:
        native.openat2(dirfd, path, os.O_RDONLY, resolve=native.RESOLVE_BENEATH)
    assert ei.value.errno in (errno.EXDEV, errno.ELOOP)


def test_openat2_no_symlinks(tree: tuple[int, Path]) -> None:
    dirfd, _ = tree
    with pytest.raises(OSError) as ei:
        native.openat2(dirfd, "inner", os.O_RDONLY, resolve=native.RESOLVE_NO_SYMLINKS)
    assert ei.value.errno == errno.ELOOP


def test_openat2_no_magiclinks(tree: tuple[int, Path]) -> None:
    _, root = tree
    fd = os.open(root / "a" / "b" / "file.txt", os.O_RDONLY)
    try:
        magic = f"/proc/self/fd/{fd}"
        with pytest.raises(OSError) as ei:
            native.openat2(-100, magic, os.O_RDONLY, resolve=native.RESOLVE_NO_MAGICLINKS)  # AT_FDCWD
        assert ei.value.errno == errno.ELOOP
        # and without the flag the magic link resolves
        assert _read_fd(native.openat2(-100, magic, os.O_RDONLY)) == b"inside"
    finally:
        os.close(fd)


def test_openat2_create_and_errors(tree: tuple[int, Path]) -> None:
    dirfd, root = tree
    old = os.umask(0o022)
    try:
        fd = native.openat2(
            dirfd, "a/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, native.RESOLVE_BENEATH
        )
    finally:
        os.umask(old)
    os.close(fd)
    assert (root / "a" / "new").stat().st_mode & 0o777 == 0o640
    with pytest.raises(FileExistsError):
        native.openat2(dirfd, "a/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with pytest.raises(FileNotFoundError):
        native.openat2(dirfd, "a/missing", os.O_RDONLY, resolve=native.RESOLVE_BENEATH)
    with pytest.raises(OSError) as ei:  # mode without O_CREAT is rejected by the kernel
        native.openat2(dirfd, "a/new", os.O_RDONLY, 0o600)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        native.openat2(dirfd, "a/\0x", os.O_RDONLY)


def test_resolve_constants() -> None:
    assert native.RESOLVE_NO_XDEV == 0x01
    assert native.RESOLVE_NO_MAGICLINKS == 0x02
    assert native.RESOLVE_NO_SYMLINKS == 0x04
    assert native.RESOLVE_BENEATH == 0x08
    assert native.RESOLVE_IN_ROOT == 0x10
