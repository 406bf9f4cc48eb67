"""`stm evaluate`: memory variants, the Ray tasks that run them, and their outputs (stage evaluate)."""
