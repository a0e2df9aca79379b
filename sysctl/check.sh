#!/usr/bin/env bash
# Compares this host's sysctl values with a profile and prints what falls short.
# Read-only unless --apply is given (then it writes the values that fall short).
# Usage: sysctl/check.sh PROFILE [--apply]      exit 0: host is fine, 1: differs, 2: usage error
#
# Limits are minimums: a host value above the profile's (a bigger fs.file-max, somaxconn,
# nf_conntrack_max…) is fine and --apply never lowers it. net.ipv4.tcp_mem is not taken from
# the profile but computed from this host's RAM (pages: 3/32, 1/8 and 3/16 of MemTotal — the
# profile's numbers for a 32 GiB host), also as minimums. Every other key must match exactly.
#
# For tests: SYSCTL_ROOT (default /proc/sys) and MEMINFO (default /proc/meminfo) point at
# other files; --apply writes under SYSCTL_ROOT, as `sysctl -w` does under /proc/sys.
set -u
profile=${1:-}
apply=${2:-}
root=${SYSCTL_ROOT:-/proc/sys}
meminfo=${MEMINFO:-/proc/meminfo}
if [ -z "$profile" ] || [ ! -r "$profile" ]; then
  echo "usage: $0 PROFILE [--apply]" >&2
  exit 2
fi
if [ -n "$apply" ] && [ "$apply" != "--apply" ]; then
  echo "unknown option $apply (only --apply)" >&2
  exit 2
fi

# Keys where more is fine (each value a minimum).
minimums=" fs.file-max fs.nr_open net.core.somaxconn net.ipv4.tcp_max_syn_backlog \
net.core.netdev_max_backlog net.netfilter.nf_conntrack_max net.ipv4.tcp_mem "

# tcp_mem from RAM, in 4 KiB pages; empty when MemTotal is unknown.
tcp_mem_for_host() {
  local kib
  kib=$(awk '/^MemTotal:/ { print $2 }' "$meminfo" 2>/dev/null)
  [ -n "$kib" ] || return
  local pages=$((kib / 4))
  echo "$((pages * 3 / 32)) $((pages / 8)) $((pages * 3 / 16))"
}

# 0 when every field of $1 is >= the same field of $2.
at_least() {
  local -a have=($1) want=($2)
  [ "${#have[@]}" -eq "${#want[@]}" ] || return 1
  local i
  for i in "${!want[@]}"; do
    [[ "${have[$i]}" =~ ^[0-9]+$ ]] || return 1
    [ "${have[$i]}" -ge "${want[$i]}" ] || return 1
  done
}

# Field-wise maximum of $1 and $2 (what --apply writes for a minimum: never lower).
raise() {
  local -a have=($1) want=($2) out=()
  local i
  for i in "${!want[@]}"; do
    local h=${have[$i]:-0}
    [[ "$h" =~ ^[0-9]+$ ]] || h=0
    if [ "$h" -gt "${want[$i]}" ]; then out+=("$h"); else out+=("${want[$i]}"); fi
  done
  echo "${out[*]}"
}

differs=0
while IFS= read -r line; do
  line=${line%%#*}
  [[ "$line" =~ ^[[:space:]]*$ ]] && continue
  key=$(echo "${line%%=*}" | xargs)
  want=$(echo "${line#*=}" | xargs)
  path=$root/${key//.//}
  note=""
  if [ "$key" = "net.ipv4.tcp_mem" ]; then
    computed=$(tcp_mem_for_host)
    if [ -n "$computed" ]; then
      want=$computed
      note=" (computed from this host's MemTotal)"
    else
      note=" (MemTotal unknown: the profile's value for a 32 GiB host)"
    fi
  fi
  if [ ! -r "$path" ]; then
    echo "absent  $key (want $want; kernel module not loaded or not in this namespace)"
    continue
  fi
  have=$(xargs < "$path")
  minimum=0
  [[ "$minimums" == *" $key "* ]] && minimum=1
  if [ "$have" = "$want" ]; then
    echo "ok      $key = $have$note"
  elif [ "$minimum" = 1 ] && at_least "$have" "$want"; then
    echo "ok      $key = $have (at least $want$note)"
  else
    differs=1
    if [ "$minimum" = 1 ]; then
      target=$(raise "$have" "$want")
      echo "DIFFERS $key = $have (want at least $want$note)"
    else
      target=$want
      echo "DIFFERS $key = $have (want $want)"
    fi
    if [ "$apply" = "--apply" ]; then
      if echo "$target" > "$path" 2>/dev/null; then
        echo "        applied $key = $target"
      else
        echo "        could not write $path (run as root)"
      fi
    fi
  fi
done < "$profile"
exit $differs
