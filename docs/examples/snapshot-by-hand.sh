#!/usr/bin/env bash
# Compose a snapshot file by hand from building blocks, then restore it.
# Usage: snapshot-by-hand.sh WORKDIR   (needs `vmipc` on PATH and /dev/kvm)
set -euo pipefail
cd "$1"

# A VMM running the built-in guest, with a control socket.
vmipc vmm --vcpus 2 --memory 64M --guest-opt ws=256K \
    --socket vm.sock --console before.log --no-console-input &
while [ ! -S vm.sock ]; do sleep 0.1; done
sleep 1

# Pause, then let the VMM append its sections to one file: first the state
# (config, vcpus, devices), then guest memory. "+snap.vmipc" adds to the file.
vmipc call --socket vm.sock pause
vmipc call --socket vm.sock dump-state format=snapshot --fd out=+snap.vmipc --json > state.json
vmipc call --socket vm.sock dump-memory format=snapshot --fd out=+snap.vmipc --json > memory.json
vmipc call --socket vm.sock quit

# The client finishes the file: header first page, section table last.
vmipc snapshot seal snap.vmipc state.json memory.json
vmipc snapshot verify snap.vmipc
vmipc snapshot inspect snap.vmipc

# Restore it: RAM is mapped from the file lazily; the guest runs on where it stopped.
timeout 2 vmipc vmm --restore snap.vmipc --console after.log --no-console-input || true
