#!/usr/bin/env bash
# The benchmark on a fresh Debian 12 machine, in one command, as root:
#
#     bash tests/bench/fresh-machine.sh            # the full run (about 10 minutes)
#     bash tests/bench/fresh-machine.sh --quick    # any bench.py options pass through
#
# Installs what tests/bench/bench.py measures against (Dovecot, smtp-sink
# from the postfix package, nginx with its mail module), mailproxy itself
# and py-spy, then runs the benchmark.  The packages' own daemons are kept
# from starting on public ports (as .ci/run does); the benchmark starts
# private instances on loopback and stops them at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq dovecot-imapd dovecot-pop3d postfix nginx-light libnginx-mod-mail
pip install -q -e . py-spy

exec python tests/bench/bench.py --profile "$@"
