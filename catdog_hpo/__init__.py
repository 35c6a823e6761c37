"""catdog-hpo: hyperparameter optimisation of CNN image classifiers with Optuna."""

__version__ = "0.1.0"
