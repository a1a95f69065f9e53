"""Which ranks share a host, and the process sets of the hierarchical exchange (plan.Hosts).

The hierarchical exchange needs two of Horovod's process sets per rank: its host's ranks, and the
ranks of its local index on every host. Horovod registers process sets after hvd.init() only
with dynamic process sets on (``hvd.init(process_sets="dynamic")``, or
HOROVOD_DYNAMIC_PROCESS_SETS=1), every rank adding every set, in the same order. The adapters
call ``hosts_of_job`` at their first exchange; it needs no framework: Horovod's module and a
gather of small integers come as arguments.
"""

import os
import warnings

DYNAMIC = "HOROVOD_DYNAMIC_PROCESS_SETS"
NOT_DYNAMIC = ("horovod_tnq: this job runs {ranks} ranks on {hosts} hosts, where the hierarchical "
               "exchange (full precision inside a host, compressed between hosts) sends about "
               "1/{local} of the flat exchanges' bytes between hosts; it needs Horovod's dynamic "
               "process sets: call hvd.init(process_sets=\"dynamic\") (or set "
               "HOROVOD_DYNAMIC_PROCESS_SETS=1). Until then the flat exchange runs "
               "(docs/design.md#hierarchical-exchange)")
NOT_HOMOGENEOUS = ("horovod_tnq: the hosts of this job run different numbers of ranks; the "
                   "hierarchical exchange needs the same number on every host, so the flat "
                   "exchange runs")


def applies(size, local_size, cross_size):
    """Whether the hierarchical exchange can help: several hosts of several ranks each."""
    return size > 1 and local_size > 1 and cross_size > 1


def dynamic_process_sets():
    return os.environ.get(DYNAMIC, "0") not in ("", "0")


def host_groups(places):
    """(the ranks of each host, the ranks of each local index across hosts), sorted, from
    ``places``: (host index, local rank) of every rank in rank order (Horovod's cross_rank and
    local_rank); None where hosts run different numbers of ranks."""
    hosts = {}
    for rank, (host, _) in enumerate(places):
        hosts.setdefault(int(host), []).append(rank)
    sizes = sorted({len(ranks) for ranks in hosts.values()})
    if len(sizes) != 1:
        return None
    local = [sorted(ranks) for _, ranks in sorted(hosts.items())]
    cross = [sorted(ranks[index] for ranks in local) for index in range(sizes[0])]
    return local, cross


def hosts_of_job(hvd, gather_places, hosts_class, dynamic=None):
    """plan.Hosts of this rank (``hosts_class``), with its process sets registered, or None
    where the hierarchical exchange does not apply or is not available (one warning saying
    why, where it would help). Every rank must call it at the same point: with dynamic process
    sets it gathers every rank's place (``gather_places()``: a list of (cross_rank,
    local_rank), one per rank) and adds process sets.

    Every rank decides from what all share: the job's size, the environment, and the gathered
    places, never from its own local_size or cross_size, which differ between ranks where hosts
    run different numbers of ranks (an elastic job of 2 + 1): a rank deciding alone could skip
    a gather the others wait in.

    ``hvd``: Horovod's module, or anything with its size(), rank(), local_size(),
    cross_size() and add_process_set(ranks) (the DDP hook's, over torch.distributed groups);
    ``dynamic``: whether process sets can be added (None: Horovod's dynamic process sets)."""
    if hvd.size() < 4:  # several hosts of several ranks take 4 at least
        return None
    if not (dynamic_process_sets() if dynamic is None else dynamic):
        if applies(hvd.size(), hvd.local_size(), hvd.cross_size()):
            warnings.warn(NOT_DYNAMIC.format(ranks=hvd.size(), hosts=hvd.cross_size(),
                                             local=hvd.local_size()),
                          RuntimeWarning, stacklevel=4)
        return None
    groups = host_groups(gather_places())
    if groups is None:
        warnings.warn(NOT_HOMOGENEOUS, RuntimeWarning, stacklevel=4)
        return None
    local_groups, cross_groups = groups
    if not applies(hvd.size(), len(local_groups[0]), len(local_groups)):
        return None
    rank = hvd.rank()
    sets = {}
    for ranks in local_groups + cross_groups:  # every rank adds every set, in this order
        sets[tuple(ranks)] = _add_process_set(hvd, ranks)
    local = next(ranks for ranks in local_groups if rank in ranks)
    cross = next(ranks for ranks in cross_groups if rank in ranks)
    return hosts_class(len(local), len(cross), local.index(rank), sets[tuple(local)],
                       sets[tuple(cross)])


def _add_process_set(hvd, ranks):
    """hvd.add_process_set(ranks), or the registered set of those ranks where one exists (the
    user's, or this job's before an elastic reset)."""
    try:
        return hvd.add_process_set(ranks)
    except ValueError as error:
        if "duplicate" not in str(error):
            raise
    return _registered_set(ranks)


def _registered_set(ranks):
    """Horovod's process set of exactly ``ranks`` (it has no public lookup)."""
    from horovod.common import process_sets
    for set_id, members in process_sets._basics._get_process_set_ids_and_ranks().items():
        if list(members) == list(ranks):
            found = process_sets._temp_process_set_object(set_id)
            found.ranks = list(ranks)
            return found
    raise RuntimeError(f"Horovod refused the process set of ranks {ranks} as a duplicate but "
                       "has none")
