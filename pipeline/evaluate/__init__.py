"""`stm evaluate`: memory variants, the Ray actors that run them, and their outputs (stage evaluate)."""
