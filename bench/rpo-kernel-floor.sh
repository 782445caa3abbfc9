#!/bin/bash
# The CPU the kernel alone needs for the RPO bench's data movement (issue 15), without
# thinmirror: on a loop-mounted btrfs (FS=xfs for XFS), fio writes random 4-64 KiB blocks
# at 50 MB/s to a 1 GiB source (the workload; phase "workload"), then the same again while
# two more fio jobs do what a replica of it must at least do (phase "all"): read such
# blocks at RATE2 (default 50m) from a reflink snapshot of the source, as the primary
# reads a generation, and write them at RATE2 to a target, fdatasync every 2048 writes,
# as the secondary applies them. No FICLONE per cycle, no FIEMAP, no daemon: vmstat's
# idle share in "all" is what this machine has left for everything else.
# Root; needs fio (Debian package fio) and btrfs-progs or xfsprogs. SECS (default 40)
# per phase. Run it on a quiet machine.
set -e
FS=${FS:-btrfs}; RATE2=${RATE2:-50m}; SECS=${SECS:-40}
for t in fio:fio vmstat:procps mkfs.$FS:$([ $FS = btrfs ] && echo btrfs-progs || echo xfsprogs); do command -v ${t%%:*} >/dev/null || { echo "rpo-kernel-floor.sh needs ${t%%:*}: apt-get install -y ${t#*:}" >&2; exit 1; }; done
D=$(mktemp -d /tmp/tm-kfloor-XXXX); truncate -s 20G $D/fs.img; DEV=$(losetup -f --show $D/fs.img)
trap 'cd /; umount $D/mnt; losetup -d $DEV; rm -rf $D' EXIT
if [ $FS = btrfs ]; then mkfs.btrfs -q $DEV >/dev/null 2>&1; else mkfs.xfs -q -f -m reflink=1 $DEV; fi
mkdir $D/mnt; mount $DEV $D/mnt; cd $D/mnt
fio --name=fill --filename=src --rw=write --bs=1m --size=1g --end_fsync=1 >/dev/null
cp --reflink=always src tgt; sync
BS=--bssplit=4k/20:8k/20:16k/20:32k/20:64k/20
COMMON="--ioengine=psync --norandommap --randrepeat=0 --time_based --runtime=$SECS"
echo "rpo-kernel-floor: $FS on a loop device, 2 phases of $SECS s"
for phase in workload all; do
  cp --reflink=always src snap; sync
  extra=""
  [ $phase = all ] && extra="--name=read --filename=snap --rw=randread $BS --rate=$RATE2 $COMMON --size=1g --name=apply --filename=tgt --rw=randwrite $BS --rate=$RATE2 $COMMON --size=1g --fdatasync=2048"
  (sleep 10; vmstat 5 $(( (SECS - 15) / 5 )) | tail -n +3 | awk -v p=$phase '{us+=$13; sy+=$14; id+=$15; wa+=$16; n++} END {printf "%-8s CPU over %d vmstat samples: user %.0f%% system %.0f%% idle %.0f%% iowait %.0f%%\n", p, n, us/n, sy/n, id/n, wa/n}') &
  fio --name=w --filename=src --rw=randwrite $BS --rate=50m $COMMON --offset=1m --size=1023m $extra | grep -E "^\s+(READ|WRITE):" | sed "s/^ */$phase  fio /"
  wait
  rm snap
done
