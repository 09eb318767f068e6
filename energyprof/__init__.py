"""energyprof: measure joules on real hardware, calibrate per-layer update costs, and feed them to
cost-weighted magnitude pruning (CWMP)."""

__version__ = "0.1.0"
