"""param_map reading and bucket layouts, where the documented tool's interface expects them: beside
convert_pt2ckpt.py in a checkout. Only the checkout has this file; `pip install .` installs the
module inside the package as `megatron_ms_convert.param_map_utils` (a generic top-level name in
site-packages could shadow another project's), and this file re-exports it.
"""

from megatron_ms_convert.param_map_utils import *  # noqa: F401,F403
from megatron_ms_convert.param_map_utils import __all__  # noqa: F401
