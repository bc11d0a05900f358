"""One package per service: generation, reward, reference, trainer, orchestrator."""
