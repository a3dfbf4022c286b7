"""Hydra configuration tree, installed as package data (`pkg://conf`)."""
