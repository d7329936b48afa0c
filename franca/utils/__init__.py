"""Small utilities shared by the trainer and the evaluation commands."""
