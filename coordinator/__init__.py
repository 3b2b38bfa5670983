"""geotrain coordinator: holds the global model, leases data, merges workers' deltas."""
