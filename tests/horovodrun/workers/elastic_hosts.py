"""What the elastic workers share: rewriting the host-discovery file that horovodrun polls, and
waiting for the job to grow back."""

import os
import time


def set_hosts(hosts_file, hosts):
    """Atomically replace ``hosts_file`` with ``hosts`` (one "host:slots" line): horovodrun's
    discovery script prints it, so the job shrinks or grows to it."""
    with open(hosts_file + ".new", "w") as f:
        f.write(hosts + "\n")
    os.replace(hosts_file + ".new", hosts_file)


def wait_for_size(state, size, wanted, checks=240, interval_s=0.5):
    """Called by every rank at the same step, in a job of ``size`` workers: unless that is
    ``wanted``, wait for Horovod to make it so (the hosts file changed, or a replacement is
    due) rather than go on in the old world, however long that takes on a loaded machine.
    state.check_host_updates() raises HostsUpdatedInterrupt once Horovod acts (a rank taken
    away may instead see its peer stop, a HorovodInternalError); hvd.elastic.run then resumes
    from the last commit in the new world. Every rank makes the same number of checks (each is
    a broadcast), so the limit cannot part them."""
    if size == wanted:
        return
    for _ in range(checks):
        time.sleep(interval_s)
        state.check_host_updates()
    raise RuntimeError(f"the job did not go from {size} to {wanted} workers in "
                       f"{checks * interval_s:.0f} s")
