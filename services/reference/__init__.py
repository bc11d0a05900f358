"""Reference service: a frozen causal LM answering LogProbs."""
