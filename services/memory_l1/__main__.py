"""Run the memory-l1 sidecar: `python -m services.memory_l1`."""

from services.memory_l1.service import build
from shared.service import main

if __name__ == "__main__":
    main("memory-l1", "L1: the newest messages of the users this worker talks to", build)
