"""geotrain worker: trains local rounds on a GPU and exchanges compressed deltas."""
