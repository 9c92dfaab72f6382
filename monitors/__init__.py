"""Pure computation: entropy estimators and detectors (no web, no Prometheus)."""
