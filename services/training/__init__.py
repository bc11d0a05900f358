"""Training jobs run as commands (``rlhf train sft|reward|dpo``): SFT, reward model (Bradley-Terry), DPO."""
