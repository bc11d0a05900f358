"""Preference labelling: who compares two responses to a prompt (a simulated labeller today, a web UI later)."""

from services.labeling.labelers import Choice, Comparison, Labeler, SimulatedLabeler, preference_rows

__all__ = ["Choice", "Comparison", "Labeler", "SimulatedLabeler", "preference_rows"]
