"""Exactly-once training steps: each TrainStep is keyed by (run, iteration), and the trainer keeps its position.

A step is applied when it is a run's first iteration (on whatever state the trainer holds: a new run continues
from it) or the next iteration of the run the trainer is in. A step already applied is never applied again: its
retry (a reply lost to a deadline or a dropped connection) gets the stored statistics. Anything else contradicts
the trainer's state and is refused with the position, so that the orchestrator can replay what the trainer lacks
(after a restart from an older checkpoint) instead of training out of order.

The ledger travels in every checkpoint, so a restarted trainer knows which step its state ends at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from shared.errors import Conflict, InvalidInput
from shared.types import TrainStats

KEEP_RESULTS = 16  # stored statistics per run: a retry only ever asks for the last step or two


@dataclass
class StepLedger:
    run_id: str = ""  # run of the last keyed step applied ("" = none)
    iteration: int = 0  # its iteration (0 = none)
    results: dict[int, dict] = field(default_factory=dict)  # iteration -> TrainStats as a dict, this run only

    def position(self) -> tuple[str, int]:
        return self.run_id, self.iteration

    def check(self, run_id: str, iteration: int) -> TrainStats | None:
        """The stored statistics if (run_id, iteration) was applied; None if it is to be applied now; raises
        ``Conflict`` naming the trainer's position otherwise."""
        if iteration < 1:
            raise InvalidInput("iteration", f"must be >= 1 in a keyed step (run_id set), got {iteration}")
        if run_id == self.run_id:
            if iteration in self.results:
                return _stats(self.results[iteration])
            if iteration == self.iteration + 1:
                return None
        elif iteration == 1:
            return None
        where = f"iteration {self.iteration} of run {self.run_id!r}" if self.run_id else "no keyed step yet"
        raise Conflict(
            f"step (run {run_id!r}, iteration {iteration}) does not follow the trainer's state ({where}): "
            "replay the missing iterations first"
        )

    def record(self, run_id: str, iteration: int, stats: TrainStats) -> None:
        if run_id != self.run_id:
            self.results = {}
        self.run_id, self.iteration = run_id, iteration
        self.results[iteration] = asdict(stats)
        for old in sorted(self.results)[:-KEEP_RESULTS]:
            del self.results[old]

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "iteration": self.iteration, "results": self.results}

    @classmethod
    def from_json(cls, data: dict | None) -> StepLedger:
        if not data:
            return cls()
        results = {int(k): v for k, v in data.get("results", {}).items()}
        return cls(run_id=data.get("run_id", ""), iteration=int(data.get("iteration", 0)), results=results)


def _stats(data: dict) -> TrainStats:
    return TrainStats(**{**data, "extra": dict(data.get("extra", {}))})
