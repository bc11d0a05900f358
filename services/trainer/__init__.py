"""PPO trainer role: policy + critic + optimizer state behind a transport-free backend."""
