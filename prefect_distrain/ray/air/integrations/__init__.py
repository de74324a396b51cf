"""``ray.air.integrations``."""
