"""WireGuard: keys, config rendering, interface apply and observe."""
