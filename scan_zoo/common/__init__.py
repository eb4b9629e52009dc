"""Shared helpers with no scan_zoo dependencies: errors, hashing and atomic files, distributed glue, readers of untrusted files."""
