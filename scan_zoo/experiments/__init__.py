"""Experiments built from the layers below: the pipeline, the transfer benchmark, the digits zoo build."""
