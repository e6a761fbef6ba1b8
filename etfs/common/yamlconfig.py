"""YAML configuration -> typed, validated values, with ``file:line: what is wrong`` errors.

`Fields` walks a YAML mapping node by node so every error names the line it came from;
unknown keys are errors (a typo must not silently fall back to a default).  The client's
``mountpoints.yaml`` (`etfs.config`) and the server's ``server.yaml`` (`etfs_server.config`)
are both read with it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from etfs.common.ratelimit import RateError, parse_rate

DEFAULT_PORT = 7070  # the control port of a server, when an address names none

_MISSING: Any = object()


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming file and line."""

    def __init__(self, file: str | Path, line: int | None, message: str) -> None:
        where = f"{file}:{line}" if line else str(file)
        super().__init__(f"{where}: {message}")
        self.file = str(file)
        self.line = line


_constructor = yaml.constructor.SafeConstructor()


def _construct(node: yaml.Node, file: Path) -> Any:
    """A node's Python value; a bad value (``!!int abc``, ``!!python/object``) is a `ConfigError`."""
    try:
        return _constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(file, node.start_mark.line + 1, f"bad value: {problem}") from None
    finally:
        # A failed construction leaves state behind that would break the next one.
        _constructor.constructed_objects.clear()
        _constructor.recursive_objects.clear()


# Fields has methods named str/int/...; these aliases keep annotations inside it unambiguous.
_Str = str
_Int = int


class Fields:
    """A YAML mapping whose values are read with a type check and a line number."""

    def __init__(self, node: yaml.Node, file: Path, what: _Str) -> None:
        self.file = file
        self.what = what
        self.line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(file, self.line, f"{what} must be a mapping")
        self._items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = _construct(key_node, file)
            if not isinstance(key, str):
                raise ConfigError(file, key_node.start_mark.line + 1, f"{what}: keys must be strings")
            if key in self._items:
                raise ConfigError(file, key_node.start_mark.line + 1, f"{what}: duplicate key {key!r}")
            self._items[key] = (key_node, value_node)
        self._used: set[str] = set()

    def error(self, message: _Str, key: _Str | None = None) -> ConfigError:
        line = self._items[key][0].start_mark.line + 1 if key in self._items else self.line
        return ConfigError(self.file, line, message)

    def keys(self) -> list[str]:
        return list(self._items)

    def has(self, key: _Str) -> bool:
        return key in self._items

    def node(self, key: _Str) -> yaml.Node:
        self._used.add(key)
        return self._items[key][1]

    def _get(self, key: _Str, types: tuple[type, ...], tname: str, default: Any) -> Any:
        if key not in self._items:
            if default is _MISSING:
                raise self.error(f"{self.what}: missing required key {key!r}")
            return default
        value = _construct(self.node(key), self.file)
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            raise self.error(f"{self.what}.{key} must be {tname}, not {type(value).__name__}", key)
        return value

    def str(self, key: _Str, default: Any = _MISSING) -> Any:
        return self._get(key, (str,), "a string", default)

    def int(self, key: _Str, default: Any = _MISSING, minimum: _Int | None = None) -> Any:
        value = self._get(key, (int,), "an integer", default)
        if minimum is not None and value is not None and value < minimum:
            raise self.error(f"{self.what}.{key} must be at least {minimum}", key)
        return value

    def float(self, key: _Str, default: Any = _MISSING) -> Any:
        value = self._get(key, (int, float), "a number", default)
        return float(value) if value is not None else None

    def name_or_id(self, key: _Str, default: Any = _MISSING) -> Any:
        """A name or a non-negative number (an account, a group), returned as a string."""
        value = self._get(key, (str, int), "a name or a number", default)
        if isinstance(value, int) and value < 0:
            raise self.error(f"{self.what}.{key} must not be negative", key)
        return value if value is None or isinstance(value, str) else str(value)

    def octal(self, key: _Str, default: Any = _MISSING, maximum: _Int = 0o7777) -> Any:
        """Permission bits: a YAML 1.1 octal number (``022``) or a string (``"0o022"``, ``"022"``)."""
        value = self._get(key, (str, int), "octal permission bits", default)
        if isinstance(value, str):
            digits = value[2:] if value[:2] in ("0o", "0O") else value
            try:
                value = int(digits, 8)
            except ValueError:
                what = f"{self.what}.{key} must be octal digits like 022, not {value!r}"
                raise self.error(what, key) from None
        if value is not None and not 0 <= value <= maximum:
            raise self.error(f"{self.what}.{key} must be between 0 and {maximum:#o}", key)
        return value

    def bool(self, key: _Str, default: Any = _MISSING) -> Any:
        return self._get(key, (bool,), "true or false", default)

    def rate(self, key: _Str, default: Any = _MISSING) -> Any:
        """A bandwidth limit in bytes/s (`etfs.common.ratelimit.parse_rate`: 50M, 1.5G, 500k; 0: none)."""
        if key not in self._items:
            return self._get(key, (str, int), "a rate like 50M", default)
        value = self._get(key, (str, int, bool), "a rate like 50M", default)
        if value is False:  # YAML reads an unquoted `off` (or `no`) as false: no limit
            return 0
        if value is True:
            raise self.error(f"{self.what}.{key} must be a rate like 50M, or 0 / off for none", key)
        try:
            return parse_rate(value)
        except RateError as exc:
            raise self.error(f"{self.what}.{key}: {exc}", key) from None

    def choice(self, key: _Str, choices: tuple[_Str | None, ...], default: Any = _MISSING) -> Any:
        value = self.str(key, default)
        if value not in choices:
            names = ", ".join(c for c in choices if c)
            raise self.error(f"{self.what}.{key} must be one of {names}, not {value!r}", key)
        return value

    def str_list(self, key: _Str, default: Any = _MISSING) -> Any:
        if key not in self._items:
            if default is _MISSING:
                raise self.error(f"{self.what}: missing required key {key!r}")
            return default
        value = _construct(self.node(key), self.file)
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{self.what}.{key} must be a string or a list of strings", key)
        return value

    def mapping(self, key: _Str) -> Fields | None:
        if key not in self._items:
            return None
        return Fields(self.node(key), self.file, f"{self.what}.{key}")

    def items(self, key: _Str) -> Iterator[tuple[_Str, Fields]]:
        """The entries of a mapping of mappings (``servers: {jive: {...}}``)."""
        sub = self.mapping(key)
        if sub is None:
            return
        for name in sub.keys():
            yield name, Fields(sub.node(name), self.file, f"{self.what}.{key}.{name}")

    def sequence(self, key: _Str) -> Iterator[Fields]:
        if key not in self._items:
            return
        node = self.node(key)
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(f"{self.what}.{key} must be a list", key)
        for i, item in enumerate(node.value):
            yield Fields(item, self.file, f"{self.what}.{key}[{i}]")

    def path(self, key: _Str, default: Any = _MISSING, base: Path | None = None) -> Any:
        value = self.str(key, default)
        if value is None or value is default:
            return value
        p = Path(os.path.expanduser(value))
        if not p.is_absolute():
            p = (base or self.file.parent) / p
        return p

    def done(self) -> None:
        """Fail on keys nobody read: they are typos or unsupported options."""
        for key in self._items:
            if key not in self._used:
                raise self.error(f"{self.what}: unknown key {key!r}", key)


def load_yaml(path: str | Path) -> Fields:
    """Parse a YAML file into `Fields` of its top-level mapping."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(file, line, f"YAML syntax error: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(file, None, f"YAML error: {exc}") from None
    if node is None:
        raise ConfigError(file, None, "the file is empty")
    return Fields(node, file, "config")


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (with a default port)."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}: expected [IPv6]:port")
        port_text = rest[1:]
        _require_ipv6(host, text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
        if ":" in host:  # several colons: only a bare IPv6 address (host:port:x is a typo)
            _require_ipv6(host, text)
    if not host:
        raise ValueError(f"no host in address {text!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"no port in address {text!r}")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in address {text!r}") from None
    if not 0 <= port < 65536:
        raise ValueError(f"port out of range in address {text!r}")
    return host, port


def _require_ipv6(host: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"bad address {text!r}: {host!r} is not an IPv6 address (write [v6]:port)") from None


def address_field(f: Fields, key: str, default: Any = _MISSING, default_port: int | None = None) -> Any:
    text = f.str(key, default)
    if text is None or text is default:
        return text
    try:
        return parse_address(text, default_port)
    except ValueError as exc:
        raise f.error(f"{f.what}.{key}: {exc}", key) from None


def positive_seconds(f: Fields, key: str, default: float) -> float:
    value: float = f.float(key, default)
    if not 0 < value < 1e9:  # also refuses NaN and infinity
        raise f.error(f"{f.what}.{key} must be a positive number of seconds", key)
    return value


def _non_negative(f: Fields, key: str, default: float) -> float:
    value: float = f.float(key, default)
    if not 0 <= value < 1e9:
        raise f.error(f"{f.what}.{key} must be a number of seconds >= 0", key)
    return value
