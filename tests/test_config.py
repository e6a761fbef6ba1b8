"""Configuration errors: `etfs-server -c broken.yaml` and `etfs.config.load_client_config` say what
is wrong in one line naming the file (and the line), exit 2, no traceback.  The commented
`server.example.yaml` loads and starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness.process import REPO
from harness.server import make_key

from etfs.common.yamlconfig import ConfigError, parse_address
from etfs.config import load_client_config
from etfs_server.config import load_server_config


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "export" / "tmp").mkdir(parents=True)
    make_key(tmp_path / "alice.key")
    return tmp_path


def good_server_yaml(base: Path) -> str:
    return f"""\
name: cfgtest
listen: 127.0.0.1:0
state_dir: {base}/state
users:
  alice:
    key_file: alice.key
    groups: [staff]
exports:
  main:
    path: {base}/export
    acl:
      - who: alice
        path: /tmp
        rights: [read, write, list]
"""


# (case id, change to the good YAML, expected line or None, text in the message).  A change is the
# whole file, "+TEXT" (appended, so at line 15), or "OLD => NEW" (first occurrence replaced).
SERVER_CASES: list[tuple[str, str, int | None, str]] = [
    ("yaml syntax", "name: cfgtest\nlisten: [127.0.0.1:0\n", 3, "YAML syntax error"),
    ("yaml tab indent", "name: cfgtest\nusers:\n\talice: {}\n", 3, "YAML syntax error"),
    ("unknown top key", "+colour: blue", 15, "unknown key 'colour'"),
    ("unknown account", "+run_as: no-such-account-etfs", 15, "no local account named"),
    ("bad umask", "    acl: =>     umask: 0999\n    acl:", 11, "octal digits"),
    ("umask too large", "    acl: =>     umask: 07777\n    acl:", 11, "between 0 and"),
    (
        "unknown user key",
        "    groups: [staff] =>     groups: [staff]\n    shell: /bin/sh",
        8,
        "unknown key 'shell'",
    ),
    (
        "unknown rule key",
        "        rights: [read, write, list] =>         rights: all\n        when: never",
        15,
        "'when'",
    ),
    ("wrong type listen", "listen: 127.0.0.1:0 => listen: 7070", 2, "listen must be a string, not int"),
    ("wrong type groups", "groups: [staff] => groups: 5", 7, "groups must be a string or a list of strings"),
    ("wrong type name", "name: cfgtest => name: [a, b]", 1, "name must be a string"),
    ("wrong type handshake", "+handshake_timeout: soon", 15, "handshake_timeout must be a number"),
    ("missing name", "name: cfgtest => nom: cfgtest", 1, "missing required key 'name'"),
    ("missing export path", "/export\n => /nonexistent/xyz\n", 10, "is not a directory"),
    ("unreadable key file", "key_file: alice.key => key_file: missing.key", 6, "cannot read key file"),
    ("key file is a directory", "key_file: alice.key => key_file: export", 6, "cannot read key file"),
    ("short key", "key_file: alice.key => key_file: short.key", 6, "at least 16 are needed"),
    ("bad acl right", "rights: [read, write, list] => rights: [read, fly]", 14, "unknown right 'fly'"),
    ("bad acl path", "path: /tmp\n => path: tmp\n", 13, "absolute path inside the export"),
    ("acl dotdot path", "path: /tmp\n => path: /tmp/../etc\n", 13, "absolute path inside the export"),
    ("acl rule without who", "- who: alice => - comment: none", 12, "needs 'who'"),
    ("bad address port", "listen: 127.0.0.1:0 => listen: 127.0.0.1:99999", 2, "port out of range"),
    ("bad address text", "listen: 127.0.0.1:0 => listen: 'localhost:http'", 2, "bad port in address"),
    ("bad data address", "+data_listen: ':7071'", 15, "no host in address"),
    ("no exports", "exports: => unused_exports:", 1, "no exports configured"),
    ("unknown exports-like key", "+exports_extra: 1", 15, "unknown key 'exports_extra'"),
    ("bad data timeout", "+transfer: {data_timeout: 0}", 15, "data_timeout must be a positive number"),
    ("exports not mapping", "exports: => exports: [a]\nx:", 8, "must be a mapping"),
    ("duplicate key", "+name: again", 15, "duplicate key 'name'"),
    ("bad tls file", "+tls: {cert_file: /nonexistent.pem, key_file: /nonexistent.pem}", 15, "cannot read"),
    ("tls missing key", "+tls: {cert_file: alice.key}", 15, "missing required key 'key_file'"),
    ("bad transfer sender", "+transfer: {sender: carrier-pigeon}", 15, "sender must be one of"),
    ("bad transfer streams", "+transfer: {max_streams: 0}", 15, "max_streams must be at least 1"),
    (
        "unknown congestion control",
        "+transfer: {congestion_control: no-such-cc}",
        15,
        "congestion control 'no-such-cc' is not available on this host (available: ",
    ),
    (
        "negative socket buffer",
        "+transfer: {socket_buffer_mib: -1}",
        15,
        "socket_buffer_mib must be at least 0",
    ),
    (
        "socket buffer past a C int",
        "+transfer: {socket_buffer_mib: 2048}",
        15,
        "socket_buffer_mib must be at most 1024",
    ),
    ("bwlimit true", "+transfer: {bwlimit: on}", 15, "transfer.bwlimit must be a rate like 50M, or 0 / off"),
    ("bad handshake timeout", "+handshake_timeout: -1", 15, "positive number"),
    ("bad transfer peer", "+transfer: {peers: [10.0.0.0/8, 'a b']}", 15, "neither a network"),
    ("transfer peers not a list", "+transfer: {peers: 5}", 15, "peers must be a string or a list"),
    ("bad bwlimit unit", "+transfer: {bwlimit: 50Mb}", 15, "transfer.bwlimit: bad rate '50Mb': unknown unit"),
    ("bwlimit too small", "+transfer: {bwlimit_in: 1k}", 15, "below the smallest limit"),
    ("bwlimit wrong type", "+transfer: {bwlimit_out: [1]}", 15, "bwlimit_out must be a rate like 50M"),
    ("empty file", "", None, "the file is empty"),
    ("top level list", "- a\n- b\n", 1, "must be a mapping"),
    ("bad yaml tag", "name: cfgtest => name: !!int abc", 1, "bad value"),
    ("python tag", "name: cfgtest => name: !!python/object:os.system x", 1, "bad value"),
]


def make_variant(base: Path, spec: str) -> str:
    good = good_server_yaml(base)
    (base / "short.key").write_text("short\n")
    (base / "short.key").chmod(0o600)
    if spec.startswith("+"):
        return good + spec[1:] + "\n"
    if " => " in spec:
        old, new = spec.split(" => ", 1)
        assert old in good, old
        return good.replace(old, new, 1)
    return spec


def line_of(text: str, needle: str) -> int:
    return next(i + 1 for i, ln in enumerate(text.splitlines()) if needle in ln)


def run_server(config: Path, *args: str, run_as: str | None = "root") -> subprocess.CompletedProcess[str]:
    account = ["--run-as", run_as] if run_as else []
    return subprocess.run(
        [sys.executable, "-m", "etfs_server.main", "-c", str(config), *account, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_good_config_loads(base: Path) -> None:
    (base / "server.yaml").write_text(good_server_yaml(base))
    cfg = load_server_config(base / "server.yaml")
    assert cfg.name == "cfgtest" and cfg.listen == ("127.0.0.1", 0)
    assert cfg.data_listen == ("127.0.0.1", 0)  # port 0 for control: also pick one for data
    assert cfg.users["alice"].groups == frozenset({"staff"})
    assert cfg.exports["main"].path == (base / "export").resolve()


@pytest.mark.parametrize(
    ("spec", "line", "text"), [c[1:] for c in SERVER_CASES], ids=[c[0] for c in SERVER_CASES]
)
def test_server_config_errors(base: Path, spec: str, line: int | None, text: str) -> None:
    cfg = base / "broken.yaml"
    content = make_variant(base, spec)
    cfg.write_text(content)
    out = run_server(cfg)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    msg = lines[0]
    assert msg.startswith(f"etfs-server: {cfg}"), msg
    if line is not None:
        assert re.match(rf"etfs-server: {re.escape(str(cfg))}:{line}: ", msg), (msg, content)
    assert text in msg
    assert out.stdout == ""
    # the library raises ConfigError with the same text
    with pytest.raises(ConfigError) as ei:
        load_server_config(cfg)
    assert str(ei.value) == msg.removeprefix("etfs-server: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is about servers started as root")
def test_root_server_without_account_mapping_refuses_to_start(base: Path) -> None:
    (base / "server.yaml").write_text(good_server_yaml(base))
    out = run_server(base / "server.yaml", run_as=None)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "runs as root but user 'alice' has no local account" in line and "run_as" in line


def test_missing_config_file(base: Path) -> None:
    out = run_server(base / "nope.yaml")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "nope.yaml: cannot read" in out.stderr


def test_bad_listen_flag(base: Path) -> None:
    (base / "server.yaml").write_text(good_server_yaml(base))
    out = run_server(base / "server.yaml", "--listen", "localhost:notaport")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "bad port" in out.stderr


def test_unbindable_address_fails_cleanly(base: Path) -> None:
    (base / "server.yaml").write_text(good_server_yaml(base))
    out = run_server(base / "server.yaml", "--listen", "192.0.2.1:0")  # TEST-NET-1: not an address of ours
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert "etfs-server:" in out.stderr.strip().splitlines()[-1]


def test_example_config_is_valid_and_documents_every_field(tmp_path: Path) -> None:
    example = REPO / "server.example.yaml"
    text = example.read_text()
    # Every field load_server_config reads is mentioned (as key) in the example.
    for key in (
        "name:",
        "listen:",
        "data_listen:",
        "advertise:",
        "state_dir:",
        "handshake_timeout:",
        "users:",
        "key_file:",
        "groups:",
        "exports:",
        "path:",
        "acl:",
        "who:",
        "rights:",
        "tls:",
        "cert_file:",
        "transfer:",
        "max_active:",
        "bwlimit:",
        "bwlimit_in:",
        "bwlimit_out:",
        "max_streams:",
        "capability_ttl:",
        "block_size_mib:",
        "sender:",
        "receiver:",
        "congestion_control:",
        "socket_buffer_mib:",
        "run_as:",
        "may_chown:",
        "may_setid:",
        "umask:",
        "limits:",
        "handles_per_user:",
        "threads_per_user:",
        "reply_mib_per_connection:",
    ):
        assert key in text, key
    # It loads once its paths exist (rewrite the absolute paths into tmp_path).
    (tmp_path / "srv" / "tmp").mkdir(parents=True)
    make_key(tmp_path / "alice.key")
    make_key(tmp_path / "bob.key")
    rewritten = (
        text.replace("/srv/etfs/data", str(tmp_path / "srv"))
        .replace("/etc/etfs/keys/", str(tmp_path) + "/")
        .replace("/var/lib/etfs/jive", str(tmp_path / "state"))
        # the example's accounts (etfs, alice) need not exist here: uid 0 always does
        .replace("run_as: etfs", "run_as: 0")
        .replace("run_as: alice", "run_as: root")
    )
    (tmp_path / "server.yaml").write_text(rewritten)
    cfg = load_server_config(tmp_path / "server.yaml")
    assert cfg.users["bob"].account is not None and cfg.users["bob"].account.uid == 0
    assert cfg.exports["data"].umask == 0o022 and cfg.limits.threads_per_user == 8
    rules = cfg.exports["data"].acl.rules
    assert rules and all(r.prefix == "/tmp" or r.prefix.startswith("/tmp/") for r in rules)
    assert cfg.tls is None


# --- the client's mountpoints.yaml ------------------------------------------------------------------
def good_client_yaml(base: Path) -> str:
    return f"""\
root: {base}/root
servers:
  jive:
    address: 127.0.0.1:7070
    user: alice
    key_file: alice.key
transfer:
  streams: 4
"""


CLIENT_CASES: list[tuple[str, str, int | None, str]] = [
    ("yaml syntax", "servers: {jive: [\n", 2, "YAML syntax error"),
    ("unknown key", "+colour: red", 9, "unknown key 'colour'"),
    ("unknown server key", "@servers.jive.+passwd: x", 7, "unknown key 'passwd'"),
    ("wrong type", "+connect_timeout: soon", 9, "connect_timeout must be a number"),
    ("wrong type ttl", "+cache: {attr_ttl: [1]}", 9, "attr_ttl must be a number"),
    ("negative ttl", "+cache: {negative_ttl: -1}", 9, "negative_ttl must be a number of seconds >= 0"),
    ("zero timeout", "+request_timeout: 0", 9, "request_timeout must be a positive number"),
    ("nan timeout", "+connect_timeout: .nan", 9, "connect_timeout must be a positive number"),
    ("short key file", "@servers.jive.key_file: short.key", 6, "at least 16"),
    ("bad address", "@servers.jive.address: 127.0.0.1:123456", 4, "port out of range"),
    ("unreadable key file", "@servers.jive.key_file: missing.key", 6, "cannot read"),
    ("no servers", "root: /r\n", 1, "no servers configured"),
    (
        "bad direction",
        "+pairs: [{source: jive, destination: jive, direction: sideways}]",
        9,
        "direction must be one of",
    ),
    ("unknown pair server", "+pairs: [{source: jive, destination: onsala}]", 9, "unknown server 'onsala'"),
    ("too many streams", "@transfer.streams: 65", 8, "at most 64"),
    ("bad bwlimit", "+pairs: [{source: jive, destination: jive, bwlimit: fast}]", 9, "bad rate 'fast'"),
    ("bad others", "+others: everyone", 9, "others must be one of"),
    ("empty", "", None, "empty"),
]


def client_variant(base: Path, spec: str) -> str:
    good = good_client_yaml(base)
    (base / "short.key").write_text("short\n")
    (base / "short.key").chmod(0o600)
    if spec.startswith("+"):
        return good + spec[1:] + "\n"
    if spec.startswith("@servers.jive.+"):
        return good.replace(
            "    key_file: alice.key\n", "    key_file: alice.key\n    " + spec.split(".+", 1)[1] + "\n"
        )
    if spec.startswith("@"):
        dotted, _, value = spec[1:].partition(": ")
        key = dotted.split(".")[-1]
        return re.sub(rf"(?m)^(\s*){key}: .*$", lambda mt: f"{mt.group(1)}{key}: {value}", good, count=1)
    return spec


@pytest.mark.parametrize(
    ("spec", "line", "text"), [c[1:] for c in CLIENT_CASES], ids=[c[0] for c in CLIENT_CASES]
)
def test_client_config_errors(base: Path, spec: str, line: int | None, text: str) -> None:
    cfg = base / "mountpoints.yaml"
    content = client_variant(base, spec)
    cfg.write_text(content)
    with pytest.raises(ConfigError) as ei:
        load_client_config(cfg)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(str(cfg)), msg
    if line is not None:
        assert msg.startswith(f"{cfg}:{line}: "), (msg, content)
    assert text in msg, msg


def test_good_client_config(base: Path) -> None:
    (base / "mountpoints.yaml").write_text(good_client_yaml(base))
    cfg = load_client_config(base / "mountpoints.yaml")
    assert cfg.servers["jive"].addresses == (("127.0.0.1", 7070),)
    assert cfg.servers["jive"].key_file == base / "alice.key"
    assert cfg.others == "mount-identity"  # a single-user setup needs nothing
    (base / "mountpoints.yaml").write_text(good_client_yaml(base) + "others: refuse\n")
    assert load_client_config(base / "mountpoints.yaml").others == "refuse"


def test_bwlimits_parse(base: Path) -> None:
    """server.yaml: bwlimit sets both directions, bwlimit_in/out win; mountpoints.yaml: pair >
    destination's > global, as for every transfer setting."""
    (base / "server.yaml").write_text(good_server_yaml(base) + "transfer: {bwlimit: 50M, bwlimit_in: 1.5G}\n")
    cfg = load_server_config(base / "server.yaml")
    assert (cfg.bwlimit_in, cfg.bwlimit_out) == (int(1.5 * 2**30), 50 * 2**20)
    (base / "server.yaml").write_text(good_server_yaml(base))
    assert load_server_config(base / "server.yaml").bwlimit_out == 0  # no limit by default
    # `off`, as the examples write it, is YAML's false: no limit
    (base / "server.yaml").write_text(good_server_yaml(base) + "transfer: {bwlimit: off}\n")
    assert load_server_config(base / "server.yaml").bwlimit_out == 0
    onsala = "  onsala:\n    address: 127.0.0.1:7071\n    user: alice\n    key_file: alice.key\n"
    (base / "mountpoints.yaml").write_text(
        good_client_yaml(base)
        .replace("  streams: 4\n", "  bwlimit: 500k\n")
        .replace("transfer:\n", onsala + "    transfer: {bwlimit: 100Mbit}\ntransfer:\n")
        + "pairs:\n  - {source: onsala, destination: jive, bwlimit: 0}\n"
    )
    c = load_client_config(base / "mountpoints.yaml")
    assert c.transfer_for("jive", "onsala").bwlimit == 100 * 10**6 // 8
    assert c.transfer_for("onsala", "jive").bwlimit == 0  # the pair lifts the global limit
    assert c.transfer_for("jive", "jive").bwlimit == 500 * 1024


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("jive.example:7000", ("jive.example", 7000)),
        ("[::1]:7000", ("::1", 7000)),
        ("::1", ("::1", 9)),
        ("fe80::1", ("fe80::1", 9)),
        ("host", ("host", 9)),
    ],
)
def test_addresses(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text, default_port=9) == want


@pytest.mark.parametrize(
    "text", ["host:7000:1", "[::1]x", "[::1", "[host]:7000", "host:http", "host:70000", ":7000", "1:2:3:x"]
)
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="address"):
        parse_address(text, default_port=9)


def test_listen_defaults(base: Path) -> None:
    (base / "server.yaml").write_text(good_server_yaml(base).replace("listen: 127.0.0.1:0\n", ""))
    cfg = load_server_config(base / "server.yaml")
    assert (cfg.listen, cfg.data_listen) == (("127.0.0.1", 7070), ("127.0.0.1", 7071))
    (base / "server.yaml").write_text(good_server_yaml(base).replace("127.0.0.1:0", "'[::1]:65535'"))
    assert load_server_config(base / "server.yaml").data_listen == ("::1", 0)  # no port 65536


def test_acl_paths_take_the_form_of_request_paths(base: Path) -> None:
    """A rule for /tmp//x/./y/ must match requests for /tmp/x/y (they are normalised too)."""
    (base / "server.yaml").write_text(good_server_yaml(base).replace("path: /tmp\n", "path: /tmp//x/./y/\n"))
    [rule] = load_server_config(base / "server.yaml").exports["main"].acl.rules
    assert rule.prefix == "/tmp/x/y"


def test_transfer_peers_parse(base: Path) -> None:
    peers_yaml = "transfer:\n  peers: [10.1.0.0/16, 192.0.2.7, '2001:db8::/32', Jive.Example.]\n"
    (base / "server.yaml").write_text(good_server_yaml(base) + peers_yaml)
    peers = load_server_config(base / "server.yaml").peers
    assert peers.restricted
    want = ["10.1.0.0/16", "192.0.2.7/32", "2001:db8::/32", "jive.example"]
    assert [str(e) for e in peers.entries or ()] == want
    peers.check_host("10.1.2.3")
    peers.check_host("jive.example")  # names are decided when connecting
    with pytest.raises(PermissionError):
        peers.check_host("10.2.0.1")
    assert load_server_config(base / "server.yaml").peers.addresses("192.0.2.7", 7071)
    with pytest.raises(PermissionError):
        peers.addresses("127.0.0.1", 7071)


@pytest.mark.parametrize("target", ["/dev/null", "symlink", "fifo"])
def test_port_file_never_replaces_what_is_not_a_file(base: Path, target: str) -> None:
    (base / "server.yaml").write_text(good_server_yaml(base))
    if target == "symlink":
        port_file = base / "ports"
        os.symlink(base / "elsewhere", port_file)
    elif target == "fifo":
        port_file = base / "ports"
        os.mkfifo(port_file)
    else:
        port_file = Path(target)
    before = os.lstat(port_file)
    out = run_server(base / "server.yaml", "--port-file", str(port_file))
    assert out.returncode == 2 and "not a regular file" in out.stderr, out.stderr
    after = os.lstat(port_file)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
