#!/bin/sh
# Lays out a container's root file system for the wxbroker binary BIN in DIR: the binary, the
# shared libraries it loads (as ldd lists them), the CA bundle its HTTP client loads at start (it
# exits without one), and an empty data dir. deploy/Dockerfile runs it in its build stage; the
# container test runs it on a binary built on the host.
#
#   deploy/rootfs.sh BIN DIR
set -eu
if [ $# -ne 2 ]; then
  echo "usage: $0 BIN DIR" >&2
  exit 2
fi
bin=$1
out=$2
ca=/etc/ssl/certs/ca-certificates.crt
if [ ! -f "$ca" ]; then
  echo "$0: $ca is missing: install the ca-certificates package" >&2
  exit 1
fi
mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs" "$out/var/lib/wxbroker"
cp "$bin" "$out/usr/local/bin/wxbroker"
# A static binary needs no libraries (ldd then fails, saying so).
if ldd "$bin" >/dev/null 2>&1; then
  # Lines like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)".
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$out$(dirname "$lib")"
    cp -L "$lib" "$out$lib"
  done
fi
cp -L "$ca" "$out$ca"
