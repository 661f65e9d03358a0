#!/bin/bash
# Boots a throw-away systemd as PID 1, with its real system bus, in fresh mount,
# PID, UTS, IPC, network and cgroup namespaces over a tmpfs overlay of the host's
# root. The host is only written in STATE (a directory) and one cgroup2
# directory, and both are removed by `down`. Needs root, util-linux (unshare,
# nsenter, setpriv, findmnt), systemd and dbus.
#
#   sdboot.sh up STATE [HOSTDIR:GUESTDIR]...
#        boot; each HOSTDIR appears read-only at GUESTDIR inside (use /mnt/...:
#        the guest's /tmp is wiped at boot). Last line printed on success:
#        "<host PID of the guest's PID 1> <its cgroup directory>".
#        SDBOOT_SYSTEM_BUS=dbus-daemon|dbus-broker picks the guest's system bus
#        (the unit dbus.service stands for); unset, the host's choice stands
#        (installing Debian's dbus-broker package enables it on the host).
#   sdboot.sh exec STATE CMD...   run CMD inside (all namespaces, guest root)
#   sdboot.sh down STATE          power off (SIGKILL after 20 s), remove the
#                                 cgroup and STATE; safe to repeat, and safe
#                                 after a failed or partial `up`
#   sdboot.sh guard STATE         wait for EOF on stdin, then `down`: the Rust
#                                 harness keeps the pipe's other end, so the
#                                 container goes away even if the test process
#                                 dies without unwinding
#
# Used by tests/src/sdboot.rs.
set -euo pipefail

die() { echo "sdboot: $*" >&2; exit 1; }

cmd=${1:-}; shift || true
[ -n "${1:-}" ] || [ "$cmd" = __inner ] || die "usage: $0 up|exec|down|guard STATE ..."

if [ "$cmd" != __inner ]; then
  W=$1; shift
  case $W in /*) ;; *) die "STATE must be an absolute path" ;; esac
  CG2=$(findmnt -rn -t cgroup2 -o TARGET | head -1)   # unified: /sys/fs/cgroup; hybrid: .../unified
  [ -n "$CG2" ] || die "no cgroup2 hierarchy mounted"
  CG=$CG2/shmlink-sdboot-$(basename "$W")
fi

# True while process $1 exists and is not a zombie: the unshare process is
# orphaned once `up` returns, and an init that does not reap would keep it as
# a zombie, which `kill -0` still finds.
alive() {
  local state
  [ -r "/proc/$1/stat" ] || return 1
  state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

down() {
  local p="" u=""
  [ -f "$W/pid1" ] && p=$(cat "$W/pid1")
  [ -f "$W/unshare.pid" ] && u=$(cat "$W/unshare.pid")
  if [ -n "$p" ] && alive "$p"; then
    timeout 10 nsenter -t "$p" -a systemctl poweroff --no-block >/dev/null 2>&1 || true
  fi
  if [ -n "$u" ]; then
    for _ in $(seq 200); do alive "$u" || break; sleep 0.1; done
    if alive "$u"; then
      # Killing PID 1 of a PID namespace kills every process in it.
      [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
      for _ in $(seq 50); do alive "$u" || break; sleep 0.1; done
    fi
  fi
  if [ -d "$CG" ]; then
    # Anything left (a process that escaped into a child cgroup) is killed too.
    [ -e "$CG/cgroup.kill" ] && echo 1 > "$CG/cgroup.kill" 2>/dev/null || true
    for _ in $(seq 50); do
      find "$CG" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "$CG" ] || break
      sleep 0.1
    done
  fi
  rm -rf "$W"
  [ ! -d "$CG" ] || die "cgroup $CG could not be removed"
}

case $cmd in
up)
  [ "$(id -u)" = 0 ] || die "must run as root"
  missing=""
  for c in unshare nsenter setpriv findmnt pgrep timeout systemctl dbus-daemon; do
    command -v "$c" > /dev/null || missing="$missing $c"
  done
  [ -x /lib/systemd/systemd ] || missing="$missing /lib/systemd/systemd"
  [ -e /lib/systemd/system/dbus.service ] || missing="$missing dbus.service"
  case ${SDBOOT_SYSTEM_BUS:-} in
    ""|dbus-daemon) ;;
    dbus-broker) [ -e /lib/systemd/system/dbus-broker.service ] || missing="$missing dbus-broker.service" ;;
    *) die "SDBOOT_SYSTEM_BUS must be dbus-daemon or dbus-broker, not '$SDBOOT_SYSTEM_BUS'" ;;
  esac
  [ -z "$missing" ] || die "missing on the host:$missing (Debian: apt-get install systemd dbus util-linux procps)"
  [ ! -e "$W" ] || down
  mkdir -p "$W/rw" "$W/root" "$CG"
  binds=()
  for b in "$@"; do
    host=${b%%:*}; guest=${b#*:}
    [ -d "$host" ] || die "bind source $host is not a directory"
    case $guest in /*) ;; *) die "bind target $guest must be absolute" ;; esac
    binds+=("$host" "$guest")
  done
  printf '%s\n' "${binds[@]+"${binds[@]}"}" > "$W/binds"
  # The subshell moves itself into the new cgroup, so PID 1 and everything it
  # starts live below $CG, which the container sees as its cgroup root.
  ( echo "$BASHPID" > "$CG/cgroup.procs"
    exec setsid unshare --mount --propagation private --pid --fork --uts --ipc --net --cgroup \
      setpriv --bounding-set -sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm,-block_suspend,-mac_admin,-mac_override \
      env SDBOOT_W="$W" SDBOOT_SYSTEM_BUS="${SDBOOT_SYSTEM_BUS:-}" bash "$0" __inner ) > "$W/boot.log" 2>&1 < /dev/null &
  echo $! > "$W/unshare.pid"
  p=""
  for _ in $(seq 300); do
    # unshare --fork's child sets up the root, then execs systemd.
    p=$(pgrep -P "$(cat "$W/unshare.pid")" -x systemd 2>/dev/null | head -1 || true)
    [ -n "$p" ] && break
    alive "$(cat "$W/unshare.pid")" || break
    sleep 0.1
  done
  [ -n "$p" ] || { cat "$W/boot.log" >&2; die "systemd did not start"; }
  echo "$p" > "$W/pid1"
  for _ in $(seq 300); do nsenter -t "$p" -a test -S /run/systemd/private 2>/dev/null && break; sleep 0.1; done
  st=$(timeout 60 nsenter -t "$p" -a systemctl is-system-running --wait 2>/dev/null || true)
  if [ "$st" != running ]; then
    { echo "--- boot.log"; cat "$W/boot.log"
      echo "--- failed units"; timeout 10 nsenter -t "$p" -a systemctl --failed --no-pager || true; } >&2
    die "container systemd is '$st', not 'running'"
  fi
  echo "$p $CG" ;;
exec)
  [ -f "$W/pid1" ] || die "not booted ($W/pid1 missing)"
  exec nsenter -t "$(cat "$W/pid1")" -a "$@" ;;
down)
  down ;;
guard)
  # Returns at EOF, i.e. when every holder of the pipe's write end is gone.
  cat > /dev/null || true
  down ;;
__inner)
  # PID 1 of the new PID namespace, in a private mount namespace: build the
  # guest root and become systemd.
  W=$SDBOOT_W; R=$W/root
  mount -t tmpfs -o mode=755 tmpfs "$W/rw"; mkdir "$W/rw/upper" "$W/rw/work"
  mount -t overlay overlay -o lowerdir=/,upperdir="$W/rw/upper",workdir="$W/rw/work" "$R"
  mount -t proc proc "$R/proc"
  mount --bind "$R/proc/sys" "$R/proc/sys"; mount -o remount,bind,ro "$R/proc/sys"   # no host sysctl writes
  mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"                              # read-only: no udev
  mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"                   # rooted at our cgroup
  mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
  for d in null zero full random urandom tty; do touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"; done
  touch "$R/dev/console"; mount --bind /dev/null "$R/dev/console"
  mkdir "$R/dev/pts" "$R/dev/shm"; ln -s pts/ptmx "$R/dev/ptmx"; ln -s /proc/self/fd "$R/dev/fd"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
  mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
  while IFS= read -r host && IFS= read -r guest; do
    mkdir -p "$R$guest"
    mount --bind "$host" "$R$guest"; mount -o remount,bind,ro "$R$guest"
  done < "$W/binds"
  # A boot target holding only the system bus: fast, and nothing else to fail.
  printf '[Unit]\nDescription=shmlink test boot\nRequires=dbus.socket\nWants=dbus.service\nAfter=dbus.socket\n' \
    > "$R/etc/systemd/system/shmlink-sdboot.target"
  # The system bus: dbus.service is an alias of dbus-broker.service while a
  # link in /etc/systemd/system says so (what `systemctl enable dbus-broker` makes).
  case $SDBOOT_SYSTEM_BUS in
    dbus-daemon) rm -f "$R/etc/systemd/system/dbus.service" ;;
    dbus-broker) ln -sfn /lib/systemd/system/dbus-broker.service "$R/etc/systemd/system/dbus.service" ;;
  esac
  mkdir "$R/.oldroot"; cd "$R"; pivot_root . .oldroot; umount -l /.oldroot; rmdir /.oldroot; cd /
  exec env -i container=shmlink-sdboot PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=shmlink-sdboot.target --show-status=no ;;
*) die "usage: $0 up|exec|down|guard STATE ..." ;;
esac
