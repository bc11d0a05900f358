"""Orchestrator: runs the RLHF loop over the four services; FastAPI control API and Prometheus /metrics."""
