"""What the elastic workers share: rewriting the host-discovery file that horovodrun polls."""

import os


def set_hosts(hosts_file, hosts):
    """Atomically replace ``hosts_file`` with ``hosts`` (one "host:slots" line): horovodrun's
    discovery script prints it, so the job shrinks or grows to it."""
    with open(hosts_file + ".new", "w") as f:
        f.write(hosts + "\n")
    os.replace(hosts_file + ".new", hosts_file)
