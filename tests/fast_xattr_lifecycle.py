"""Test program: the getxattr fast path around pyfuse3.init/main/close, for tests/test_copyrange.py.

    python tests/fast_xattr_lifecycle.py SOURCE_DIR MOUNTPOINT

Mounts the test passthrough twice in this one process, with the fast path on. Each round, a
child process stats a file and asks security.selinux 200 times through the mount (answered
in C), and a second child waits with its cwd in the mount. The daemon then terminates and
unmounts while this process lives on: the waiting child's next stat must fail at once
(ENOTCONN). Prints one JSON line per round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import copyrange_passthrough as passthrough
import pyfuse3
import trio

from etfs import copyrange

WAITER = """
import os, sys, time
os.chdir(sys.argv[1])
print("in", flush=True)
sys.stdin.readline()
t = time.monotonic()
try:
    os.stat("f")
    r = "ok"
except OSError as e:
    r = e.errno
print(round(time.monotonic() - t, 2), r, flush=True)
"""


def ask_xattrs(path: str) -> str:
    """In a child process (this one serves the mount): 200 getxattr of security.selinux."""
    code = (
        "import os, sys\n"
        "errs = set()\n"
        "for _ in range(200):\n"
        "    try: os.getxattr(sys.argv[1], 'security.selinux')\n"
        "    except OSError as e: errs.add(e.errno)\n"
        "print(sorted(errs))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def start_waiter(mnt: str) -> subprocess.Popen[str]:
    w = subprocess.Popen(
        [sys.executable, "-c", WAITER, mnt], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert w.stdout is not None
    w.stdout.readline()  # it is inside the mount now
    return w


async def serve(mnt: str, result: dict[str, object]) -> subprocess.Popen[str]:
    """Run pyfuse3.main until a stat through the mount worked and a waiter sits inside."""
    waiter: list[subprocess.Popen[str]] = []

    async def probe() -> None:
        r = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                ["timeout", "5", "stat", "-c", "%s", f"{mnt}/f"], capture_output=True, text=True
            )
        )
        result["stat"] = r.stdout.strip()
        before = copyrange.fast_xattr_stats()[0]
        result["xattr"] = await trio.to_thread.run_sync(ask_xattrs, f"{mnt}/f")
        result["answered_in_c"] = copyrange.fast_xattr_stats()[0] - before
        waiter.append(await trio.to_thread.run_sync(start_waiter, mnt))
        pyfuse3.terminate()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        await pyfuse3.main()
    return waiter[0]


def main() -> int:
    src, mnt = os.path.abspath(sys.argv[1]), sys.argv[2]
    copyrange.enable_fast_xattr(True)
    with open(os.path.join(src, "f"), "w") as f:
        f.write("hello")
    for rnd in range(2):
        events = passthrough.EventLog(os.path.join(src, f"..events-{rnd}.jsonl"))
        pyfuse3.init(passthrough.Passthrough(src, events), mnt, set(pyfuse3.default_options))
        result: dict[str, object] = {"round": rnd}
        waiter = trio.run(serve, mnt, result)
        pyfuse3.close(unmount=True)
        assert waiter.stdin is not None
        waiter.stdin.write("go\n")
        waiter.stdin.flush()
        try:
            out, _ = waiter.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            waiter.kill()
            out, _ = waiter.communicate()
        parts = out.split()
        if len(parts) == 2:
            result["after_unmount"] = {"seconds": float(parts[0]), "errno": parts[1]}
        else:
            result["after_unmount"] = {"seconds": None, "errno": "hung"}
        print(json.dumps(result), flush=True)
    time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
