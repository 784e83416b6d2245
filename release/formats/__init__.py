"""Output formats. Each module has the same shape: plan, write (atomically), self-check."""
