"""tether: preference training of causal LMs with the DPO family, with control over the reference tether.

The objectives (DPO, IPO, cDPO, H-DPO, epsilon-DPO, TDPO1, TDPO2) live in `tether.objectives`; the memory-lean
token statistics that feed them in `tether.heads`; a functional API over full logits in `tether.functional`.
Importing tether has no side effects (no global torch settings, no trackers).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
