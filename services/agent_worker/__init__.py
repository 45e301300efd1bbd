"""The reference agent worker: simulated SMS sales bots driving tiermem (see worker.py)."""
