#!/bin/sh
# qemu-check.sh - run pctest on the reference PC (QEMU TCG) and compare its
# serial output with pctest.expected. Usage: tests/guest/qemu-check.sh [pctest.elf]
set -u
here=$(cd "$(dirname "$0")" && pwd)
elf=${1:-$here/../../out/guest/pctest.elf}
out=$(mktemp)
timeout 120 qemu-system-x86_64 -accel tcg -kernel "$elf" -serial stdio -display none \
    -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 >"$out"
status=$?
if [ "$status" -ne 33 ]; then
    echo "pctest: exit status $status (expected 33)"; cat "$out"; rm -f "$out"; exit 1
fi
if ! diff -u "$here/pctest.expected" "$out"; then
    echo "pctest: serial output differs from pctest.expected"; rm -f "$out"; exit 1
fi
rm -f "$out"
echo "pctest: QEMU output matches pctest.expected, status 33"
