"""The project's common library: config, tensor codec, server bootstrap, errors, metrics, model loading, RL math."""
