"""``ray.train.tensorflow`` over ``prefect_distrain.tensorflow`` (imports TensorFlow)."""

from ....tensorflow import *  # noqa: F403 - the same names, one home
from ....tensorflow import __all__  # noqa: F401
