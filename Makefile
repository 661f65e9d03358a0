# shmlink: build, and install the binaries with their systemd and D-Bus integration.
#
#   make                                  cargo build --release
#   sudo make install                     install into /usr (PREFIX) from target/release
#   sudo make post-install                create the user, reload systemd and the bus
#   make install DESTDIR=/tmp/stage       stage for a package (no post-install)
#   make install BINDIR_SRC=target/debug  install the debug build instead
#
# `install` copies already-built binaries and never writes into the source tree,
# so it also runs from a read-only checkout. Unit and activation files hold
# @libexecdir@-style placeholders that are replaced with the paths chosen here.
# See docs/DEPLOYING.md.

PREFIX ?= /usr
DESTDIR ?=
# Where the built binaries are (relative to this directory, or absolute).
BINDIR_SRC ?= target/release

bindir ?= $(PREFIX)/bin
libexecdir ?= $(PREFIX)/libexec
datadir ?= $(PREFIX)/share
docdir ?= $(datadir)/doc/shmlink
systemdsystemunitdir ?= $(PREFIX)/lib/systemd/system
systemduserunitdir ?= $(PREFIX)/lib/systemd/user
sysusersdir ?= $(PREFIX)/lib/sysusers.d
dbussystemservicedir ?= $(datadir)/dbus-1/system-services
dbussessionservicedir ?= $(datadir)/dbus-1/services
dbussystempolicydir ?= $(datadir)/dbus-1/system.d
dbusinterfacedir ?= $(datadir)/dbus-1/interfaces

CARGO ?= cargo
INSTALL ?= install

# This Makefile's directory, so `make -f /path/to/Makefile install` works from anywhere.
SRCDIR := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
BIN_SRC := $(if $(filter /%,$(BINDIR_SRC)),$(BINDIR_SRC),$(SRCDIR)/$(BINDIR_SRC))

SUBST = sed \
	-e 's|@bindir@|$(bindir)|g' \
	-e 's|@libexecdir@|$(libexecdir)|g' \
	-e 's|@docdir@|$(docdir)|g' \
	-e 's|@systemduserunitdir@|$(systemduserunitdir)|g' \
	-e 's|@sysusersdir@|$(sysusersdir)|g' \
	-e 's|@dbussystemservicedir@|$(dbussystemservicedir)|g' \
	-e 's|@dbussessionservicedir@|$(dbussessionservicedir)|g' \
	-e 's|@dbussystempolicydir@|$(dbussystempolicydir)|g'

# install_subst SRC DEST: copy SRC to $(DESTDIR)DEST with placeholders replaced, mode 0644.
define install_subst
	$(INSTALL) -d -m 0755 '$(DESTDIR)$(dir $(2))'
	$(SUBST) '$(SRCDIR)/$(1)' > '$(DESTDIR)$(2)'
	chmod 0644 '$(DESTDIR)$(2)'
endef

.PHONY: all build install install-bin install-data post-install uninstall

all: build

build:
	$(CARGO) build --release --locked -p shmlink-server -p shmlink-cli

install: install-bin install-data

install-bin:
	@for b in shmlinkd shmlink; do \
	  test -x '$(BIN_SRC)/'$$b || { \
	    echo "error: $(BIN_SRC)/$$b is missing: run 'make build' (or set BINDIR_SRC)" >&2; exit 1; }; \
	done
	$(INSTALL) -d -m 0755 '$(DESTDIR)$(libexecdir)' '$(DESTDIR)$(bindir)'
	$(INSTALL) -m 0755 '$(BIN_SRC)/shmlinkd' '$(DESTDIR)$(libexecdir)/shmlinkd'
	$(INSTALL) -m 0755 '$(BIN_SRC)/shmlink' '$(DESTDIR)$(bindir)/shmlink'

install-data:
	$(call install_subst,systemd/shmlinkd.service,$(systemdsystemunitdir)/shmlinkd.service)
	$(call install_subst,systemd/user/shmlinkd.service,$(systemduserunitdir)/shmlinkd.service)
	$(call install_subst,systemd/org.shmlink.Broker1.service,$(dbussystemservicedir)/org.shmlink.Broker1.service)
	$(call install_subst,systemd/user/org.shmlink.Broker1.service,$(dbussessionservicedir)/org.shmlink.Broker1.service)
	$(call install_subst,systemd/org.shmlink.Broker1.conf,$(dbussystempolicydir)/org.shmlink.Broker1.conf)
	$(call install_subst,systemd/shmlink.conf,$(sysusersdir)/shmlink.conf)
	$(INSTALL) -d -m 0755 '$(DESTDIR)$(dbusinterfacedir)' '$(DESTDIR)$(docdir)'
	$(INSTALL) -m 0644 '$(SRCDIR)/interfaces/org.shmlink.Broker1.xml' '$(SRCDIR)/interfaces/org.shmlink.Session1.xml' '$(DESTDIR)$(dbusinterfacedir)/'
	$(INSTALL) -m 0644 '$(SRCDIR)/docs/DEPLOYING.md' '$(DESTDIR)$(docdir)/'

# On the installed system (not for DESTDIR staging): create the shmlink user
# before the bus re-reads its policy (a policy naming an unknown user is
# ignored), then make systemd and the system bus pick up the new files.
post-install:
	@test -z '$(DESTDIR)' || { echo "error: post-install acts on the running system; unset DESTDIR" >&2; exit 1; }
	systemd-sysusers '$(sysusersdir)/shmlink.conf'
	systemctl daemon-reload
	busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig

uninstall:
	rm -f '$(DESTDIR)$(libexecdir)/shmlinkd' '$(DESTDIR)$(bindir)/shmlink' \
	  '$(DESTDIR)$(systemdsystemunitdir)/shmlinkd.service' \
	  '$(DESTDIR)$(systemduserunitdir)/shmlinkd.service' \
	  '$(DESTDIR)$(dbussystemservicedir)/org.shmlink.Broker1.service' \
	  '$(DESTDIR)$(dbussessionservicedir)/org.shmlink.Broker1.service' \
	  '$(DESTDIR)$(dbussystempolicydir)/org.shmlink.Broker1.conf' \
	  '$(DESTDIR)$(sysusersdir)/shmlink.conf' \
	  '$(DESTDIR)$(dbusinterfacedir)/org.shmlink.Broker1.xml' \
	  '$(DESTDIR)$(dbusinterfacedir)/org.shmlink.Session1.xml' \
	  '$(DESTDIR)$(docdir)/DEPLOYING.md'
	-rmdir '$(DESTDIR)$(docdir)' 2>/dev/null
