#!/usr/bin/env python3
"""A stand-in for ``ssh`` that reaches the emulated hosts of benchmarks/emulated_network.py.

horovodrun starts remote workers with ``ssh -o ... HOST [-p PORT] [-i FILE] [-o ...] COMMAND``.
Here each host is a network namespace on this machine, so "logging in" to HOST means running
COMMAND with ``sh -c`` inside the namespace of the host with that name or address, under its
hostname, with a fresh minimal environment as sshd would give (horovodrun exports what the worker
needs in COMMAND itself). The map comes from the TNQ_NETNS_HOSTS environment variable (JSON:
name or address -> [namespace, hostname]), set by the harness; an unknown host fails like an
unreachable one.
"""

import json
import os
import sys

from benchmarks.emulated_network import host_command_prefix

# ssh's options that take a value (OpenSSH 9); every other option is a flag
VALUE_OPTIONS = set("BbcDEeFIiJLlmOoPpQRSWw")
LOGIN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": os.path.expanduser("~"), "SHELL": "/bin/sh", "LANG": "C.UTF-8"}


def split_ssh_arguments(argv):
    """(host, command words) from ssh's arguments, options allowed before and after the host
    as OpenSSH allows."""
    host, words, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and len(arg) > 1 and not words:
            letter = arg[1]
            if letter in VALUE_OPTIONS and len(arg) == 2:
                i += 1  # the value is the next argument
        elif host is None:
            host = arg.rpartition("@")[2]
        else:
            words = argv[i:]
            break
        i += 1
    return host, words


def main(argv):
    host, words = split_ssh_arguments(argv)
    hosts = json.loads(os.environ.get("TNQ_NETNS_HOSTS", "{}"))
    if host is None or not words:
        sys.exit("netns ssh stand-in: usage: ssh [options] HOST COMMAND (no interactive logins)")
    if host not in hosts:
        sys.exit(f"ssh: connect to host {host}: no emulated host has that address "
                 f"(known: {', '.join(sorted(hosts)) or 'none'})")
    environment = [f"{key}={value}" for key, value in LOGIN_ENV.items()]
    namespace, hostname = hosts[host]
    command = host_command_prefix(namespace, hostname)
    os.execvp(command[0], command + ["env", "-i", *environment, "sh", "-c", " ".join(words)])


if __name__ == "__main__":
    main(sys.argv[1:])
