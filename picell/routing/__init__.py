"""Addresses, routes and rules of the cell's interfaces (iproute2)."""
