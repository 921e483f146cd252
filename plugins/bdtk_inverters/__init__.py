"""Trigger inverters (Neural Cleanse) and the NC-unlearning purifier."""
