"""DNS: the cell's zone and views (pure rendering) and the supervised Unbound process."""
