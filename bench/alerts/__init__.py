"""Alert-quality benchmark: do the alerts page when, and only when, something is wrong? (docs/alerts.md)

``python -m bench.alerts record`` records traffic once from a real vLLM; ``python -m bench.alerts`` replays it
through real proxy replicas on a simulated clock into a real Prometheus with the project's rule files, scenario
by scenario, and writes the table in docs/alerts.md.
"""
