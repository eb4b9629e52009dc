"""Backbones: building, strict loading, converters and one feature-extraction loop."""
