"""Evaluation: a fast STS scorer used during training and demos, and the MTEB harness."""
