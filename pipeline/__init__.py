"""Orchestration: DVC stages on Ray Data / Ray Train, tracked in MLflow. Imports stm_core, never the reverse."""
