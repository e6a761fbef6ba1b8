"""A random-operation model of file I/O: the same operations on the mount and on a local reference.

`Model(seed, dirs, ref)` keeps a few files in each directory of ``dirs`` (on the mount, e.g.
one per server) and a twin of each in ``ref`` (local disk), with open handles on both.
`step()` draws one operation (pwrite at random offsets with holes and past EOF, write and
read at the file position, O_APPEND, truncate and ftruncate up and down, mmap MAP_SHARED
reads and writes with msync, copy_file_range within a file and between files of the same and
of different directories, GNU cp between directories (a transfer on the mount) also onto
open files, fsync, close and reopen, several handles on one file, hard links, rename and unlink of
open files), runs it on the reference and on the mount, and compares results or
errnos; then it compares sizes of every open handle and the full contents of the files the
operation touched.  A mismatch raises `Mismatch` with the seed, the step and the last
operations, enough to replay it with the same seed.

Used by tests/test_model.py (short, several seeds) and bench/model_run.py (long runs).
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KIB = 1024
MAX_FILE = 3 * 1024 * KIB  # keeps full comparisons cheap; offsets go a bit beyond
ENTRY_TTL = 1.0  # the mounts' cache.entry_ttl (the default; negative_ttl is shorter)


class Mismatch(AssertionError):
    pass


@dataclass
class Handle:
    mfd: int  # on the mount
    rfd: int  # on the reference
    key: str | None  # "dir/name" it was opened as; None once unlinked or replaced
    flags: int

    @property
    def readable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_WRONLY

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY


def _outcome(fn: Callable[[], object]) -> tuple[str, object]:
    try:
        r = fn()
        return ("ok", None if isinstance(r, subprocess.CompletedProcess) else r)
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, exc.errno))
    except subprocess.CalledProcessError as exc:
        # the message names the path; only whether it failed is comparable
        return ("err", f"exit {exc.returncode}")


def _short(x: object) -> str:
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], bytes):
        return f"({x[0]!r}, {len(x[1])} bytes)"
    return repr(x)[:200]


class Model:
    def __init__(
        self,
        seed: int,
        dirs: list[Path],
        ref: Path,
        names: int = 3,
        drop_caches: float = 0.0,
        second: list[Path] | None = None,
    ) -> None:
        self.rnd = random.Random(seed)
        self.seed = seed
        self.dirs = dirs
        self.ref = ref
        self.names = [f"d{i}/f{j}" for i in range(len(dirs)) for j in range(names)]
        self.handles: list[Handle] = []
        self.history: collections.deque[str] = collections.deque(maxlen=40)
        self.steps = 0
        self.drop_caches = drop_caches
        # The same directories through a second mount of the same servers: what this mount
        # closed, that one must read on its next open (close-to-open).
        self.second = second
        self.ops: dict[str, int] = collections.Counter()
        for i, d in enumerate(dirs):
            d.mkdir(parents=True, exist_ok=True)
            (ref / f"d{i}").mkdir(parents=True, exist_ok=True)

    # --- paths --------------------------------------------------------------------------------
    def mpath(self, key: str) -> Path:
        d, name = key.split("/")
        return self.dirs[int(d[1:])] / name

    def rpath(self, key: str) -> Path:
        return self.ref / key

    def fail(self, what: str) -> None:
        hist = "\n  ".join(self.history)
        raise Mismatch(f"seed {self.seed} step {self.steps}: {what}\nlast operations:\n  {hist}")

    def same(self, what: str, r: object, m: object) -> None:
        if r != m:
            if isinstance(r, tuple) and isinstance(m, tuple) and r[0] == m[0] == "ok":
                r, m = r[1], m[1]  # two results: say how they differ
            if isinstance(r, bytes | bytearray) and isinstance(m, bytes | bytearray):
                at = next((i for i, (a, b) in enumerate(zip(r, m, strict=False)) if a != b), None)
                self.fail(f"{what}: reference {len(r)} bytes, mount {len(m)} bytes, first difference at {at}")
            self.fail(f"{what}: reference {_short(r)}, mount {_short(m)}")

    def both(self, what: str, ref: Callable[[], object], mnt: Callable[[], object]) -> object:
        r = _outcome(ref)
        m = _outcome(mnt)
        self.same(what, r, m)
        return r[1]

    # --- choices ------------------------------------------------------------------------------
    def _size(self, h: Handle) -> int:
        return os.fstat(h.rfd).st_size

    def _offset(self, size: int) -> int:
        x = self.rnd.random()
        if x < 0.3:
            return self.rnd.randrange(0, size + 1)
        if x < 0.45:
            return size  # append-like
        if x < 0.6:
            return size + self.rnd.randrange(1, 200 * KIB)  # a hole past EOF
        return self.rnd.randrange(0, MAX_FILE)

    def _length(self) -> int:
        x = self.rnd.random()
        if x < 0.6:
            return self.rnd.randrange(1, 8 * KIB)
        if x < 0.92:
            return self.rnd.randrange(1, 160 * KIB)
        return self.rnd.randrange(900 * KIB, 1300 * KIB)  # around the 1 MiB block sizes

    def _pick(self, pred: Callable[[Handle], bool]) -> Handle | None:
        hs = [h for h in self.handles if pred(h)]
        return self.rnd.choice(hs) if hs else None

    # --- operations ---------------------------------------------------------------------------
    def op_open(self) -> list[str]:
        key = self.rnd.choice(self.names)
        acc = self.rnd.choice([os.O_RDWR, os.O_RDWR, os.O_RDWR, os.O_RDONLY, os.O_WRONLY])
        flags = acc | os.O_CREAT
        if self.rnd.random() < 0.15:
            flags |= os.O_APPEND
        if self.rnd.random() < 0.1 and acc != os.O_RDONLY:
            flags |= os.O_TRUNC
        if acc == os.O_RDONLY:
            flags &= ~os.O_CREAT
        self.history.append(f"open {key} flags={flags:#o}")
        r = _outcome(lambda: os.open(self.rpath(key), flags, 0o644))
        m = _outcome(lambda: os.open(self.mpath(key), flags, 0o644))
        if r[0] == "ok" and m[0] == "ok":
            assert isinstance(r[1], int) and isinstance(m[1], int)
            self.handles.append(Handle(m[1], r[1], key, flags))
        else:
            for kind, fd in (r, m):
                if kind == "ok":
                    assert isinstance(fd, int)
                    os.close(fd)
            self.same(f"open {key}", r[0] if r[0] == "ok" else r, m[0] if m[0] == "ok" else m)
        return [key]

    def op_close(self) -> list[str]:
        h = self._pick(lambda h: True)
        if h is None:
            return []
        self.history.append(f"close {h.key} fd={h.mfd}")
        self.handles.remove(h)
        os.close(h.rfd)
        # close(2) reports deferred write errors: it must succeed here
        self.both("close", lambda: None, lambda: os.close(h.mfd))
        self._check_second(h.key)
        return [h.key] if h.key else []

    def _check_second(self, key: str | None) -> None:
        if self.second is None or key is None or any(o.key == key for o in self.handles):
            return
        d, name = key.split("/")
        other = self.second[int(d[1:])] / name
        want = _outcome(lambda: self.rpath(key).read_bytes())
        got = _outcome(other.read_bytes)
        if got != want:
            # Names are cached there for cache.entry_ttl (1 s; a name created here may be
            # missing there for negative_ttl): a name of a hard-linked file that was unlinked
            # and made again here may still lead to the old file.  After that, it must agree.
            time.sleep(ENTRY_TTL + 0.1)
            got = _outcome(other.read_bytes)
        self.same(f"contents of {key} through the second mount after close", want, got)

    def op_pwrite(self) -> list[str]:
        h = self._pick(lambda h: h.writable)
        if h is None:
            return []
        off, n = self._offset(self._size(h)), self._length()
        data = self.rnd.randbytes(n)
        self.history.append(f"pwrite {h.key} fd={h.mfd} off={off} len={n}")
        self.both("pwrite", lambda: os.pwrite(h.rfd, data, off), lambda: os.pwrite(h.mfd, data, off))
        return self._touched(h)

    def op_write(self) -> list[str]:
        h = self._pick(lambda h: h.writable)
        if h is None:
            return []
        n = self._length()
        data = self.rnd.randbytes(n)
        self.history.append(f"write {h.key} fd={h.mfd} len={n}")
        self.both("write", lambda: os.write(h.rfd, data), lambda: os.write(h.mfd, data))
        self.both(
            "position", lambda: os.lseek(h.rfd, 0, os.SEEK_CUR), lambda: os.lseek(h.mfd, 0, os.SEEK_CUR)
        )
        return self._touched(h)

    def op_pread(self) -> list[str]:
        h = self._pick(lambda h: h.readable)
        if h is None:
            return []
        off, n = self._offset(self._size(h)), self._length()
        self.history.append(f"pread {h.key} fd={h.mfd} off={off} len={n}")
        self.both("pread", lambda: os.pread(h.rfd, n, off), lambda: os.pread(h.mfd, n, off))
        return []

    def op_read(self) -> list[str]:
        h = self._pick(lambda h: h.readable)
        if h is None:
            return []
        n = self._length()
        self.history.append(f"read {h.key} fd={h.mfd} len={n}")
        self.both("read", lambda: os.read(h.rfd, n), lambda: os.read(h.mfd, n))
        return []

    def op_lseek(self) -> list[str]:
        h = self._pick(lambda h: True)
        if h is None:
            return []
        whence = self.rnd.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
        off = self.rnd.randrange(0, 300 * KIB) if whence == os.SEEK_SET else self.rnd.randrange(-100, 100)
        self.history.append(f"lseek {h.key} fd={h.mfd} {off} whence={whence}")
        self.both("lseek", lambda: os.lseek(h.rfd, off, whence), lambda: os.lseek(h.mfd, off, whence))
        return []

    def op_ftruncate(self) -> list[str]:
        h = self._pick(lambda h: True)
        if h is None:
            return []
        size = self._size(h)
        new = self.rnd.choice(
            [0, size // 2, self.rnd.randrange(0, size + 1), size + self.rnd.randrange(1, 300 * KIB)]
        )
        self.history.append(f"ftruncate {h.key} fd={h.mfd} {size} -> {new}")
        self.both("ftruncate", lambda: os.ftruncate(h.rfd, new), lambda: os.ftruncate(h.mfd, new))
        return self._touched(h)

    def op_truncate(self) -> list[str]:
        key = self.rnd.choice(self.names)
        new = self.rnd.randrange(0, MAX_FILE // 2)
        self.history.append(f"truncate {key} -> {new}")
        self.both(
            "truncate", lambda: os.truncate(self.rpath(key), new), lambda: os.truncate(self.mpath(key), new)
        )
        return [key]

    def op_mmap(self) -> list[str]:
        h = self._pick(lambda h: h.flags & os.O_ACCMODE == os.O_RDWR and not h.flags & os.O_APPEND)
        if h is None:
            return []
        size = self._size(h)
        if size == 0:
            return []
        off = self.rnd.randrange(0, size)
        n = min(self.rnd.randrange(1, 64 * KIB), size - off)
        write = self.rnd.random() < 0.6
        data = self.rnd.randbytes(n)
        self.history.append(
            f"mmap {'write' if write else 'read'} {h.key} fd={h.mfd} size={size} off={off} len={n}"
        )
        got = []
        for fd in (h.rfd, h.mfd):
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                if write:
                    mm[off : off + n] = data
                    mm.flush()  # msync(MS_SYNC)
                got.append(bytes(mm[max(0, off - 100) : off + n + 100]))
        self.same("mmap contents", got[0], got[1])
        return self._touched(h) if write else []

    def op_copy_range(self) -> list[str]:
        src = self._pick(lambda h: h.readable)
        dst = self._pick(lambda h: h.writable)
        if src is None or dst is None:
            return []
        ssize = self._size(src)
        off_in = self.rnd.choice([0, self.rnd.randrange(0, ssize + 1), ssize + 10])
        off_out = self.rnd.choice(
            [0, off_in + self.rnd.randrange(-5000, 5000), self._offset(self._size(dst))]
        )
        off_out = max(0, off_out)
        n = self.rnd.choice([self._length(), ssize, ssize + 1000])
        if self.rnd.random() < 0.1:  # the whole file, as cp asks
            off_in = off_out = 0
            n = max(ssize, 1) + self.rnd.randrange(0, 2) * (1 << 30)
        self.history.append(
            f"copy_file_range {src.key} fd={src.mfd} @{off_in} -> {dst.key} fd={dst.mfd} @{off_out} len={n}"
        )

        def copy(a: int, b: int) -> int:
            total = 0
            while total < n:  # copy_file_range may copy less than asked: loop as tools do
                k = os.copy_file_range(a, b, n - total, off_in + total, off_out + total)
                if k == 0:
                    break
                total += k
            return total

        self.both("copy_file_range", lambda: copy(src.rfd, dst.rfd), lambda: copy(src.mfd, dst.mfd))
        return self._touched(dst)

    def op_fsync(self) -> list[str]:
        h = self._pick(lambda h: True)
        if h is None:
            return []
        self.history.append(f"fsync {h.key} fd={h.mfd}")
        self.both("fsync", lambda: os.fsync(h.rfd), lambda: os.fsync(h.mfd))
        return []

    def op_stat(self) -> list[str]:
        key = self.rnd.choice(self.names)
        self.history.append(f"stat {key}")
        self.both(
            "stat size",
            lambda: os.stat(self.rpath(key)).st_size,
            lambda: os.stat(self.mpath(key)).st_size,
        )
        return []

    def op_rename(self) -> list[str]:
        old = self.rnd.choice(self.names)
        same_dir = [n for n in self.names if n.split("/")[0] == old.split("/")[0] and n != old]
        new = self.rnd.choice(same_dir)
        self.history.append(f"rename {old} -> {new}")
        r = self.both(
            "rename",
            lambda: os.rename(self.rpath(old), self.rpath(new)),
            lambda: os.rename(self.mpath(old), self.mpath(new)),
        )
        if r is None:  # it worked on both
            for h in self.handles:
                if h.key == new:
                    h.key = None
            for h in self.handles:
                if h.key == old:
                    h.key = new
        return [new]

    def op_link(self) -> list[str]:
        old = self.rnd.choice(self.names)
        new = self.rnd.choice([n for n in self.names if n.split("/")[0] == old.split("/")[0] and n != old])
        self.history.append(f"link {old} {new}")
        self.both(
            "link",
            lambda: os.link(self.rpath(old), self.rpath(new)),
            lambda: os.link(self.mpath(old), self.mpath(new)),
        )
        return [old, new]

    def op_unlink(self) -> list[str]:
        key = self.rnd.choice(self.names)
        self.history.append(f"unlink {key}")
        r = self.both("unlink", lambda: os.unlink(self.rpath(key)), lambda: os.unlink(self.mpath(key)))
        if r is None:
            for h in self.handles:
                if h.key == key:
                    h.key = None
        return []

    def op_reopen(self) -> list[str]:
        """Close a handle and open its file again (close-to-open within one client)."""
        h = self._pick(lambda h: h.key is not None)
        if h is None:
            return []
        self.history.append(f"reopen {h.key} fd={h.mfd}")
        self.handles.remove(h)
        os.close(h.rfd)
        os.close(h.mfd)
        self._check_second(h.key)
        flags = h.flags & ~(os.O_TRUNC | os.O_CREAT)
        assert h.key is not None
        r = os.open(self.rpath(h.key), flags)
        m = os.open(self.mpath(h.key), flags)
        self.handles.append(Handle(m, r, h.key, flags))
        return [h.key]

    def op_cp(self) -> list[str]:
        """GNU cp of a file (maybe open, with writes pending) onto a name of another directory
        (a server-to-server transfer on the mount), maybe open too."""
        src = self.rnd.choice(self.names)
        d = src.split("/")[0]
        dst = self.rnd.choice([n for n in self.names if n.split("/")[0] != d] or self.names)
        if dst == src:
            return []
        self.history.append(f"cp {src} {dst}")
        self.both(
            "cp",
            lambda: subprocess.run(["cp", self.rpath(src), self.rpath(dst)], check=True, capture_output=True),
            lambda: subprocess.run(["cp", self.mpath(src), self.mpath(dst)], check=True, capture_output=True),
        )
        return [dst]

    def op_drop_caches(self) -> list[str]:
        self.history.append("drop_caches")
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return []

    WEIGHTS: dict[str, int] = {
        "open": 8,
        "close": 5,
        "pwrite": 20,
        "write": 10,
        "pread": 14,
        "read": 6,
        "lseek": 4,
        "ftruncate": 5,
        "truncate": 2,
        "mmap": 5,
        "copy_range": 7,
        "fsync": 2,
        "stat": 4,
        "rename": 2,
        "unlink": 2,
        "reopen": 4,
        "cp": 2,
        "link": 2,
    }

    def _touched(self, h: Handle) -> list[str]:
        return [h.key] if h.key else []

    # --- checks -------------------------------------------------------------------------------
    def check_handles(self) -> None:
        for h in self.handles:
            self.same(f"fstat size of {h.key} fd={h.mfd}", os.fstat(h.rfd).st_size, os.fstat(h.mfd).st_size)
            if h.key is None and h.readable:  # an unlinked or replaced file: only its handles show it
                size = os.fstat(h.rfd).st_size
                self.same(
                    f"contents of orphan fd={h.mfd}",
                    os.pread(h.rfd, size + 1, 0),
                    os.pread(h.mfd, size + 1, 0),
                )

    def check_file(self, key: str) -> None:
        r = _outcome(lambda: self.rpath(key).read_bytes())
        m = _outcome(lambda: self.mpath(key).read_bytes())
        self.same(f"contents of {key}", r, m)

    def step(self) -> None:
        self.steps += 1
        if self.drop_caches and self.rnd.random() < self.drop_caches:
            self.op_drop_caches()
        # Keep the number of open files bounded.
        name = (
            "close"
            if len(self.handles) > 6
            else self.rnd.choices(list(self.WEIGHTS), list(self.WEIGHTS.values()))[0]
        )
        self.ops[name] += 1
        touched = getattr(self, "op_" + name)()
        self.check_handles()
        for key in touched:
            if self.rnd.random() < 0.5:
                # through an open handle of the file (no open/close in between) or by path
                h = next((h for h in self.handles if h.key == key and h.readable), None)
                if h is not None:
                    size = os.fstat(h.rfd).st_size
                    self.same(
                        f"contents of {key} via fd={h.mfd}",
                        os.pread(h.rfd, size + 1, 0),
                        os.pread(h.mfd, size + 1, 0),
                    )
                    continue
            self.check_file(key)
        if self.steps % 100 == 0:
            for key in self.names:
                self.check_file(key)

    def close_all(self) -> None:
        for h in self.handles:
            os.close(h.rfd)
            try:
                os.close(h.mfd)
            except OSError:
                pass
        self.handles.clear()
        for key in self.names:
            self.check_file(key)
