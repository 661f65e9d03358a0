#!/bin/bash
# Measures shmlinkd under attacks through its bus connection with each system
# bus, dbus-daemon and dbus-broker, under a real systemd (sdboot.sh), and prints
# a table. A measurement, not a test: nothing is asserted.
#
#   sudo tests/sdboot/bus-compare.sh
#
# Environment (all optional):
#   BINS=DIR      shmlinkd, shmlink, hostile-client, shmlink-frames-provider
#                 (default: target/debug of this checkout; build them first:
#                 cargo build --bin shmlinkd --bin shmlink --bin hostile-client
#                 --bin shmlink-frames-provider)
#   BUSES="dbus-daemon dbus-broker"     which system buses, in order
#   ATTACKS="baseline park park-open never-open never-list never-list-big provided"
#   DURING=6      seconds of honest calls while each attack runs
#   AFTER=3       seconds of honest calls once the attacker left
#   FRESH_BOOT=1  a fresh guest per attack (0: one per bus, faster; the bus's
#                 RSS then carries what earlier attacks left)
#   OUT=DIR       where the raw data goes (default /tmp/shmlink-bus-compare-DATE)
#
# Needs root, the host packages sdboot.sh needs, and dbus-broker
# (apt-get install dbus-broker). NB: Debian's dbus-broker package enables
# itself on the host (links /etc/systemd/system/dbus.service and
# /etc/systemd/user/dbus.service to it), which switches every sdboot guest to
# dbus-broker; this script picks the bus per boot (SDBOOT_SYSTEM_BUS), so
# remove those links on the host to keep other tests on dbus-daemon.
#
# For each bus and attack: boot (SDBOOT_SYSTEM_BUS picks the bus), `make install`
# + `post-install` as tests/e2e/systemd.rs does, start shmlinkd, then:
#   round 1: the attacker (hostile-client as nobody, see its header) starts; once
#            it says READY, root runs honest calls for DURING s while VmRSS of
#            shmlinkd and of the bus are sampled every 0.2 s; the attacker's
#            connections still on the bus are counted; its stdin is closed (park
#            and provided-flood then read their answers and print DONE, never-read
#            leaves the bus); honest calls for AFTER s;
#   round 2: the attacker again; once READY, `systemctl stop shmlinkd` is timed.
# An honest call is `shmlink --bus system --timeout 5 ping -n 1`: a new process
# and bus connection, Ping, Version, an echo session opened, one 64-byte round
# trip, Close. Its time includes starting the process (see the baseline row).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SDBOOT=$HERE/sdboot.sh
BINS=${BINS:-$REPO/target/debug}
BUSES=${BUSES:-dbus-daemon dbus-broker}
ATTACKS=${ATTACKS:-baseline park park-open never-open never-list never-list-big provided}
DURING=${DURING:-6}
AFTER=${AFTER:-3}
OUT=${OUT:-/tmp/shmlink-bus-compare-$(date -u +%Y%m%dT%H%M%S)}
ADDR=unix:path=/run/dbus/system_bus_socket
GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

die() { echo "bus-compare: $*" >&2; exit 1; }
log() { echo "[bus-compare $(date -u +%T)] $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root"
for b in shmlinkd shmlink hostile-client shmlink-frames-provider; do
  [ -x "$BINS/$b" ] || die "$BINS/$b missing (cargo build --bin $b)"
done
mkdir -p "$OUT/guest"
OUT=$(cd "$OUT" && pwd)

# ---- helpers run inside the guest (mounted read-only at /mnt/cmp) ----
cat > "$OUT/guest/honest.sh" <<'EOF'
#!/bin/bash
# honest.sh SECS: honest calls one after another for SECS s; prints "rc µs" each.
end=$(( $(date +%s%N) + $1 * 1000000000 ))
while [ "$(date +%s%N)" -lt "$end" ]; do
  t0=$(date +%s%N)
  timeout -k 1 15 shmlink --bus system --timeout 5 ping -n 1 > /dev/null 2>> /run/cmp-honest.err
  rc=$?
  t1=$(date +%s%N)
  echo "$rc $(( (t1 - t0) / 1000 ))"
  sleep 0.05
done
EOF
cat > "$OUT/guest/sample.sh" <<'EOF'
#!/bin/bash
# sample.sh: every 0.2 s, "VmRSS-of-shmlinkd-kB VmRSS-of-the-bus-kB" (- when gone).
rss() { [ -n "$1" ] && sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$1/status" 2>/dev/null || echo -; }
while :; do
  d=$(systemctl show -p MainPID --value shmlinkd.service); [ "$d" = 0 ] && d=
  b=$(pidof -s dbus-broker || pidof -s dbus-daemon)
  echo "$(rss "$d") $(rss "$b")"
  sleep 0.2
done
EOF
cat > "$OUT/guest/during.sh" <<'EOF'
#!/bin/bash
# during.sh SECS SAMPLES: honest.sh SECS with sample.sh writing to SAMPLES.
/mnt/cmp/sample.sh > "$2" & s=$!
/mnt/cmp/honest.sh "$1"
kill $s
EOF
chmod +x "$OUT/guest/"*.sh

# ---- the guest ----
STATE=""
PID1=""
G() { nsenter -t "$PID1" -a -- env -i PATH=$GUEST_PATH LANG=C.UTF-8 HOME=/root "$@"; }
cleanup() { [ -n "$STATE" ] && bash "$SDBOOT" down "$STATE" > /dev/null 2>&1; STATE=""; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# stats FILE: "ok/n p50 p99 max" (ms) of honest.sh's lines; latencies of all calls.
stats() {
  awk '{ n++; if ($1 == 0) ok++; print $2 }' "$1" > "$1.us"
  local n ok
  n=$(wc -l < "$1"); ok=$(awk '$1 == 0' "$1" | wc -l)
  [ "$n" -gt 0 ] || { echo "0/0 - - -"; return; }
  sort -n "$1.us" | awk -v n="$n" -v ok="$ok" '
    { v[NR] = $1 }
    END {
      i50 = int((n - 1) * 0.50) + 1; i99 = int((n - 1) * 0.99) + 1
      printf "%d/%d %.0f %.0f %.0f", ok, n, v[i50] / 1000, v[i99] / 1000, v[n] / 1000
    }'
}

# maxcol FILE COL: the largest number in column COL of sample.sh's lines.
maxcol() { awk -v c="$2" '$c ~ /^[0-9]+$/ && $c > m { m = $c } END { print m + 0 }' "$1"; }

daemon_rss() { # VmRSS VmHWM of shmlinkd, kB
  local p; p=$(G systemctl show -p MainPID --value shmlinkd.service)
  [ "$p" != 0 ] || { echo "- -"; return; }
  G awk '/^VmRSS/ { r = $2 } /^VmHWM/ { h = $2 } END { print r, h }' "/proc/$p/status"
}
bus_rss() {
  G bash -c 'p=$(pidof -s dbus-broker || pidof -s dbus-daemon); sed -n "s/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p" /proc/$p/status'
}

# Each attack's hostile-client arguments.
attack_args() {
  case $1 in
    park) echo "park ping $((30 << 20)) 3" ;;            # a fresh connection, 3 pipelined 30 MiB Pings
    park-open) echo "park open $((30 << 20)) 3" ;;       # the same with OpenSession, a 30 MiB option each
    never-open) echo "never-read open echo 16" ;;        # 16 pipelined OpenSession (7 fds each), never read
    never-list) echo "never-read list 2000 128 32" ;;    # 32 connections × 2000 ListSessions of 128 sessions
    never-list-big) echo "never-read list 4000 128 32" ;; # twice as many: past dbus-broker's 512 MiB per user
    provided) echo "provided-flood frames $((30 << 20)) 8" ;;  # 8 opens of a provider's service, 30 MiB options
  esac
}

# start_attacker TAG ARGS...: starts it as nobody with stdin on fd 8; waits for READY.
start_attacker() {
  local tag=$1; shift
  rm -f "$OUT/$tag.fifo"; mkfifo "$OUT/$tag.fifo"
  G setpriv --reuid=nobody --regid=nogroup --clear-groups /mnt/bin/hostile-client "$ADDR" "$@" \
    < "$OUT/$tag.fifo" > "$OUT/$tag.att.out" 2> "$OUT/$tag.att.err" &
  APID=$!
  exec 8> "$OUT/$tag.fifo"
  local t0=$SECONDS
  until grep -q READY "$OUT/$tag.att.out" 2> /dev/null; do
    kill -0 "$APID" 2> /dev/null || { log "$tag: the attacker exited before READY"; return 1; }
    [ $((SECONDS - t0)) -lt 60 ] || { log "$tag: no READY after 60 s"; return 1; }
    sleep 0.1
  done
  READY_AFTER=$((SECONDS - t0))
}
# killtree PID: SIGKILL to PID and everything below it (by parent PID).
killtree() { local c; for c in $(pgrep -P "$1"); do killtree "$c"; done; kill -KILL "$1" 2> /dev/null; }
# stop_attacker: closes its stdin, waits up to 30 s; sets STOPPED to its exit status.
stop_attacker() {
  exec 8>&-
  local t0=$SECONDS
  while kill -0 "$APID" 2> /dev/null && [ $((SECONDS - t0)) -lt 30 ]; do sleep 0.1; done
  if kill -0 "$APID" 2> /dev/null; then
    killtree "$APID"
    wait "$APID" 2> /dev/null
    STOPPED="killed after 30 s"
  else
    wait "$APID"; STOPPED="exit $?"
  fi
}

restart_daemon() {
  G systemctl restart shmlinkd.service
  G timeout 20 bash -c 'until shmlink --bus system --timeout 2 ping -n 1 > /dev/null 2>&1; do sleep 0.1; done'
}

install_provider() {
  G bash -euc '
    install -m 0755 /mnt/bin/shmlink-frames-provider /usr/local/bin/
    install -m 0644 /mnt/src/examples/frames-provider/systemd/shmlink-frames-provider.service /etc/systemd/system/
    install -m 0644 /mnt/src/examples/frames-provider/systemd/shmlink-frames-provider.conf /usr/share/dbus-1/system.d/
    systemctl daemon-reload
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig'
}
provider_up() {
  G systemctl restart shmlink-frames-provider.service
  G timeout 20 bash -c 'until shmlink --bus system status 2>/dev/null | grep "^frames " | grep -vq "built in"; do sleep 0.2; done'
}

TABLE=$OUT/table.tsv
printf 'bus\tattack\thonest during ok/n p50/p99/max ms\thonest after ok/n p50/p99/max ms\tshmlinkd VmRSS kB base>max(HWM)>after\tbus VmRSS kB base>max>after\tstop s\tattacker saw\tnobody conns at EOF\tbus log\n' > "$TABLE"

run_attack() { # BUS ATTACK
  local bus=$1 attack=$2 tag="$1.$2" args
  args=$(attack_args "$attack")
  restart_daemon
  if [ "$attack" = provided ]; then provider_up || log "$tag: the provider did not register"; fi
  G shmlink --bus system --timeout 5 ping -n 1 > /dev/null 2>&1
  local d0 b0 since; d0=$(daemon_rss); b0=$(bus_rss); since=$(date +%s)
  sleep 1   # journal --since has 1 s resolution
  since=$((since + 1))
  local saw="-" conns="-" ready=""
  if [ "$attack" != baseline ]; then
    log "$tag: round 1: hostile-client $args"
    # shellcheck disable=SC2086
    start_attacker "$tag" $args || true
    ready="READY after ${READY_AFTER:-?} s; "
  fi
  G /mnt/cmp/during.sh "$DURING" /run/cmp-samples > "$OUT/$tag.during"
  G cat /run/cmp-samples > "$OUT/$tag.samples"
  local d1; d1=$(daemon_rss)
  if [ "$attack" != baseline ]; then
    conns=$(G busctl --system list --unique --no-pager --no-legend 2>/dev/null | awk '$4 == "nobody"' | wc -l)
    stop_attacker
    saw="$STOPPED; ${ready}$(grep -h -E 'DONE|ERR' "$OUT/$tag.att.out" | tr '\n' ' ')$(tail -c 300 "$OUT/$tag.att.err" | tr '\n' ' ')"
  fi
  sleep 0.5
  G /mnt/cmp/during.sh "$AFTER" /run/cmp-samples2 > "$OUT/$tag.after"
  local d2 b2; d2=$(daemon_rss); b2=$(bus_rss)
  G journalctl --no-pager -o short-monotonic --since "@$since" -u dbus.service -u dbus-broker.service \
    > "$OUT/$tag.buslog" 2>&1
  G journalctl --no-pager -o short-monotonic --since "@$since" -u shmlinkd.service > "$OUT/$tag.daemonlog" 2>&1
  local buslines; buslines=$(grep -c -v -e '^-- ' "$OUT/$tag.buslog")
  local buskinds; buskinds=$(grep -o -E 'disconnected[^.]*|quota[^.]*|exceed[^.]*' "$OUT/$tag.buslog" | sort | uniq -c | sort -rn | head -2 | tr -s ' ' | tr '\n' ';')

  # Round 2: the attack again, and `systemctl stop` timed while it is on.
  local stop="-"
  if [ "$attack" != baseline ]; then
    log "$tag: round 2 (stop during the attack)"
    # shellcheck disable=SC2086
    start_attacker "$tag.r2" $args || true
    local t0 t1; t0=$(date +%s%N)
    G timeout 30 systemctl stop shmlinkd.service
    t1=$(date +%s%N)
    stop=$(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.2f", d / 1e9 }')
    stop_attacker
    G journalctl --no-pager -o short-monotonic --since "@$((t0 / 1000000000 - 1))" -u shmlinkd.service \
      -u dbus.service -u dbus-broker.service > "$OUT/$tag.r2.log" 2>&1
  else
    local t0 t1; t0=$(date +%s%N); G timeout 30 systemctl stop shmlinkd.service; t1=$(date +%s%N)
    stop=$(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.2f", d / 1e9 }')
  fi
  G systemctl start shmlinkd.service

  printf '%s\t%s\t%s\t%s\t%s>%s(%s)>%s\t%s>%s>%s\t%s\t%s\t%s\t%s\n' \
    "$bus" "$attack" "$(stats "$OUT/$tag.during")" "$(stats "$OUT/$tag.after")" \
    "${d0% *}" "$(maxcol "$OUT/$tag.samples" 1)" "${d1#* }" "${d2% *}" \
    "$b0" "$(maxcol "$OUT/$tag.samples" 2)" "$b2" \
    "$stop" "$saw" "$conns" "${buslines} lines ${buskinds}" >> "$TABLE"
  tail -1 "$TABLE" >&2
}

# boot_guest BUS TAG: a fresh guest with BUS as its system bus, shmlink installed
# and started (and the example provider installed when `provided` is wanted).
boot_guest() {
  local bus=$1 tag=$2 out
  STATE=/tmp/shmlink-sdboot/bus-compare-$$-$tag
  mkdir -p /tmp/shmlink-sdboot
  out=$(SDBOOT_SYSTEM_BUS=$bus bash "$SDBOOT" up "$STATE" "$REPO:/mnt/src" "$BINS:/mnt/bin" "$OUT/guest:/mnt/cmp") \
    || die "$bus: sdboot up failed: $out"
  PID1=$(echo "$out" | tail -1 | cut -d' ' -f1)
  G systemctl show -p Id,MainPID,ExecStart dbus.service > "$OUT/$tag.unit"
  G bash -c 'ps -o pid,rss,args -C dbus-daemon,dbus-broker,dbus-broker-launch' >> "$OUT/$tag.unit"
  G make -s -C /mnt/src install PREFIX=/usr BINDIR_SRC=/mnt/bin > "$OUT/$tag.install" 2>&1 || die "$bus: make install failed: $(cat "$OUT/$tag.install")"
  G make -s -C /mnt/src post-install PREFIX=/usr >> "$OUT/$tag.install" 2>&1 || die "$bus: post-install failed: $(cat "$OUT/$tag.install")"
  G systemctl start shmlinkd.service || die "$bus: shmlinkd did not start"
  case " $ATTACKS " in *" provided "*) install_provider > /dev/null || log "$bus: installing the provider failed" ;; esac
}

# By default each attack gets a fresh boot, so that the bus's memory is not
# what an earlier attack left (neither bus gives it back). FRESH_BOOT=0: one
# boot per bus.
FRESH_BOOT=${FRESH_BOOT:-1}
for bus in $BUSES; do
  if [ "$FRESH_BOOT" = 0 ]; then
    log "$bus: booting"; boot_guest "$bus" "$bus"; head -3 "$OUT/$bus.unit" | cut -c1-120 >&2
  fi
  for attack in $ATTACKS; do
    if [ "$FRESH_BOOT" != 0 ]; then
      log "$bus.$attack: booting"; boot_guest "$bus" "$bus.$attack"
    fi
    run_attack "$bus" "$attack"
    if [ "$FRESH_BOOT" != 0 ]; then
      G journalctl --no-pager -o short-monotonic -u dbus.service -u dbus-broker.service > "$OUT/$bus.$attack.buslog-all" 2>&1
      cleanup
    fi
  done
  if [ "$FRESH_BOOT" = 0 ]; then
    G journalctl --no-pager -o short-monotonic -u dbus.service -u dbus-broker.service > "$OUT/$bus.buslog-all" 2>&1
    cleanup
  fi
done

echo
echo "raw data: $OUT"
column -t -s $'\t' "$TABLE"
