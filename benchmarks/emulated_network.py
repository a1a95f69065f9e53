"""Emulated hosts on one machine: one network namespace per host, each with its own NIC.

Each host is a network namespace with one veth interface ``eth0`` (address 198.18.0.<i+1>/24,
the range RFC 2544 sets aside for benchmarking) whose other end is a port of a bridge in a
"switch" namespace. Programs run on a host also get its own hostname, ``host<i>``, in a UTS
namespace, and an /etc/hosts naming every host (iproute2 bind-mounts /etc/netns/<namespace>/hosts
for them): Gloo binds Horovod's process-set contexts to the address the hostname resolves to
(Horovod 0.28.1 does not pass HOROVOD_GLOO_IFACE on to them), so a shared hostname resolving to
127.0.0.1 would break the job, as it would on a real cluster.

A rate limit shapes both directions of every host's link with tbf: the host's own egress (its
upload) and the switch port's egress towards it (its download), so each host has a full-duplex
NIC of that rate, as behind a switch, rather than all workers sharing one loopback. Ranks started
on the same host (horovodrun's ``-H host0:L,...``, torchrun's ``--nproc-per-node L``) share its
namespace, and what they send each other goes to the host's own address, which the kernel routes
through the namespace's loopback: unshaped, the fast link inside a host. Traffic never
leaves these namespaces (they have no route anywhere else). Added latency needs the netem qdisc,
which not every kernel has: the project's machines (a VM kernel without modules) have tbf and
htb but no netem, so there the link delay is the veth's own (tens of microseconds).

horovodrun reaches the hosts through ``ssh HOST COMMAND``: ``EmulatedNetwork.horovodrun`` runs
horovodrun in host 0's namespace with benchmarks/netns_ssh.py first on PATH as ``ssh``, which runs
the command inside that host's namespace. Everything else is stock horovodrun.
``EmulatedNetwork.run_on_hosts`` instead starts one command in every host's namespace, as a
launcher run on each node does (torchrun for PyTorch DDP), and waits for all.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2. Namespaces are named
``tnqbench-<pid>-*`` and are removed on exit, also after an error or an interrupt;
``remove_stale_namespaces()`` removes those of runs that died without cleaning up.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchmarks.launcher import wait_for_launchers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PREFIX = "tnqbench-"
SUBNET = "198.18.0"
SSH_STAND_IN = os.path.join(HERE, "netns_ssh.py")
ETC_NETNS = "/etc/netns"  # iproute2 bind-mounts /etc/netns/<namespace>/* over /etc/* in it


class NetworkSetupError(RuntimeError):
    """The emulated network could not be built here (not root, no iproute2, no tc qdisc...)."""


def run_ip(*args, check=True):
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetworkSetupError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def namespace_names():
    done = run_ip("-j", "netns", "list", check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(done.stdout)]


def remove_stale_namespaces():
    """Delete tnqbench namespaces left by runs whose process is gone (killed without cleanup);
    their processes, if any, are ended first."""
    for name in namespace_names():
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX):].split("-")[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            _end_processes_in(name)
            run_ip("netns", "delete", name, check=False)


def _end_processes_in(namespace):
    """SIGKILL the processes inside ``namespace`` (ours: only the harness starts any there)."""
    done = run_ip("netns", "pids", namespace, check=False)
    for pid in done.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def host_command_prefix(namespace, hostname):
    """Command prefix running a program in ``namespace`` under its own ``hostname``."""
    return ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c",
            'hostname "$0" && exec "$@"', hostname]


class EmulatedNetwork:
    """``hosts`` namespaces joined by a bridge; each link shaped to ``rate_mbit`` (None: not
    shaped) per direction, plus ``rtt_ms`` of round-trip delay split over the four hops between
    two hosts (needs the kernel's netem qdisc). Use as a context manager."""

    def __init__(self, hosts, rate_mbit=None, rtt_ms=0.0, queue_ms=10.0):
        if not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be in [1, 250], got {hosts}")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be positive, got {rate_mbit}")
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms}")
        self.rate_mbit, self.rtt_ms, self.queue_ms = rate_mbit, rtt_ms, queue_ms
        tag = f"{PREFIX}{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.switch = f"{tag}-sw"
        self.hosts = [f"{tag}-h{i}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self.hostnames = [f"host{i}" for i in range(hosts)]
        self._ssh_dir = None

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self):
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc):
        self.teardown()

    def setup(self):
        if os.geteuid() != 0:
            raise NetworkSetupError("the emulated network needs root (network namespaces, tc)")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise NetworkSetupError("the emulated network needs iproute2's `ip` and `tc`")
        run_ip("netns", "add", self.switch)
        run_ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        run_ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (host, address) in enumerate(zip(self.hosts, self.addresses)):
            port = f"port{i}"
            run_ip("netns", "add", host)
            run_ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                   "netns", host)
            run_ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            run_ip("-n", host, "addr", "add", f"{address}/24", "dev", "eth0")
            run_ip("-n", host, "link", "set", "eth0", "up")
            run_ip("-n", host, "link", "set", "lo", "up")
            self._shape(host, "eth0")           # the host's upload
            self._shape(self.switch, port)      # its download
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{address} {name}\n" for address, name in zip(self.addresses, self.hostnames))
        for host in self.hosts:
            os.makedirs(os.path.join(ETC_NETNS, host))
            with open(os.path.join(ETC_NETNS, host, "hosts"), "w") as f:
                f.write(hosts_file)
        self._ssh_dir = tempfile.mkdtemp(prefix="tnqbench-ssh-")
        os.symlink(SSH_STAND_IN, os.path.join(self._ssh_dir, "ssh"))

    def _shape(self, namespace, device):
        tc = ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device]
        parent = ["root"]
        if self.rtt_ms:
            delay = f"{self.rtt_ms / 4:.3f}ms"
            self._tc(tc + ["root", "handle", "1:", "netem", "delay", delay, "limit", "100000"],
                     "netem (needed for --rtt-ms)")
            parent = ["parent", "1:1", "handle", "10:"]
        if self.rate_mbit:
            rate_bytes = self.rate_mbit * 1e6 / 8
            # a burst of 1 ms of traffic (at least a few full-size frames) keeps tbf exact at
            # high rates; the queue holds queue_ms of traffic before dropping, like a switch
            burst = max(int(rate_bytes * 1e-3), 16 * 1514)
            self._tc(tc + parent + ["tbf", "rate", f"{self.rate_mbit}mbit", "burst",
                                    str(burst), "latency", f"{self.queue_ms}ms"], "tbf")

    @staticmethod
    def _tc(command, what):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise NetworkSetupError(f"tc qdisc {what} is not available here: "
                                    f"{done.stderr.strip()} (`{' '.join(command[4:])}`)")

    def teardown(self):
        """End every process still inside our namespaces, then delete them (their veths and the
        bridge go with them). Safe to call twice and after a partial setup."""
        existing = set(namespace_names())
        for namespace in self.hosts + [self.switch]:
            if namespace in existing:
                _end_processes_in(namespace)
                run_ip("netns", "delete", namespace, check=False)
        for host in self.hosts:
            shutil.rmtree(os.path.join(ETC_NETNS, host), ignore_errors=True)
        try:
            os.rmdir(ETC_NETNS)  # only when empty: another run may be using it
        except OSError:
            pass
        if self._ssh_dir:
            shutil.rmtree(self._ssh_dir, ignore_errors=True)
            self._ssh_dir = None

    # -- use ----------------------------------------------------------------------------------
    def exec_prefix(self, host):
        """Command prefix running a program on host ``host`` (an index)."""
        return host_command_prefix(self.hosts[host], self.hostnames[host])

    def counters(self, host):
        """(bytes sent, bytes received) so far by host ``host``'s NIC."""
        done = run_ip("-n", self.hosts[host], "-j", "-s", "link", "show", "dev", "eth0")
        stats = json.loads(done.stdout)[0]["stats64"]
        return stats["tx"]["bytes"], stats["rx"]["bytes"]

    def horovodrun(self, command, env, timeout=None):
        """Run ``command`` (a horovodrun command line naming these hosts' addresses) from host 0,
        remote hosts reached through the ssh stand-in; returns the CompletedProcess. Whatever
        is left running when it ends or times out is ended with the namespaces' processes."""
        hosts_map = {}
        for address, namespace, name in zip(self.addresses, self.hosts, self.hostnames):
            hosts_map[address] = hosts_map[name] = [namespace, name]
        env = dict(env, PATH=self._ssh_dir + os.pathsep + env.get("PATH", os.defpath),
                   PYTHONPATH=ROOT,  # the ssh stand-in and the workers import benchmarks.*
                   TNQ_NETNS_HOSTS=json.dumps(hosts_map))
        process = subprocess.Popen(self.exec_prefix(0) + command, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            for namespace in self.hosts:
                _end_processes_in(namespace)
            process.communicate()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def run_on_hosts(self, commands, env, timeout=None, linger=60.0):
        """Run ``commands[i]`` on host i, all at once, as a launcher started on every node would
        be (torchrun), and wait for all; returns their CompletedProcesses in host order. When
        one fails the others are ended (its peers would wait for it in a collective until the
        timeout), and so is everything still running at the timeout (TimeoutExpired).

        Once one has ended successfully the others get ``linger`` seconds to end, then are
        ended and counted as successful (launcher.wait_for_launchers says why)."""
        env = dict(env, PYTHONPATH=ROOT)  # the workers import benchmarks.*
        processes, outputs = [], []
        lingering = set()  # the processes ended after another ended successfully
        try:
            for host, command in enumerate(commands):
                # files rather than pipes: a process blocked on a full pipe while we wait on
                # another would stall its peers' collectives
                out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
                outputs.append((out, err))
                processes.append(subprocess.Popen(self.exec_prefix(host) + command, env=env,
                                                  text=True, stdout=out, stderr=err,
                                                  start_new_session=True))
            lingering = wait_for_launchers(processes, timeout, linger)
        finally:
            if any(process.poll() is None for process in processes):
                for process in processes:
                    if process.poll() is None:
                        os.killpg(process.pid, signal.SIGKILL)
                for namespace in self.hosts[:len(commands)]:
                    _end_processes_in(namespace)
                for process in processes:
                    process.wait()
        done = []
        for index, (process, (out, err)) in enumerate(zip(processes, outputs)):
            out.seek(0)
            err.seek(0)
            code = 0 if index in lingering else process.returncode
            done.append(subprocess.CompletedProcess(process.args, code, out.read(), err.read()))
            out.close()
            err.close()
        return done

    def hosts_argument(self, workers, ranks_per_host=1):
        """horovodrun's -H for ``workers`` ranks, ``ranks_per_host`` on each of the first
        workers / ranks_per_host hosts (Horovod numbers ranks host by host)."""
        hosts, rest = divmod(workers, ranks_per_host)
        if ranks_per_host < 1 or rest:
            raise ValueError(f"{workers} workers do not fill hosts of {ranks_per_host} ranks")
        if hosts > len(self.hosts):
            raise ValueError(f"{workers} workers need {hosts} hosts, the network has "
                             f"{len(self.hosts)}")
        return ",".join(f"{name}:{ranks_per_host}" for name in self.hostnames[:hosts])

    def throughput_mbit(self, source, destination, megabytes=50):
        """Goodput of one TCP stream from host ``source`` to ``destination``, in Mbit/s, as
        its receiver measures it (first byte to last)."""
        address = self.addresses[destination]
        receiver = subprocess.Popen(
            self.exec_prefix(destination) + [sys.executable, "-c", _RECEIVER, address],
            stdout=subprocess.PIPE, text=True)
        try:
            sender = subprocess.run(
                self.exec_prefix(source) + [sys.executable, "-c", _SENDER, address,
                                            str(megabytes)],
                capture_output=True, text=True, timeout=120)
            if sender.returncode != 0:
                raise NetworkSetupError(f"throughput sender failed: {sender.stderr[-2000:]}")
            received, seconds = map(float, receiver.communicate(timeout=120)[0].split())
        finally:
            if receiver.poll() is None:
                receiver.kill()
        return 8 * received / seconds / 1e6


_RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 5201))
connection, _ = server.accept()
received, first = 0, None
while True:
    chunk = connection.recv(1 << 20)
    if not chunk:
        break
    if first is None:  # the clock starts once data flows; this chunk is not timed
        first = time.perf_counter()
    else:
        received += len(chunk)
print(received, time.perf_counter() - first)
"""

_SENDER = """
import socket, sys, time
for attempt in range(100):
    try:
        connection = socket.create_connection((sys.argv[1], 5201))
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
block = bytes(1 << 20)
for _ in range(int(sys.argv[2])):
    connection.sendall(block)
connection.close()
"""
