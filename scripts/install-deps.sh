#!/usr/bin/env bash
# Installs blockplane's build and test dependencies from Debian 12 packages. Idempotent: does
# nothing when everything is already installed. Needs root (uses sudo when not root).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config clang clang-format
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  liburing-dev libxen-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libsqlite3-dev libbenchmark-dev
  python3 python3-grpcio python3-protobuf
  xenstore-utils fio prometheus sqlite3 procps openssl
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
