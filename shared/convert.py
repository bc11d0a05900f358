"""Protobuf <-> domain for messages more than one role reads (kept free of torch for the orchestrator)."""

from __future__ import annotations

from dataclasses import fields

from shared.chat import Conversation, check_conversation
from shared.proto.rlhf.v1 import chat_pb2, trainer_pb2
from shared.types import TrainStats

_STAT_FIELDS = [f.name for f in fields(TrainStats) if f.name != "extra"]


def train_stats_to_pb(stats: TrainStats) -> trainer_pb2.TrainStats:
    return trainer_pb2.TrainStats(**{name: getattr(stats, name) for name in _STAT_FIELDS})


def train_stats_from_pb(message: trainer_pb2.TrainStats) -> TrainStats:
    return TrainStats(**{name: getattr(message, name) for name in _STAT_FIELDS})


def conversations_to_pb(conversations: list[Conversation]) -> list[chat_pb2.Conversation]:
    return [
        chat_pb2.Conversation(messages=[chat_pb2.Message(role=m["role"], content=m["content"]) for m in c])
        for c in conversations
    ]


def conversations_from_pb(messages, field: str) -> list[Conversation]:
    """Checked conversations from repeated ``Conversation`` messages; errors name ``field[i]``."""
    return [
        check_conversation([{"role": m.role, "content": m.content} for m in c.messages], f"{field}[{i}]")
        for i, c in enumerate(messages)
    ]
