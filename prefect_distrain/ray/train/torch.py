"""``ray.train.torch`` over ``prefect_distrain.torch`` (imports torch)."""

from ...torch import *  # noqa: F403 - the same names, one home
from ...torch import __all__  # noqa: F401
