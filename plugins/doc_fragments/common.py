# -*- coding: utf-8 -*-
# Copyright: daemonless.oci engineers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options shared by every daemonless.oci module: where the runtime configuration and state live."""
from __future__ import annotations


class ModuleDocFragment:
    """Shared options (use with C(extends_documentation_fragment: daemonless.oci.common))."""

    DOCUMENTATION = r"""
options:
  config_file:
    description:
      - Path of the runtime configuration (JSON) that defines the runtime handlers.
      - Defaults to the E(DAEMONLESS_OCI_CONFIG) environment variable, then C(/etc/daemonless-oci/runtimes.json);
        without a file, one handler per installed runtime (runc, crun, runsc) is used.
    type: path
  run_root:
    description:
      - Directory for run-time state (bundles, conmon files, locks). Gone after a reboot by design.
      - Defaults to the configuration's C(run_root), else C(/run/daemonless-oci).
    type: path
  persist_root:
    description:
      - Directory for persistent state (container configuration, exit codes, logs, writable layers).
      - Defaults to the configuration's C(persist_root), else C(/var/lib/daemonless-oci).
    type: path
"""
