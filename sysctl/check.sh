#!/usr/bin/env bash
# Compares this host's sysctl values with a profile and prints what differs.
# Read-only unless --apply is given (then it writes the differing values with `sysctl -w`).
# Usage: sysctl/check.sh PROFILE [--apply]      exit 0: matches, 1: differs, 2: usage error
set -u
profile=${1:-}
apply=${2:-}
if [ -z "$profile" ] || [ ! -r "$profile" ]; then
  echo "usage: $0 PROFILE [--apply]" >&2
  exit 2
fi
if [ -n "$apply" ] && [ "$apply" != "--apply" ]; then
  echo "unknown option $apply (only --apply)" >&2
  exit 2
fi
differs=0
while IFS= read -r line; do
  line=${line%%#*}
  [[ "$line" =~ ^[[:space:]]*$ ]] && continue
  key=$(echo "${line%%=*}" | xargs)
  want=$(echo "${line#*=}" | xargs)
  path=/proc/sys/${key//.//}
  if [ ! -r "$path" ]; then
    echo "absent  $key (want $want; kernel module not loaded or not in this namespace)"
    continue
  fi
  have=$(xargs < "$path")
  if [ "$have" = "$want" ]; then
    echo "ok      $key = $have"
  else
    differs=1
    echo "DIFFERS $key = $have (want $want)"
    if [ "$apply" = "--apply" ]; then
      sysctl -w "$key=$want" >/dev/null && echo "        applied $key = $want"
    fi
  fi
done < "$profile"
exit $differs
