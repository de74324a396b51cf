"""``ray.air.session``: what the training function calls."""

from ...session import get_checkpoint, get_dataset_shard, report


def get_world_rank() -> int:
    from ...session import get_context

    return get_context().get_world_rank()


def get_world_size() -> int:
    from ...session import get_context

    return get_context().get_world_size()


def get_local_rank() -> int:
    from ...session import get_context

    return get_context().get_local_rank()


__all__ = ["get_checkpoint", "get_dataset_shard", "get_local_rank", "get_world_rank",
           "get_world_size", "report"]
