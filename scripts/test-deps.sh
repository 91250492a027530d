#!/usr/bin/env bash
# What the test command needs beyond Rust, installed when it is missing: lavapipe (Mesa's CPU Vulkan
# driver) and the Vulkan loader so the GPU kernels run, a JDK and Maven for the Kotlin SDK test,
# Python's venv for the server's openai-client test.
# Installs with apt-get as root or through passwordless sudo, saying what it installs; otherwise
# fails with one line naming the packages to install. Called by scripts/test.sh (and so by .ci/run).
#
#   EDGEDIFF_DEPS_DRY_RUN=1   say what would be installed, install nothing (exit 0)
#   EDGEDIFF_SKIP_DEPS=1      check nothing (a machine set up some other way)
set -euo pipefail

[ "${EDGEDIFF_SKIP_DEPS:-}" = 1 ] && exit 0

have_pkg() { command -v dpkg >/dev/null && dpkg -s "$1" >/dev/null 2>&1; }
have_cmd() { command -v "$1" >/dev/null; }

need=()
# Lavapipe: the ICD manifest is what the Vulkan loader looks for; the package is how Debian ships it.
icd_dir=${EDGEDIFF_VULKAN_ICD_DIR:-/usr/share/vulkan/icd.d}
if ! ls "$icd_dir"/lvp_icd*.json >/dev/null 2>&1 && ! have_pkg mesa-vulkan-drivers; then
  need+=(mesa-vulkan-drivers)
fi
if ! have_pkg libvulkan1 && ! { have_cmd ldconfig && ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; }; then
  need+=(libvulkan1)
fi
have_cmd javac || need+=(default-jdk-headless)
have_cmd mvn || need+=(maven)
# The openai Python client of the server test runs in a venv (scripts/serve-openai-test.sh).
if ! { have_cmd python3 && python3 -c 'import venv, ensurepip' 2>/dev/null; } && ! have_pkg python3-venv; then
  need+=(python3-venv)
fi

[ ${#need[@]} -eq 0 ] && exit 0

if [ "${EDGEDIFF_DEPS_DRY_RUN:-}" = 1 ]; then
  echo "test-deps: would install: ${need[*]}"
  exit 0
fi

if [ "$(id -u)" = 0 ]; then
  sudo=()
elif have_cmd sudo && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "test-deps: missing Debian packages ${need[*]}; install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
if ! have_cmd apt-get; then
  echo "test-deps: missing packages ${need[*]} and no apt-get to install them with" >&2
  exit 1
fi
echo "test-deps: installing ${need[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
