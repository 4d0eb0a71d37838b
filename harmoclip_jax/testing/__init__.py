"""Test and benchmark utilities (not used by the library at runtime)."""
