"""``ray.train.lightning`` over ``prefect_distrain.lightning`` (imports Lightning)."""

from ...lightning import *  # noqa: F403 - the same names, one home
from ...lightning import __all__  # noqa: F401
