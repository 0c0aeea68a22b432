"""The native sync engine: plan, transfer, verify, record."""
