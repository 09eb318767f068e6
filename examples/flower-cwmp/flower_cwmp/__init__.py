"""flower-cwmp: a Flower app whose clients send CWMP-pruned updates (see README.md)."""
