"""Work counts: what a workload declares it does, so a fit can separate the cost terms and the
simulated meter can price them. Integers only (bytes, FLOPs, elements)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class WorkCounts:
    """Exact counts of one kernel call.

    ``working_set_bytes`` is the footprint the call touches; it decides whether the traffic is
    cache-resident or goes to DRAM/HBM (the cost model's memory-level split).
    ``launches`` is the number of device kernels (torch ops) one call dispatches.
    ``scattered_bytes_written`` is the part of ``bytes_written`` written at scattered positions, and
    ``lines_written`` the number of distinct 64-byte lines those writes touch (summed over the ops
    that scatter): hardware pays scattered writes in whole lines.
    ``pages_written`` counts the distinct 4 KiB pages those lines lie in and ``line_runs_written`` the
    maximal runs of consecutive written lines (both summed over the ops that scatter; 0: not known).
    The cost model does not use them; the simulator's device model prices page walks (TLB) and
    prefetched neighbouring lines with them.
    """

    elements: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flops: int = 0
    working_set_bytes: int = 0
    launches: int = 0
    scattered_bytes_written: int = 0
    lines_written: int = 0
    pages_written: int = 0
    line_runs_written: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"WorkCounts.{f.name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"WorkCounts.{f.name} must be >= 0, got {value}")
        if self.scattered_bytes_written > self.bytes_written:
            raise ValueError("WorkCounts.scattered_bytes_written cannot exceed bytes_written")

    def scaled(self, calls: int) -> "WorkCounts":
        """Counts of ``calls`` repetitions (the working set does not grow with repetitions)."""
        if calls < 0:
            raise ValueError(f"calls must be >= 0, got {calls}")
        return WorkCounts(
            elements=self.elements * calls,
            bytes_read=self.bytes_read * calls,
            bytes_written=self.bytes_written * calls,
            flops=self.flops * calls,
            working_set_bytes=self.working_set_bytes,
            launches=self.launches * calls,
            scattered_bytes_written=self.scattered_bytes_written * calls,
            lines_written=self.lines_written * calls,
            pages_written=self.pages_written * calls,
            line_runs_written=self.line_runs_written * calls,
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
