"""Franca pretraining: meta-architecture, training loop, schedules and optimizer parameter groups."""
