#!/usr/bin/env bash
# Stop the daemons that scripts/slurm-up.sh started (listed in $SLURM_DIR/owned), by PID from their pid
# files, newest first. Daemons it found already running are not touched. Idempotent; never pkill/killall.
# Then put back the /etc/slurm files slurm-up.sh replaced (and remove the ones it created).
#   SLURM_DIR=DIR   the same scratch folder slurm-up.sh used (default /tmp/tcm-slurm)
D=${SLURM_DIR:-/tmp/tcm-slurm}
[ -f "$D/owned" ] || exit 0
# Running (state Z counts as stopped: some inits reap orphans only every few seconds).
running() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# Cancel jobs still in this cluster first, so no slurmstepd/job processes outlive slurmd.
if grep -qxF "$D/slurmctld.pid" "$D/owned" && p=$(cat "$D/slurmctld.pid" 2>/dev/null) && running "$p"; then
  if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    scancel --full $(squeue -h -o %i) 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

tac "$D/owned" | while read -r f; do
  p=$(cat "$f" 2>/dev/null) || continue
  if [ -n "$p" ] && running "$p"; then
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 150); do running "$p" || break; sleep 0.1; done
    running "$p" && kill -KILL "$p" 2>/dev/null
  fi
  rm -f "$f"
done
: > "$D/owned"
if [ -f "$D/etc-saved/list" ]; then
  while read -r action f; do
    if [ "$action" = restore ]; then cp -p "$D/etc-saved/$f" "/etc/slurm/$f"; else rm -f "/etc/slurm/$f"; fi
  done < "$D/etc-saved/list"
  rm -rf "$D/etc-saved"
fi
exit 0
