"""One module per scenario; each has ``run(ctx) -> Outcome``."""
