"""Helpers shared by the tests: plain modules, imported as ``tests.support.<module>``."""
