"""The whole RLHF pipeline as one command (``rlhf pipeline``): pretrain -> SFT -> sample -> label -> reward model
-> PPO through the services -> DPO -> evaluation and report."""
