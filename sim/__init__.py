"""Simulated cars on the ELM327 emulator, for tests and the demo (never shipped in the agent)."""
