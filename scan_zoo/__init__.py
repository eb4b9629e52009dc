"""scan_zoo: SCAN (Supervised Contrastive Adjustment in Neighborhood, Wei et al. 2020) pretraining,
its baselines (MoCo-v2, supervised contrastive, cross-entropy) and a timm-style weight zoo.

This is not SCAN clustering ("Learning to Classify Images without Labels", Van Gansbeke et al. 2020).

Importing the package registers the zoo's weights as timm pretrained tags:
``timm.create_model('test_resnet.scan_digits', pretrained=True)``.
"""

from scan_zoo.common.errors import UserError
from scan_zoo.core.losses import masked_info_nce
from scan_zoo.core.neighbors import mine_neighbors
from scan_zoo.data.neighbor_table import load_neighbors
from scan_zoo.zoo.registry import ENTRIES, get_entry, list_models
from scan_zoo.zoo.timm_bridge import install as _install_timm_tags

__version__ = "0.1.0"
__all__ = [
    "ENTRIES",
    "UserError",
    "get_entry",
    "list_models",
    "masked_info_nce",
    "mine_neighbors",
    "load_neighbors",
    "__version__",
]

_install_timm_tags()
