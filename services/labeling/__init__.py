"""Preference labelling: who compares responses to a prompt (people in the labelling app, a simulated labeller, AI
judges), behind one ``Labeler`` interface."""

from services.labeling.labelers import (
    DECIDED,
    Choice,
    Comparison,
    Labeler,
    SimulatedLabeler,
    Verdict,
    preference_rows,
)

__all__ = ["DECIDED", "Choice", "Comparison", "Labeler", "SimulatedLabeler", "Verdict", "preference_rows"]
