"""``sluiceway demo``: the main job end to end on the local stack, and what it feeds in."""
