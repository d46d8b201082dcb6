"""Links between cells: invites, pairing, signed cross-cell messages, the outbox sender."""
