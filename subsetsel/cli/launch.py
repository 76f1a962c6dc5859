"""`--nproc N`: a command run again in N processes by torchrun's own launcher."""

from __future__ import annotations

import click


def launch(command: str, nproc: int) -> None:
    """Run this command line again in `nproc` processes with torchrun's launcher (one machine,
    a free rendezvous port, no restarts); a failed rank becomes one error line here."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    args = sys.argv[1:]
    drop = {i for i, a in enumerate(args) if a == "--nproc"}
    drop |= {i + 1 for i in drop}
    args = [a for i, a in enumerate(args) if i not in drop and not a.startswith("--nproc=")]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.5)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "subsetsel", *args)
    except ChildFailedError as err:
        ranks = ", ".join(str(f.local_rank) for f in err.failures.values())
        raise click.ClickException(f"{command} with {nproc} processes failed (rank {ranks}); "
                                   "see the ranks' messages above") from None
