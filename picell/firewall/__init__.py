"""nftables: the one table picell owns (`inet picell`); never any other table."""
