#!/usr/bin/env bash
# Set up a fresh Debian machine to build and test kvd. Run from the repository root:
#     bash tools/setup.sh
# Idempotent: packages already present are not installed again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# root needs no sudo (containers often have none); anyone else does.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# System libraries: RDMA verbs and connection manager (Mooncake links them even for TCP),
# systemd (systemd-analyze checks the unit file in the tests), iproute2 (ss: the socket tests)
# and passwd (useradd: the local-user trust tests).
missing=()
for pkg in libibverbs1 librdmacm1 systemd iproute2 passwd; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

# torch first, pinned: the package's bare "torch>=2.4" would let pip pick the default
# CUDA build, which pulls several GB of nvidia-* packages. With torch already satisfied,
# the install below leaves it alone (the configured index / wheel directory supplies the
# CPU build; elsewhere add --index-url https://download.pytorch.org/whl/cpu).
python3 -m pip install torch==2.13.0

# kvd itself, editable, with the CPU (non-CUDA) Mooncake build and the test tools.
python3 -m pip install -e '.[cpu,test]'

# SGLang's PD-disaggregation classes, for the kvd.sglang backend's tests (tests/sglang): the
# pinned wheel without its CUDA dependencies, then the pure-Python packages its imports need.
# The constraint keeps torch at 2.13.0 whatever a package asks for.
echo "torch==2.13.0" > /tmp/kvd-torch-constraint.txt
python3 -m pip install -c /tmp/kvd-torch-constraint.txt -r tools/requirements-sglang.txt
python3 -m pip install --no-deps sglang==0.5.23
