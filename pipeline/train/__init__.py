"""`stm train`: settings, the Ray Train driver, the worker loop and its Ray Data input (stages pretrain*, train*)."""
