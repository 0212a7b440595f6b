#!/usr/bin/env bash
# Install eoprep and what its embedded STAC API needs, into ./.venv.
# As root on Debian/Ubuntu it also installs PostgreSQL + PostGIS from the distribution.
# Without root (or on conda: see environment.yml) PostgreSQL + PostGIS must already be on PATH.
set -euo pipefail
cd "$(dirname "$0")"

have_postgis() {
  local bindir
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$bindir" ] && ls "$(dirname "$bindir")"/lib/postgis-3.so >/dev/null 2>&1
}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! have_postgis; then
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
  apt_install postgresql postgresql-contrib || { apt-get update -qq && apt_install postgresql postgresql-contrib; }
  pg_major=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
  apt_install "postgresql-${pg_major}-postgis-3"
  echo "installed PostgreSQL ${pg_major} + PostGIS 3"
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch: the CPU wheel pinned here keeps pip from pulling a multi-GB CUDA build for the readers' tests.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[catalog,dev]"
echo "eoprep installed in $(pwd)/.venv"
