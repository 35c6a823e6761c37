"""The search: a space turns Optuna trials into configs; studies, storage, locks and the study record."""
