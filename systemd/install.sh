#!/bin/sh
# Install the conveyor-vision units on a device (run as root from a source checkout or an
# unpacked release). Idempotent. Not run in CI.
#
#   sudo systemd/install.sh [--enable]
#
# Expects a release at /opt/conveyor-vision/current (see README: first install), a
# config at /etc/conveyor-vision/config.yaml and the update signing key at
# /etc/conveyor-vision/update-signing.pub.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
enable=no
[ "${1:-}" = "--enable" ] && enable=yes

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root" >&2
    exit 1
fi

install -D -m 0644 "$here/conveyor-vision.sysusers" /usr/lib/sysusers.d/conveyor-vision.conf
install -D -m 0644 "$here/conveyor-vision.tmpfiles" /usr/lib/tmpfiles.d/conveyor-vision.conf
systemd-sysusers /usr/lib/sysusers.d/conveyor-vision.conf
# Groups named in SupplementaryGroups= must exist (plugdev/render are missing on some images).
for g in video plugdev render; do
    getent group "$g" >/dev/null || groupadd --system "$g"
done
systemd-tmpfiles --create /usr/lib/tmpfiles.d/conveyor-vision.conf

for unit in conveyor-vision.service conveyor-vision-engines.service \
            conveyor-vision-update.service conveyor-vision-update.timer; do
    install -m 0644 "$here/$unit" "/etc/systemd/system/$unit"
done

if [ ! -e /etc/conveyor-vision/config.yaml ]; then
    install -m 0640 -g conveyor-vision "$here/conveyor-vision.example.yaml" \
        /etc/conveyor-vision/config.yaml
    echo "installed an example config: edit /etc/conveyor-vision/config.yaml (camera serials, broker)"
fi
# The librealsense udev rules give plugdev access to RealSense USB nodes.
if [ ! -e /etc/udev/rules.d/99-realsense-libusb.rules ] && \
   [ ! -e /usr/lib/udev/rules.d/99-realsense-libusb.rules ]; then
    echo "note: install librealsense's udev rules (99-realsense-libusb.rules) for camera access"
fi

systemctl daemon-reload
for unit in conveyor-vision.service conveyor-vision-engines.service \
            conveyor-vision-update.service conveyor-vision-update.timer; do
    systemd-analyze verify "/etc/systemd/system/$unit"
done
if [ "$enable" = yes ]; then
    systemctl enable --now conveyor-vision.service conveyor-vision-update.timer
fi
echo "done; status: systemctl status conveyor-vision; logs: journalctl -u conveyor-vision -f"
