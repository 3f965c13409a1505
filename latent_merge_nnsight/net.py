"""Whether a host is this machine (the one rule for "loopback" used by the client and the server)."""

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (IPv4 ``127.0.0.0/8``, IPv6 ``::1``, bracketed or not).
    The server warns when it listens elsewhere without a key; the client sends a placeholder key only here."""
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
