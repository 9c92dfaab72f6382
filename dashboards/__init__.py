"""Grafana dashboards and Grafana-managed alert rules for entropy-proxy, generated from code.

``python -m dashboards.generate`` writes every generated file (see :mod:`dashboards.generate`); CI regenerates
and fails on a diff, so the JSON and YAML in the repository are always what this code produces.
"""
