"""metagpt_fast: fused attention and positional-encoding kernels for GPT-style transformers.

Every op has a readable PyTorch reference and fast Triton / CUDA / C++ CPU backends behind one API::

    import metagpt_fast
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True)   # like torch's SDPA
    model = metagpt_fast.MetaGPT(256, 128, 4, 4, 0.1, 256)                      # the article's constructor
    metagpt_fast.available_backends()                                            # which backends run here, or why not
    model = metagpt_fast.optimize(existing_model)      # swap nn.MultiheadAttention & co. for fused modules, in place
    with metagpt_fast.sdpa_routing(): ...               # route F.scaled_dot_product_attention calls through it
"""

from metagpt_fast.backends import BACKENDS, available_backends, use_backend
from metagpt_fast.integrations.sdpa import disable_sdpa_routing, enable_sdpa_routing, sdpa_routing
from metagpt_fast.model import MetaGPT, MetaGPTConfig
from metagpt_fast.ops import *  # noqa: F403  (every public op, listed in metagpt_fast.ops.__all__)
from metagpt_fast.ops import __all__ as _ops_all
from metagpt_fast.optimize import OptimizeReport, optimize

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "MetaGPT",
    "MetaGPTConfig",
    "OptimizeReport",
    "__version__",
    "available_backends",
    "disable_sdpa_routing",
    "enable_sdpa_routing",
    "optimize",
    "sdpa_routing",
    "use_backend",
    *_ops_all,
]
