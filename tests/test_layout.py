"""The package layout holds: the server imports nothing of the client.

``etfs_server`` may import from ``etfs`` only the shared parts: the wire protocol
(`etfs.protocol`), the native code (`etfs._sendfile_cffi`), `etfs.common` and the package's
version.  Everything else under ``etfs`` is the client (mount, filesystem, transfers, CLI).
"""

from __future__ import annotations

import ast
from pathlib import Path

SHARED = ("etfs.protocol", "etfs._sendfile_cffi", "etfs.common")
REPO = Path(__file__).resolve().parent.parent


def _etfs_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "etfs":
                found += [(node.lineno, f"etfs.{a.name}") for a in node.names]
            elif node.module.startswith("etfs."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("etfs.")]
    return found


def test_server_imports_only_shared_parts_of_etfs() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in sorted((REPO / "etfs_server").rglob("*.py"))
        for line, name in _etfs_imports(path)
        if name != "etfs.__version__" and not any(name == s or name.startswith(s + ".") for s in SHARED)
    ]
    assert not bad, "etfs_server imports client code:\n" + "\n".join(bad)


def test_shared_parts_import_nothing_of_the_client() -> None:
    shared_dirs = [REPO / "etfs" / "protocol", REPO / "etfs" / "_sendfile_cffi", REPO / "etfs" / "common"]
    bad = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for d in shared_dirs
        for path in sorted(d.rglob("*.py"))
        for line, name in _etfs_imports(path)
        if not any(name == s or name.startswith(s + ".") for s in SHARED)
    ]
    assert not bad, "shared code imports client code:\n" + "\n".join(bad)
