"""`helios bench`: HELIOS against the static early-exit baseline and plain `generate`, side by side.

One call trains (or reuses) a family of early-exit models, profiles them, lets the operator's own
policy choose a (candidate, depth), and measures all three configurations on the same prompts in
one process. See bench/README.md.
"""

from __future__ import annotations
