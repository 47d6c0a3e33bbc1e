#!/bin/bash
# A real-GPU check, for a node with an NVIDIA GPU and its driver (never run by CI).
#
#   sudo bash tests/gpu/check.sh            # after `make setup` (or with VENV=...)
#
# It takes the node's CDI spec (/etc/cdi or /var/run/cdi, else one made with
# `shifter-sshd cdi generate`), builds a small image from this host's own python3
# (interpreter, its libraries, its standard library), runs the real prolog for a job
# given every GPU, and inside the container runs `nvidia-smi -L` and the CUDA driver
# API through ctypes (cuInit, cuDeviceGetCount, cuDeviceGetName on libcuda.so.1).
# Exit 0 only when both match what the host itself says; then the epilog, and a
# check that nothing of the job is left.
#
# tests/gpu/test_cdi.py runs it against lab.fakegpu's fake driver, through these
# variables (unset on a real GPU node): GPU_CHECK_DEV (the GPUs' device nodes),
# GPU_CHECK_SMI (nvidia-smi on the host), GPU_CHECK_LIBS (where the host's libcuda
# is, if not in its loader's cache), GPU_CHECK_SPECS (the CDI spec directory),
# GPU_CHECK_SMI_IN (nvidia-smi's path in the container).
set -euo pipefail
VENV=${VENV:-/opt/shifter-sshd/venv}
CLI=$VENV/bin/shifter-sshd
fail() { echo "gpu check: FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root"
[ -x "$CLI" ] || fail "no $CLI: run make setup first (or set VENV)"
DEV=${GPU_CHECK_DEV:-/dev}
SMI=${GPU_CHECK_SMI:-$(command -v nvidia-smi || true)}
ls "$DEV"/nvidia[0-9]* >/dev/null 2>&1 || fail "no $DEV/nvidiaN: no GPU or no driver here"
[ -n "$SMI" ] || fail "nvidia-smi not found"
SMI_IN=${GPU_CHECK_SMI_IN:-$SMI}
PY=$(command -v python3) || fail "python3 not found"
PY=$(readlink -f "$("$PY" -I -c 'import sys; print(sys.executable)')")  # not a pyenv shim
HOST_ENV=(env)
[ "$DEV" = /dev ] || HOST_ENV+=(FAKE_GPU_DEV="$DEV")
[ -z "${GPU_CHECK_LIBS:-}" ] || HOST_ENV+=(LD_LIBRARY_PATH="$GPU_CHECK_LIBS")
IN_ENV=(env -u FAKE_GPU_DEV -u LD_LIBRARY_PATH)

WORK=$(mktemp -d /var/tmp/shifter-sshd-gpucheck-XXXXXX)
TAG=gpucheck$$
cleanup() {
    [ ! -e "$WORK/udiRoot.conf" ] ||
        env -i SLURM_JOB_ID=9 "$VENV/bin/shifter-sshd-epilog" --config "$WORK/udiRoot.conf" || true
    rm -rf "$WORK"
}
trap cleanup EXIT
chmod 755 "$WORK"

CUDA_PROBE='
import ctypes
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0, "cuInit failed"
count = ctypes.c_int()
assert cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
for i in range(count.value):
    device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
    assert cuda.cuDeviceGet(ctypes.byref(device), i) == 0
    assert cuda.cuDeviceGetName(name, 256, device) == 0
    print(f"cuda {i}: {name.value.decode()}")
print(f"cuda devices: {count.value}")
'
echo "== on the host"
host_smi=$("${HOST_ENV[@]}" "$SMI" -L)
host_cuda=$("${HOST_ENV[@]}" "$PY" -I -c "$CUDA_PROBE")
echo "$host_smi"; echo "$host_cuda"

echo "== the CDI spec"
mkdir -p "$WORK/cdi"
if [ -n "${GPU_CHECK_SPECS:-}" ]; then
    SPECS=$GPU_CHECK_SPECS
elif ls /etc/cdi/*nvidia* /var/run/cdi/*nvidia* >/dev/null 2>&1; then
    SPECS="/etc/cdi /var/run/cdi"
    ls /etc/cdi/*nvidia* /var/run/cdi/*nvidia* 2>/dev/null || true
else
    "$CLI" cdi generate --output "$WORK/cdi/nvidia.yaml"
    SPECS=$WORK/cdi
fi

echo "== a small image from this host's python3"
ROOT=$WORK/image
mkdir -p "$ROOT"/{bin,etc,tmp,usr/lib,lib64} "$ROOT$(dirname "$PY")"
chmod 1777 "$ROOT/tmp"
cp -L "$PY" "$ROOT$PY"  # at its own path: it finds its standard library from there
STDLIB=$("$PY" -I -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir -p "$ROOT$STDLIB"
cp -a "$STDLIB/." "$ROOT$STDLIB/"
rm -rf "$ROOT$STDLIB"/test "$ROOT$STDLIB"/site-packages
DYNLOAD=$("$PY" -I -c 'import sysconfig; print(sysconfig.get_config_var("DESTSHARED"))')
for lib in $(ldd "$PY" "$DYNLOAD"/*.so 2>/dev/null |
        awk '/=> \// {print $3} /^\t\/[^ ]* \(/ {print $1}' | sort -u); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
cp /etc/os-release "$ROOT/etc/" 2>/dev/null || true

cat > "$WORK/udiRoot.conf" <<CONF
imagePath=$WORK/images
udiMount=/var/udiMount-$TAG
loopMount=/var/udiLoopMount-$TAG
statePath=/run/shifter-sshd-$TAG
optUdiImage=$WORK/udiImage
enableSshd=0
cdiSpecDirs=$SPECS
CONF
mkdir -p "$WORK/udiImage"
"$CLI" --config "$WORK/udiRoot.conf" image import "$ROOT" "docker:gpucheck:$TAG" >/dev/null

echo "== the prolog, for a job given every GPU"
GPUS=$(ls "$DEV" | sed -n 's/^nvidia\([0-9][0-9]*\)$/\1/p' | sort -n | paste -sd, -)
env -i SLURM_JOB_ID=9 SLURM_JOB_UID=65534 SLURM_JOB_GID=65534 SLURM_JOB_USER=nobody \
    SLURMD_NODENAME="$(hostname)" SLURM_NODELIST="$(hostname)" SLURM_JOB_CPUS_PER_NODE=1 \
    SPANK_SHIFTER_IMAGE="docker:gpucheck:$TAG" SLURM_JOB_GPUS="$GPUS" \
    "$VENV/bin/shifter-sshd-prolog" --config "$WORK/udiRoot.conf" \
    || fail "prolog failed"
CROOT=/var/udiMount-$TAG/9
echo "== in the container (nvidia-smi at $SMI_IN)"
cont_smi=$("${IN_ENV[@]}" chroot --userspec=65534:65534 "$CROOT" "$SMI_IN" -L) \
    || fail "nvidia-smi in the container"
cont_cuda=$("${IN_ENV[@]}" chroot --userspec=65534:65534 "$CROOT" "$PY" -I -c \
    "$CUDA_PROBE") || fail "the CUDA driver API in the container"
echo "$cont_smi"; echo "$cont_cuda"
[ "$cont_smi" = "$host_smi" ] || fail "nvidia-smi -L differs from the host's"
[ "$cont_cuda" = "$host_cuda" ] || fail "the CUDA driver API's answer differs from the host's"
echo "== the epilog"
env -i SLURM_JOB_ID=9 "$VENV/bin/shifter-sshd-epilog" --config "$WORK/udiRoot.conf" \
    || fail "epilog failed"
grep -q " /var/udi\(Mount\|LoopMount\)-$TAG" /proc/self/mountinfo && fail "mounts left behind"
echo "gpu check: OK: the container sees the host's GPUs, through nvidia-smi and libcuda"
