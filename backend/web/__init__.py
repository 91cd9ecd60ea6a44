"""HTTP: the JSON API, the operator dashboard, metrics and health."""
