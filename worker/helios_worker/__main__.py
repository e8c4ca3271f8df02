"""`python -m helios_worker`: the worker without the operator's CLI (the worker image has no kopf)."""

from helios_worker.serve import main

if __name__ == "__main__":
    main()
