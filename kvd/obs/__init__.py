"""Observability: logs, Prometheus metrics, systemd notify."""
