"""The training library: TrialConfig + ImageSet -> a trained model (fit, models, augment, metrics). No Optuna."""
