"""Generation service: samples responses from the policy being trained; swaps in new weights atomically."""
