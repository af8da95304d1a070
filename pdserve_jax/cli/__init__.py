"""absl apps: serve, simulate, plan, profile, demo."""
