"""Tamper evidence: the append-only Merkle log of records and transfers, its signed checkpoints,
and the mileage certificates built from it."""
