# shmlink: build, and install the binaries with their systemd and D-Bus integration.
#
#   make                                  cargo build --release
#   sudo make install                     install into /usr (PREFIX) from target/release
#   sudo make post-install                create the user, reload systemd and the bus
#   make install DESTDIR=/tmp/stage       stage for a package (no post-install)
#   make install BINDIR_SRC=target/debug  install the debug build instead
#   make install-lib DESTDIR=/tmp/stage   only the C library, its header and shmlink.pc
#
# `install` copies already-built binaries and never writes into the source tree,
# so it also runs from a read-only checkout. Unit and activation files hold
# @libexecdir@-style placeholders that are replaced with the paths chosen here.
# See docs/DEPLOYING.md.

PREFIX ?= /usr
DESTDIR ?=
# Where the built binaries are (relative to this directory, or absolute).
BINDIR_SRC ?= target/release
# Where the built C library (libshmlink_capi.so/.a) is; by default beside the binaries.
LIBDIR_SRC ?= $(BINDIR_SRC)

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
# The C library (Debian-style multiarch: libdir=$(PREFIX)/lib/x86_64-linux-gnu).
libdir ?= $(PREFIX)/lib
includedir ?= $(PREFIX)/include
pkgconfigdir ?= $(libdir)/pkgconfig

CARGO ?= cargo
INSTALL ?= install

# This Makefile's directory, so `make -f /path/to/Makefile install` works from anywhere.
SRCDIR := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
BIN_SRC := $(if $(filter /%,$(BINDIR_SRC)),$(BINDIR_SRC),$(SRCDIR)/$(BINDIR_SRC))
LIB_SRC := $(if $(filter /%,$(LIBDIR_SRC)),$(LIBDIR_SRC),$(SRCDIR)/$(LIBDIR_SRC))
# The C library's version (the workspace's) and its soname's major number.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' '$(SRCDIR)/Cargo.toml' | head -n 1)
SOMAJOR := $(firstword $(subst ., ,$(VERSION)))

SUBST = sed \
	-e 's|@bindir@|$(bindir)|g' \
	-e 's|@libexecdir@|$(libexecdir)|g' \
	-e 's|@docdir@|$(docdir)|g' \
	-e 's|@systemduserunitdir@|$(systemduserunitdir)|g' \
	-e 's|@sysusersdir@|$(sysusersdir)|g' \
	-e 's|@dbussystemservicedir@|$(dbussystemservicedir)|g' \
	-e 's|@dbussessionservicedir@|$(dbussessionservicedir)|g' \
	-e 's|@dbussystempolicydir@|$(dbussystempolicydir)|g' \
	-e 's|@prefix@|$(PREFIX)|g' \
	-e 's|@libdir@|$(libdir)|g' \
	-e 's|@includedir@|$(includedir)|g' \
	-e 's|@version@|$(VERSION)|g'

# install_subst SRC DEST: copy SRC to $(DESTDIR)DEST with placeholders replaced, mode 0644.
define install_subst
	$(INSTALL) -d -m 0755 '$(DESTDIR)$(dir $(2))'
	$(SUBST) '$(SRCDIR)/$(1)' > '$(DESTDIR)$(2)'
	chmod 0644 '$(DESTDIR)$(2)'
endef

.PHONY: all build install install-bin install-data install-lib install-lib-if-built post-install uninstall

all: build

build:
	$(CARGO) build --release --locked -p shmlinkd -p shmlink-cli -p shmlink-capi

install: install-bin install-data install-lib-if-built

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

# The C library: libshmlink.so.$(VERSION) with the soname link
# libshmlink.so.$(SOMAJOR) and the development link libshmlink.so, the static
# libshmlink.a, shmlink.h and shmlink.pc.
install-lib:
	@test -f '$(LIB_SRC)/libshmlink_capi.so' || { \
	  echo "error: $(LIB_SRC)/libshmlink_capi.so is missing: run 'make build' (or set LIBDIR_SRC)" >&2; exit 1; }
	$(INSTALL) -d -m 0755 '$(DESTDIR)$(libdir)' '$(DESTDIR)$(includedir)'
	$(INSTALL) -m 0755 '$(LIB_SRC)/libshmlink_capi.so' '$(DESTDIR)$(libdir)/libshmlink.so.$(VERSION)'
	ln -sfn 'libshmlink.so.$(VERSION)' '$(DESTDIR)$(libdir)/libshmlink.so.$(SOMAJOR)'
	ln -sfn 'libshmlink.so.$(SOMAJOR)' '$(DESTDIR)$(libdir)/libshmlink.so'
	if test -f '$(LIB_SRC)/libshmlink_capi.a'; then \
	  $(INSTALL) -m 0644 '$(LIB_SRC)/libshmlink_capi.a' '$(DESTDIR)$(libdir)/libshmlink.a'; fi
	$(INSTALL) -m 0644 '$(SRCDIR)/capi/include/shmlink.h' '$(DESTDIR)$(includedir)/shmlink.h'
	$(call install_subst,capi/shmlink.pc.in,$(pkgconfigdir)/shmlink.pc)

# `install` adds the C library when it was built (`make build` builds it);
# `install-lib` alone insists on it.
install-lib-if-built:
	@if test -f '$(LIB_SRC)/libshmlink_capi.so'; then $(MAKE) -f '$(SRCDIR)/Makefile' install-lib; \
	else echo "note: $(LIB_SRC)/libshmlink_capi.so is not built; the C library is not installed"; fi

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
	  '$(DESTDIR)$(docdir)/DEPLOYING.md' \
	  '$(DESTDIR)$(libdir)/libshmlink.so.$(VERSION)' '$(DESTDIR)$(libdir)/libshmlink.so.$(SOMAJOR)' \
	  '$(DESTDIR)$(libdir)/libshmlink.so' '$(DESTDIR)$(libdir)/libshmlink.a' \
	  '$(DESTDIR)$(includedir)/shmlink.h' '$(DESTDIR)$(pkgconfigdir)/shmlink.pc'
	-rmdir '$(DESTDIR)$(docdir)' 2>/dev/null
