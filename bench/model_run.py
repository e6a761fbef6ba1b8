"""The long run of the random-operation model test (tests/fsmodel.py) against a real mount.

    python bench/model_run.py [--ops 300000] [--seed 1] [--steps 2000] [--drop-caches 0.001]

Starts two etfs-servers (jive, onsala) on loopback and two mounts of both (the second reads
back what the first closed: close-to-open), then runs the model
with seeds --seed, --seed+1, ... (--steps operations each, on fresh files) until --ops
operations ran; every step is compared with a reference directory on local disk.  With
--drop-caches P (root only) the page cache is dropped before a step with probability P.
Prints the operations run, their mix, the time taken and PASS, or the first mismatch (seed,
step and the operations before it: rerun with that seed to reproduce) and FAIL.
Everything it started is stopped by pid and unmounted at the end.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fsmodel import Mismatch, Model  # noqa: E402
from harness.mount import Mount, mount_servers, start_export_server  # noqa: E402
from harness.server import KEY, ServerProcess  # noqa: E402


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=300_000, help="operations in total")
    p.add_argument("--seed", type=int, default=1, help="first seed")
    p.add_argument("--steps", type=int, default=2000, help="operations per seed")
    p.add_argument("--drop-caches", type=float, default=0.0, help="probability per step (root)")
    args = p.parse_args(argv)
    # SIGTERM (and SIGINT, which a background shell job ignores) end the run through the
    # cleanup below: servers stopped, the mount unmounted.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    with tempfile.TemporaryDirectory(prefix="etfs-model-") as tmp:
        base = Path(tmp)
        key = base / "tester.key"
        key.write_text(KEY)
        key.chmod(0o600)
        servers: list[ServerProcess] = []
        mount: Mount | None = None
        second: Mount | None = None
        try:
            for name in ("jive", "onsala"):
                servers.append(start_export_server(base / f"srv-{name}", name, key))
            mount = mount_servers(base, servers, key)
            # A second client of the same servers: what the first closes, it must read.
            second = mount_servers(base / "second", servers, key, mountpoints=False)
            return run(args, base, mount, second)
        finally:
            if second is not None:
                second.stop()
            if mount is not None:
                mount.stop()
            for s in servers:
                s.stop()


def run(args: argparse.Namespace, base: Path, mount: Mount, second: Mount) -> int:
    done = 0
    seed = args.seed
    mix: collections.Counter[str] = collections.Counter()
    t0 = time.monotonic()
    last_report = t0
    while done < args.ops:
        steps = min(args.steps, args.ops - done)
        dirs = [mount.dir(s) / "tmp" / f"m{seed}" for s in ("jive", "onsala")]
        other = [second.dir(s) / "tmp" / f"m{seed}" for s in ("jive", "onsala")]
        model = Model(seed, dirs, base / "ref" / f"m{seed}", drop_caches=args.drop_caches, second=other)
        try:
            for _ in range(steps):
                model.step()
            model.close_all()
        except Mismatch as exc:
            mix.update(model.ops)
            print(f"FAIL after {done + model.steps} operations ({time.monotonic() - t0:.0f} s): {exc}")
            return 1
        done += steps
        mix.update(model.ops)
        seed += 1
        if time.monotonic() - last_report > 30:
            last_report = time.monotonic()
            print(f"  {done} operations, {seed - args.seed} seeds, {last_report - t0:.0f} s", flush=True)
    secs = time.monotonic() - t0
    print(f"PASS: {done} operations over seeds {args.seed}..{seed - 1} in {secs:.0f} s")
    print("  mix: " + ", ".join(f"{k} {v}" for k, v in mix.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
