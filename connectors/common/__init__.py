"""What every connector shares: mapping files, checkpoints, dead letters."""
