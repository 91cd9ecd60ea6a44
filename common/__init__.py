"""What the agent and the backend share beyond the protocol: the wall clock, and how the
broker URL and listen addresses are written (DESIGN §7). Standard library only; imports
neither ``agent`` nor ``backend``."""
