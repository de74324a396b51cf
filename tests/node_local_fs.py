"""A node-local disk on a one-machine Ray cluster: ``nodelocal://<path>`` is the folder
``<root>/<Ray node id>/<path>`` of the node the calling process runs on.

``ray.cluster_utils.Cluster`` starts all its nodes on one machine, so a plain local path is
shared by every node. This protocol gives each node a disk of its own, as a real multi-node
cluster has: what the driver (on the head node) writes, a worker on another node does not see.

Not a ``LocalFileSystem`` subclass (its paths are not the machine's paths): fsspec's
``DirFileSystem`` over the node's folder, with parent folders made on write like an object
store. Registered in the driver with ``install`` and in every Ray worker process by the
``setup_hook`` passed as ``runtime_env={"worker_process_setup_hook": ...}``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

TESTS = os.path.dirname(os.path.abspath(__file__))


class NodeLocalFileSystem(DirFileSystem):
    protocol = "nodelocal"
    #: A process stays on its node, but a test session may connect to several clusters.
    cachable = False
    #: The folder that holds one sub-folder per Ray node.
    root: str | None = None

    def __init__(self, **storage_options):
        import ray

        if type(self).root is None:
            raise RuntimeError("nodelocal:// is not installed in this process")
        node = ray.get_runtime_context().get_node_id()
        super().__init__(path=os.path.join(type(self).root, node),
                         fs=LocalFileSystem(auto_mkdir=True), **storage_options)


def install(root: str) -> None:
    """Make ``nodelocal://`` known in this process, with the node folders under ``root``."""
    NodeLocalFileSystem.root = root
    fsspec.register_implementation("nodelocal", NodeLocalFileSystem, clobber=True)


def setup_hook(root: str) -> Callable[[], None]:
    """A Ray ``worker_process_setup_hook`` that installs the protocol in each worker process
    (pickled by value: a closure; it imports this module from the tests folder)."""

    def hook() -> None:
        sys.path.insert(0, TESTS)
        import node_local_fs

        node_local_fs.install(root)

    return hook
