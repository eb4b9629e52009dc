"""Evaluation: the linear probe and its cache, the transfer suite, retrieval."""
