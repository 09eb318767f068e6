"""Shipped device profiles (YAML). Installed as the package data energyprof._profiles."""
