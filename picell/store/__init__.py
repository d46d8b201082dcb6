"""The store: SQLite (WAL, synchronous=FULL), the only truth of a cell. One module per table."""
