"""Training: the config, checkpoints and the training loop, the neighbour-mining driver."""
