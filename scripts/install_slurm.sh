#!/usr/bin/env bash
# Debian's SLURM and munge for the tests marked `slurm` (a one-node cluster, scripts/slurm_local.py).
# Installs only as root with apt-get; otherwise says in one line why not (those tests are then skipped).
set -u
if command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ]; then
    echo "slurm: installed ($(/usr/sbin/slurmctld -V 2>/dev/null || slurmctld -V))"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm: not installed and not root: the slurm tests will be skipped (as root: apt-get install slurmd slurmctld slurm-client munge)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm: not installed and no apt-get here: the slurm tests will be skipped"
    exit 0
fi
start=$(date +%s)
if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/tmp/perpneg3d-apt.log 2>&1 &&
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmd slurmctld slurm-client munge \
       >>/tmp/perpneg3d-apt.log 2>&1; then
    echo "slurm: installed in $(( $(date +%s) - start )) s"
else
    echo "slurm: apt-get failed ($(tail -n 1 /tmp/perpneg3d-apt.log)): the slurm tests will be skipped"
fi
exit 0
