"""`just demo`: the lead fleet against a fresh stack, the results table, the HTML report (run.py)."""
