#!/bin/bash
# Floors under the RPO bench (issue 15), measured without thinmirror: on a loop-mounted
# XFS (reflink=1), a 1 GiB file fragmented the way the bench fragments it (a reflink
# snapshot, then random 4-64 KiB writes), at several extent counts: FICLONE alone and the
# fsync after it, FIEMAP (filefrag -e) with and without FIEMAP_FLAG_SYNC (-s), an O_DIRECT
# read of the whole file and cold buffered reads by 1 and 4 readers. Root; needs fio
# (Debian package fio), filefrag (e2fsprogs), python3. Run it under the bench lock:
#   flock /work/wt/bench.lock bench/rpo-floor.sh
set -e
for t in fio:fio filefrag:e2fsprogs mkfs.xfs:xfsprogs python3:python3; do command -v ${t%%:*} >/dev/null || { echo "rpo-floor.sh needs ${t%%:*}: apt-get install -y ${t#*:}" >&2; exit 1; }; done
D=$(mktemp -d /tmp/tm-floor-XXXX); truncate -s 6G $D/fs.img
DEV=$(losetup -f --show $D/fs.img); mkfs.xfs -q -f -m reflink=1 $DEV; mkdir $D/mnt; mount $DEV $D/mnt
trap "umount $D/mnt; losetup -d $DEV; rm -rf $D" EXIT
F=$D/mnt/src.img
fio --name=fill --filename=$F --rw=write --bs=1m --size=1g --end_fsync=1 >/dev/null
measure() {
  local ext=$(filefrag $F | grep -o '[0-9]* extents\?')
  python3 - "$F" "$D/mnt/clone.img" "$ext" <<'PY'
import fcntl, os, sys, time, subprocess
src, dst, ext = sys.argv[1:4]
FICLONE = 0x40049409
s = os.open(src, os.O_RDONLY)
d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
t0 = time.perf_counter(); fcntl.ioctl(d, FICLONE, s); t1 = time.perf_counter(); os.fsync(d); t2 = time.perf_counter()
os.close(d); os.close(s)
def run(args):
    t = time.perf_counter(); subprocess.run(args, stdout=subprocess.DEVNULL, check=True); return time.perf_counter() - t
fiemap = min(run(['filefrag', '-e', dst]) for _ in range(3))
fiemap_sync = min(run(['filefrag', '-s', '-e', dst]) for _ in range(3))
t = time.perf_counter(); subprocess.run(['dd', f'if={dst}', 'of=/dev/null', 'bs=1M', 'iflag=direct'], stderr=subprocess.DEVNULL, check=True); rd = time.perf_counter() - t
import json
def fio_read(jobs):
    out = subprocess.run(['fio', '--name=r', f'--filename={dst}', '--rw=read', '--bs=1m', f'--numjobs={jobs}', f'--size={1024//jobs}m', f'--offset_increment={1024//jobs}m', '--group_reporting', '--invalidate=1', '--output-format=json'], capture_output=True, check=True, text=True).stdout
    return json.loads(out[out.index('{'):])['jobs'][0]['read']['bw'] / 1024
r1 = fio_read(1); r4 = fio_read(4)
os.unlink(dst)
print(f"{ext:>14}: FICLONE {t1-t0:6.2f} s  fsync {t2-t1:5.2f} s  FIEMAP (filefrag -e, process included) {fiemap:5.2f} s  with FIEMAP_FLAG_SYNC {fiemap_sync:5.2f} s  O_DIRECT read 1 GiB {rd:5.2f} s ({1024/rd:6.1f} MiB/s)  buffered cold read 1 reader {r1:6.1f} MiB/s, 4 readers {r4:6.1f} MiB/s", flush=True)
PY
}
measure
for round in 1 2 3 4; do
  cp --reflink=always $F $D/mnt/snap.img
  fio --name=frag --filename=$F --rw=randwrite --bssplit=4k/20:8k/20:16k/20:32k/20:64k/20 --size=1023m --offset=1m --io_size=$((round*300))m --norandommap --randrepeat=0 --end_fsync=1 >/dev/null
  rm $D/mnt/snap.img
  measure
done
