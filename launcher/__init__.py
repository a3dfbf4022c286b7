"""Hydra entry point (`python -m launcher +experiment=...`), recipes and environments.

(Landing with issue #4.)
"""
