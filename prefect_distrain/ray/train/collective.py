"""``ray.train.collective``: barriers and broadcasts between the ranks."""

from ...collective import barrier, broadcast_from_rank_zero

__all__ = ["barrier", "broadcast_from_rank_zero"]
