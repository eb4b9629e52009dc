"""scan_zoo: SCAN (Supervised Contrastive Adjustment in Neighborhood, Wei et al. 2020) pretraining,
its baselines (MoCo-v2, supervised contrastive, cross-entropy) and a timm-style weight zoo.

This is not SCAN clustering ("Learning to Classify Images without Labels", Van Gansbeke et al. 2020).
"""
from .errors import UserError
from .losses import masked_info_nce
from .neighbors import load_neighbors, mine_neighbors

__version__ = "0.1.0"
__all__ = ["UserError", "masked_info_nce", "mine_neighbors", "load_neighbors", "__version__"]
