"""Protobuf <-> domain for messages more than one role reads (kept free of torch for the orchestrator)."""

from __future__ import annotations

from dataclasses import fields

from shared.proto.rlhf.v1 import trainer_pb2
from shared.types import TrainStats

_STAT_FIELDS = [f.name for f in fields(TrainStats) if f.name != "extra"]


def train_stats_to_pb(stats: TrainStats) -> trainer_pb2.TrainStats:
    return trainer_pb2.TrainStats(**{name: getattr(stats, name) for name in _STAT_FIELDS})


def train_stats_from_pb(message: trainer_pb2.TrainStats) -> TrainStats:
    return TrainStats(**{name: getattr(message, name) for name in _STAT_FIELDS})
