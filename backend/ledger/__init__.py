"""What a stored record is worth: the partner's rules, the rewards they give, the double-entry
accounts, drivers' assignments to vehicles, and the audit that recomputes every credit."""
