"""Checks of the log's formats by independent implementations (test support)."""
