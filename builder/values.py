"""Typed values that may end up in generated shell scripts or config files.

Every setting that reaches a script passes through one of these checks
first; each raises ValueError with a message fit for `key: message`.
"""

from __future__ import annotations

import ipaddress
import re

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
# Absolute paths of plain characters: no spaces, quotes, globs, $, `, ;, newlines.
PATH_RE = re.compile(r"^/[A-Za-z0-9._+@%=:,/-]*$")
KERNEL_RE = re.compile(r"^[A-Za-z0-9._+~-]+$")
# A listen address: 192.168.1.1:7777 or [fe80::1]:7777
LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]+)$")
# A command name rexec_server may run (its whitelist matches the command exactly)
COMMAND_RE = re.compile(r"^[A-Za-z0-9._+-]{1,128}$")
LOG_LEVELS = ("NONE", "ERROR", "WARN", "INFO", "DEBUG")


def check_name(value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise ValueError(f"{value!r} is not a valid name (use only A-Z a-z 0-9 . _ -)")
    return value


def check_ip(value: object) -> str:
    """An IPv4 or IPv6 address, as text (no host names: they would need DNS on the DPU)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (like 192.168.1.1)") from None
    if getattr(address, "scope_id", None) is not None:
        # fe80::1%<anything>: the zone is free text ($(...), newlines) and names
        # an interface of the machine that reads it, not an address
        raise ValueError(f"{value!r} is not an IP address without a zone "
                         "(drop the %zone part)")
    return str(address)


def check_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a port number (1-65535)")
    text = str(value)
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{value!r} is not a port number (1-65535)")
    return int(text)


def check_abs_path(value: object) -> str:
    """An absolute path that is safe to paste into a script even unquoted."""
    if not isinstance(value, str) or not PATH_RE.match(value) or "/../" in value + "/":
        raise ValueError(
            f"{value!r} is not an absolute path of plain characters "
            "(letters, digits and . _ + @ % = : , / - only; no '..')")
    return value


def check_listen(value: object) -> str:
    """An address:port to listen on, normalized ([v6]:port for IPv6)."""
    m = LISTEN_RE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"{value!r} is not an address:port to listen on "
                         "(like 192.168.1.1:7777 or [fe80::1]:7777)")
    ip = check_ip(m.group("v6") or m.group("v4"))
    if (":" in ip) != bool(m.group("v6")):
        raise ValueError(f"{value!r}: write an IPv6 address in brackets ([fe80::1]:7777)")
    port = check_port(m.group("port"))
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def check_command(value: object) -> str:
    """A command for rexec's whitelist: a plain name or an absolute path."""
    if isinstance(value, str) and value.startswith("/"):
        return check_abs_path(value)
    if not isinstance(value, str) or not COMMAND_RE.match(value):
        raise ValueError(f"{value!r} is not a command name or absolute path "
                         "(letters, digits and . _ + - only)")
    return value


def check_log_level(value: object) -> str:
    if value not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a qtfs log level ({', '.join(LOG_LEVELS)})")
    return str(value)


def check_kernel_release(value: object) -> str:
    if not isinstance(value, str) or not KERNEL_RE.match(value):
        raise ValueError(f"{value!r} is not a kernel release (as `uname -r` prints it)")
    return value


def check_mode(value: object) -> int:
    """A file mode, written as octal text ('0755').  A bare YAML number is
    refused: `mode: 755` is the decimal 755 and `mode: 0755` YAML 1.1's octal
    493, and neither is what the reader of the recipe sees."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"{value!r} is a number; write a mode as quoted octal text "
                         "(like '0755')")
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3,4}", value):
        raise ValueError(f"{value!r} is not a file mode (like '0755')")
    return int(value, 8)


SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object) -> int:
    """A byte count: an integer, or text like 512M, 1.5G, 20GB."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{value!r} is not a positive size")
        return value
    text = str(value).strip().upper().removesuffix("B")
    try:
        size = (int(float(text[:-1]) * SIZE_UNITS[text[-1]]) if text[-1:] in SIZE_UNITS
                else int(text))
    except (ValueError, OverflowError, IndexError):
        raise ValueError(f"{value!r} is not a size (like 2G or 512M)") from None
    if size <= 0:
        raise ValueError(f"{value!r} is not a positive size")
    return size


def check_sha256(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"{value!r} is not a sha256 (64 hex digits)")
    return value.lower()


def check_arch(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_]+", value):
        raise ValueError(f"{value!r} is not an architecture name (like x86_64, aarch64)")
    return value


def check_id(value: object) -> int:
    """A numeric uid or gid."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"{value!r} is not a numeric id (0 or more)")
    return value


def check_rootfs_path(value: object) -> str:
    """An absolute path inside the rootfs without '..' components."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path inside the rootfs")
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} must not contain '..' (paths stay inside the rootfs)")
    return value


def check_param_name(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", value):
        raise ValueError(f"{value!r} is not a param name (lower case letters, digits, _)")
    return value


CHECKS = {
    "name": check_name,
    "ip": check_ip,
    "port": check_port,
    "path": check_abs_path,
    "log_level": check_log_level,
    "kernel": check_kernel_release,
    "mode": check_mode,
    "listen": check_listen,
    "command": check_command,
}
