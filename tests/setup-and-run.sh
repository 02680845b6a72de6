#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine and runs it:
#   system packages (ldap-utils for the real LDAP clients, PostgreSQL, OpenLDAP's slapd as the
#   reference the bad-input table is checked against and the benchmark compares with, Chromium and
#   chromedriver for the self-service pages),
#   a PostgreSQL server on 127.0.0.1 with a test role, a virtualenv with ldapsync and its test extras,
#   then pytest.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v ldapsearch >/dev/null 2>&1 || need_pkgs+=(ldap-utils)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_pkgs+=(postgresql)
command -v pg_ctlcluster >/dev/null 2>&1 || need_pkgs+=(postgresql-common)
[ -x /usr/sbin/slapd ] || need_pkgs+=(slapd)
[ -x /usr/bin/chromium ] || need_pkgs+=(chromium)            # the self-service pages are tested in it
[ -x /usr/bin/chromedriver ] || need_pkgs+=(chromium-driver)
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)   # verifies contrib/ldapsync.service
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "need root to install: ${need_pkgs[*]}" >&2; exit 1; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  # Debian starts a system slapd on install; the tests start their own on loopback ports.
  if [[ " ${need_pkgs[*]} " == *" slapd "* ]]; then service slapd stop >/dev/null 2>&1 || true; fi
fi

# PostgreSQL: the distribution's cluster, started if needed, with a password role for the tests.
if [ -z "${LDAPSYNC_TEST_PG_URL:-}" ]; then
  ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
  if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -q "^$ver main$"; then
    pg_createcluster "$ver" main >/dev/null
  fi
  pg_ctlcluster "$ver" main start 2>/dev/null || true
  for _ in $(seq 1 30); do
    su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
    sleep 1
  done
  su postgres -c "psql -qAt" >/dev/null <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ldapsync_test') THEN
    CREATE ROLE ldapsync_test LOGIN CREATEDB PASSWORD 'ldapsync_test';
  END IF;
END $$;
SQL
  port=$(pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" {print $3}')
  export LDAPSYNC_TEST_PG_URL="postgresql+psycopg://ldapsync_test:ldapsync_test@127.0.0.1:${port}/postgres"
fi

# Python environment
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]'

export PATH="$PWD/.venv/bin:$PATH"
set +e
# Most of a test's time is spent waiting (servers starting, deliveries, reconcile passes), so test
# files run in parallel: LDAPSYNC_TEST_WORKERS processes (default: 1.5 per CPU, at least 2), each
# taking whole files (module-scoped servers stay in one process).  LDAPSYNC_TEST_WORKERS=0: serial.
workers=${LDAPSYNC_TEST_WORKERS:-$(python3 -c 'import os; print(max(2, len(os.sched_getaffinity(0)) * 3 // 2))')}
parallel=()
if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist loadfile); fi
.venv/bin/python -m pytest "${parallel[@]}" "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
