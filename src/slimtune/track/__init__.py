"""Run folders: every run is a directory with its config, metrics, summary and adapter."""
