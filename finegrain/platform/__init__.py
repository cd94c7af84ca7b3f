"""Config, Ray Train loop, metrics, MLflow tracking and Ray Tune search."""
