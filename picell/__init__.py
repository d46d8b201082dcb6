"""picell: a Personal Internet Cell (WireGuard VPN, DNS and services on one host)."""

__version__ = "0.1.0"
