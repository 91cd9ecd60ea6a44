"""What the agent and the backend share beyond the protocol: the wall clock, and how the
broker URL and listen addresses are written (docs/DESIGN.md §7). Standard library only; imports
neither ``agent`` nor ``backend``."""
