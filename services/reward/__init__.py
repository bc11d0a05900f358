"""Reward service: scores (prompt, response) pairs with a reward model or a rule-based reward function."""
