#!/bin/sh
# The "ssh" of the emulated cluster (tools/cluster/emulate.py): Open MPI's launcher (PRRTE's plm_ssh_agent) calls
#     emulate_agent.sh [ssh options] HOST COMMAND...
# to start its daemon on HOST; instead of opening an ssh session, this runs COMMAND with /bin/sh inside HOST's
# network and UTS namespaces and its CPUs (cgroup cpuset, or taskset where no cgroup could be made), with an
# environment as bare as a fresh ssh session's: what the job needs travels with `mpirun -x`, as on a real cluster.
#
# LIGHTNING_MPI_EMULATED_CLUSTER names the cluster's state directory (EmulatedCluster.env sets it); HOST's file
# there holds four lines: its network namespace, its UTS namespace, its cgroup's cgroup.procs ("-": none) and
# its CPUs ("-": all).
set -eu
dir=${LIGHTNING_MPI_EMULATED_CLUSTER:?"emulate_agent.sh: LIGHTNING_MPI_EMULATED_CLUSTER is not set (use EmulatedCluster.env)"}
while [ $# -gt 0 ]; do
    case $1 in
        -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;  # ssh options that take a value
        -*) shift ;;
        *) break ;;
    esac
done
host=${1:?"emulate_agent.sh: no host given"}
shift
conf=$dir/hosts/$host
if [ ! -f "$conf" ]; then
    echo "emulate_agent.sh: $host is not a node of the emulated cluster in $dir" >&2
    exit 255  # what ssh returns when it cannot reach the host
fi
{ read -r netns; read -r uts; read -r procs; read -r cpus; } < "$conf"
if [ "$procs" != "-" ]; then
    echo $$ > "$procs"  # this process, then the daemon it becomes and every rank it starts, live on HOST's CPUs
fi
pin=""
if [ "$procs" = "-" ] && [ "$cpus" != "-" ]; then
    pin="taskset -c $cpus"
fi
exec nsenter --net="$netns" --uts="$uts" -- $pin env -i PATH="$PATH" HOME="${HOME:-/}" USER="${USER:-root}" \
    LOGNAME="${LOGNAME:-root}" SHELL=/bin/sh LANG="${LANG:-C.UTF-8}" LIGHTNING_MPI_EMULATED_CLUSTER="$dir" \
    /bin/sh -c "$*"
