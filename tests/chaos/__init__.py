"""Chaos: the whole system on real processes, killed and restarted at random moments."""
