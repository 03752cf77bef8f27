#!/usr/bin/env bash
# standbys.sh N [PORT] - `weft bench --only throughput` on PostgreSQL with N
# standby coordinators beside the bench's own (BENCHMARKS.md, "Several
# coordinators on one PostgreSQL"). Prints tasks/s, the cluster's CPU per
# task, PostgreSQL's CPU ticks over the run and the standbys' own.
#
# Needs a release build (cargo build --release --bins) and a PostgreSQL
# server on 127.0.0.1:PORT (default 55432) reachable as user postgres
# without a password, started as in BENCHMARKS.md ("The PostgreSQL store,
# one coordinator"), with its data dir in $PGDATA (for its pid file).
set -euo pipefail
N=${1:?how many standbys}
PORT=${2:-55432}
BIN=${WEFT_BIN_DIR:-target/release}
: "${PGDATA:?set PGDATA to the data dir of the server (for postmaster.pid)}"
q() { psql -h 127.0.0.1 -p "$PORT" -U postgres -Atc "$1" "${@:2}"; }
# PostgreSQL's CPU ticks: its live processes' utime+stime, plus the
# postmaster's cutime+cstime (the backends it reaped).
pg_ticks() {
    local total=0 pm
    pm=$(head -1 "$PGDATA/postmaster.pid")
    for p in $(pgrep -u postgres postgres); do
        t=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    t=$(awk '{print $16+$17}' "/proc/$pm/stat")
    echo $((total + t))
}
db=standbys_${N}_$$_$RANDOM
q "CREATE DATABASE $db" >/dev/null
url=postgresql://postgres@127.0.0.1:$PORT/$db
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
before=$(pg_ticks)
"$BIN/weft" bench --only throughput --output json --database-url "$url" >"$work/out.json" 2>"$work/bench.log" &
bench=$!
standbys=()
if [ "$N" -gt 0 ]; then
    # Once the bench's coordinator holds the database (its schema is there).
    until q "SELECT 1 FROM weft_migrations LIMIT 1" -d "$db" >/dev/null 2>&1; do sleep 0.05; done
    for i in $(seq 1 "$N"); do
        "$BIN/weft-coordinator" --listen 127.0.0.1:0 --database-url "$url" --data-dir "$work/s$i" \
            --http-listen off --insecure --no-auth >"$work/s$i.log" 2>&1 &
        standbys+=($!)
    done
fi
wait "$bench"
after=$(pg_ticks)
standby_ticks=0
for p in "${standbys[@]}"; do
    t=$(awk '{print $14+$15}' "/proc/$p/stat")
    standby_ticks=$((standby_ticks + t))
    kill "$p"
done
python3 - "$work/out.json" "$N" $((after - before)) "$standby_ticks" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))["throughput"]
print(f"standbys={sys.argv[2]} median_tps={t['median_tps']} runs={t['runs']} "
      f"cluster_cpu_us_per_task={t['cluster_cpu_us_per_task']} pg_ticks={sys.argv[3]} standby_ticks={sys.argv[4]}")
PY
