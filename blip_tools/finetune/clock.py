"""How long a fine-tuning run took, without the seconds Python spends importing torch and transformers.

A tiny run trains in about a second but imports for several; `FinetuneReport.seconds` is the run's own time (data,
model load, training, export) and `import_seconds` the imports, so neither hides in the other. No torch import here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class RunClock:
    """Wall time since `started`, less the time spent inside `importing()` blocks."""

    started: float = field(default_factory=time.perf_counter)
    """`time.perf_counter()` when the run began."""
    import_seconds: float = 0.0
    """Time spent importing the training libraries (not part of `seconds()`)."""

    @contextmanager
    def importing(self) -> Iterator[None]:
        """Count the time of the block as imports, not as the run's."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.import_seconds += time.perf_counter() - began

    def seconds(self) -> float:
        """The run's own wall time so far (imports left out)."""
        return time.perf_counter() - self.started - self.import_seconds


__all__ = ["RunClock"]
