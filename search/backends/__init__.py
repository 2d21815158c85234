"""Search backends: Optuna (embedded default) and, later, Ray Tune; same space, same objective."""
