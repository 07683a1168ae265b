#!/bin/sh
# The test containers' root filesystem, built in the VM from its distribution's busybox-static (one
# static binary and its applet links), with the mount points a read-only root needs and the page
# httpd serves. One script instead of one Ansible task per step: under qemu's software emulation
# every task costs seconds. Usage: busybox-rootfs.sh ROOTFS
set -eu
root=$1
for dir in bin dev etc proc sys tmp run www; do
    install -d -o root -g root -m 0755 "$root/$dir"
done
install -o root -g root -m 0755 /bin/busybox "$root/bin/busybox"
chroot "$root" /bin/busybox --install -s /bin
printf 'daemonless-oci molecule\n' > "$root/www/index.html.tmp"
chmod 0644 "$root/www/index.html.tmp"
mv "$root/www/index.html.tmp" "$root/www/index.html"
