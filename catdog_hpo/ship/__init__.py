"""Shipping a result: the trial file, train/retrain, checkpoints, model formats, predict."""
