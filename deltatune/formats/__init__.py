"""On-disk formats: PEFT adapters (peft.py)."""
