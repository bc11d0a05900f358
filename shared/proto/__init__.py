"""Generated protobuf/gRPC code (``make proto``; not in git). Import as ``from shared.proto.rlhf.v1 import ...``."""
