"""Optional FastAPI server exposing the primitives remotely, wire-compatible with the `tinker` SDK."""
