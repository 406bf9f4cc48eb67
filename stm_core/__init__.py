"""Space-Time Memory networks (STM) and STRMN in pure PyTorch: model, memory, inference, metrics."""
