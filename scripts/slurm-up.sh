#!/usr/bin/env bash
# Start a real SLURM cluster (one node, or several slurmd) on localhost (Debian 12, root, no systemd) for CI and for trying
# profiles/slurm on one machine. Idempotent: daemons already running (not zombies) are left alone.
#
#   SLURM_DIR=DIR           scratch folder for state, spool, logs and pid files (default /tmp/tcm-slurm)
#   SLURM_ACCT=dbd|none     dbd (default): MariaDB + slurmdbd, so `sacct` works and profiles/slurm runs
#                           unchanged (the plugin's default status command is sacct; without accounting
#                           sacct fails and Snakemake waits forever). none: no accounting; then Snakemake
#                           needs `--slurm-status-command squeue` (keep MinJobAge >= 3 x init seconds).
#   SLURM_NODES=N           slurmd daemons (nodes) on this machine (default 1): `localhost`, then tcmnode2..N,
#                           all at 127.0.0.1, each with its own port (localhost 6818, the
#                           slurmd default; tcmnodeK 6818+K: 6819 is slurmdbd's), spool and log
#   SLURM_FAKE_GPUS=N       advertise N fake GPUs per node (gres on mknod'ed char devices; default 2)
#   SLURM_PARTITION=NAME    partition for the workflow (default debug). If it is not `debug`, a second
#                           partition `debug` on the same node becomes the cluster's default, so a job
#                           submitted without `-p NAME` is visibly in the wrong partition.
#   SLURM_MIN_JOB_AGE=S     seconds slurmctld keeps finished jobs (default 300, the Slurm default)
#   SLURM_NODE_CPUS=N       CPUs the node advertises (default: the real count)
#   SLURM_NODE_MEM_MB=M     memory the node advertises (default: the real MemTotal - 512 MiB)
#                           Advertising more than the machine has (like the fake GPUs) lets the real
#                           profiles/slurm requests (8 CPUs and 64 GB per GPU) schedule on a small CI
#                           machine; slurmd then trusts slurm.conf (SlurmdParameters=config_overrides).
#
# Every daemon this script starts is listed in $SLURM_DIR/owned (its pid file), so slurm-down.sh stops
# exactly those, by PID. Tested recipe: ../shared/reference/slurm-local.md (outside the repo).
set -euo pipefail
ACCT=${SLURM_ACCT:-dbd}
NGPU=${SLURM_FAKE_GPUS:-2}
NNODES=${SLURM_NODES:-1}
PARTITION=${SLURM_PARTITION:-debug}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-300}
D=${SLURM_DIR:-/tmp/tcm-slurm}
case "$ACCT" in dbd|none) ;; *) echo "SLURM_ACCT must be dbd or none, got '$ACCT'" >&2; exit 2;; esac
[ "$(id -u)" = 0 ] || { echo "slurm-up.sh must run as root (it writes /etc/slurm and starts daemons)" >&2; exit 2; }

export DEBIAN_FRONTEND=noninteractive
PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCT" = dbd ] && PKGS="$PKGS slurmdbd mariadb-server"
# dpkg -s succeeds for removed-but-not-purged packages too; require "install ok installed".
missing=""
for p in $PKGS; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "slurm-up: installing$missing" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

mkdir -p "$D"/{state,spool,log}
touch "$D/owned"
# Node names: `localhost` and tcmnode2..N. A job's node list sorts `localhost` first, and it resolves, so the
# first host works as a rendezvous address; the others only need distinct names (slurmctld reaches every
# slurmd at 127.0.0.1:<Port>). `localhost` is defined LAST: while slurm.conf's node table holds one node
# named localhost, Slurm 22.05 resolves any other name to it and stops with "Duplicated NodeHostName".
NODES=""
for i in $(seq 2 "$NNODES"); do NODES="$NODES tcmnode$i"; done
NODES="${NODES# } localhost"; NODES="${NODES# }"
REAL_MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 512 ))
MEM=${SLURM_NODE_MEM_MB:-$REAL_MEM}
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
OVERRIDES=""
if [ "$MEM" -gt "$REAL_MEM" ] || [ "$CPUS" -gt "$(nproc)" ]; then OVERRIDES="SlurmdParameters=config_overrides"; fi
GRES_NODE=""; GRES_TYPES=""
mkdir -p /etc/slurm
# The /etc/slurm files this script writes replace what was there: keep the originals (once per SLURM_DIR), and
# slurm-down.sh puts them back (or removes ours). A slurm.conf left behind that names a stopped slurmctld makes
# every `scontrol` wait ~10 s for it, and the Snakemake SLURM plugin runs `scontrol show config` each time
# Snakemake starts, with or without --executor slurm.
if [ ! -f "$D/etc-saved/list" ]; then
  mkdir -p "$D/etc-saved"
  for f in slurm.conf gres.conf slurmdbd.conf; do
    if [ -e "/etc/slurm/$f" ]; then cp -p "/etc/slurm/$f" "$D/etc-saved/$f"; echo "restore $f"; else echo "remove $f"; fi
  done > "$D/etc-saved/list.tmp"
  mv "$D/etc-saved/list.tmp" "$D/etc-saved/list"
fi
if [ "$NGPU" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:fake:$NGPU"
  # gres/gpu needs File= on a character device, one per GPU: Count-only lines are ignored (node INVAL),
  # regular files are rejected. /dev/null's major:minor (1:3) makes a harmless fake device.
  : > /etc/slurm/gres.conf
  for node in $NODES; do
    for i in $(seq 0 $((NGPU-1))); do
      dev="$D/fakegpu-$node-$i"
      [ -c "$dev" ] || { rm -f "$dev"; mknod "$dev" c 1 3; }
      echo "NodeName=$node Name=gpu Type=fake File=$dev" >> /etc/slurm/gres.conf
    done
  done
else
  rm -f /etc/slurm/gres.conf
fi
if [ "$ACCT" = dbd ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

if [ "$PARTITION" = debug ]; then
  PARTITION_LINES="PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
else
  PARTITION_LINES="PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=$PARTITION Nodes=ALL Default=NO MaxTime=INFINITE State=UP"
fi

NODE_LINES=""
for node in $NODES; do
  if [ "$node" = localhost ]; then port=6818; else port=$((6818 + ${node#tcmnode})); fi
  NODE_LINES="$NODE_LINES
NodeName=$node NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$MEM $GRES_NODE State=UNKNOWN"
  mkdir -p "$D/spool/$node"
done

cat > /etc/slurm/slurm.conf <<EOF
# written by tcm-pipeline scripts/slurm-up.sh
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=$MIN_JOB_AGE
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
JobCompType=jobcomp/none
$ACCT_LINES
$GRES_TYPES
$OVERRIDES
$NODE_LINES
$PARTITION_LINES
EOF

# A pid file counts only if its process runs and is not a zombie (some inits reap orphans slowly, so a
# killed daemon can linger in state Z and a plain [ -e /proc/PID ] would skip restarting it).
alive() { local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && [ -e "/proc/$p" ] &&
          [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ]; }
own() { grep -qxF "$1" "$D/owned" || echo "$1" >> "$D/owned"; }
wait_pidfile() { for _ in $(seq 100); do alive "$1" && return 0; sleep 0.1; done
                 echo "slurm-up: $2 did not start (no live pid in $1)" >&2; return 1; }

# munge (its key /etc/munge/munge.key comes from the package's postinst); must run as the munge user.
install -d -o munge -g munge -m 0755 /run/munge
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged
  wait_pidfile /run/munge/munged.pid munged; own /run/munge/munged.pid
fi

if [ "$ACCT" = dbd ]; then
  install -d -o mysql -g mysql /run/mysqld
  if ! alive /run/mysqld/mysqld.pid; then
    # --skip-networking: the database is reached through its unix socket only.
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid --skip-networking --log-error="$D/log/mariadb.log" \
      </dev/null >/dev/null 2>&1 &
    wait_pidfile /run/mysqld/mysqld.pid mariadbd; own /run/mysqld/mysqld.pid
  fi
  for _ in $(seq 150); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$D/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
  if ! alive "$D/slurmdbd.pid"; then
    /usr/sbin/slurmdbd
    wait_pidfile "$D/slurmdbd.pid" slurmdbd; own "$D/slurmdbd.pid"
  fi
  # slurmctld registers the cluster with slurmdbd at start; wait until slurmdbd answers.
  for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
fi

if ! alive "$D/slurmctld.pid"; then
  /usr/sbin/slurmctld
  wait_pidfile "$D/slurmctld.pid" slurmctld; own "$D/slurmctld.pid"
else
  scontrol reconfigure >/dev/null 2>&1 || true   # pick up a rewritten slurm.conf
fi
for node in $NODES; do
  if ! alive "$D/slurmd-$node.pid"; then
    # -N NAME: the node name does not depend on `hostname` (and several slurmd share this machine).
    /usr/sbin/slurmd -N "$node"
    wait_pidfile "$D/slurmd-$node.pid" "slurmd $node"; own "$D/slurmd-$node.pid"
  fi
done
ALL_NODES=$(echo $NODES | tr ' ' ,)
all_idle() { [ "$(sinfo -h -N -n "$ALL_NODES" -o %t 2>/dev/null | sort -u)" = idle ]; }
for _ in $(seq 150); do
  all_idle && break
  for node in $NODES; do
    case "$(sinfo -h -n "$node" -o %t 2>/dev/null)" in
      drain*|inval*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true;; esac
  done
  sleep 0.2
done
if [ "$ACCT" = dbd ]; then
  # The default status path of the Snakemake SLURM plugin; it must answer before any workflow runs.
  for _ in $(seq 100); do sacct -X -n >/dev/null 2>&1 && break; sleep 0.1; done
  sacct -X -n >/dev/null || { echo "slurm-up: sacct does not answer" >&2; tail -20 "$D/log/slurmdbd.log" >&2; exit 1; }
fi
sinfo -o '%P %a %D %t %N %G'
all_idle || {
  echo "slurm-up: node not idle" >&2; tail -20 "$D/log/slurmctld.log" >&2; exit 1; }
