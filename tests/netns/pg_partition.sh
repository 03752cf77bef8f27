#!/usr/bin/env bash
# pg_partition.sh - cut the active coordinator off from PostgreSQL, on a
# network-namespace lab, and print when it stopped and when the standby
# took over (README, "Several coordinators").
#
#   sudo tests/netns/pg_partition.sh [BIN_DIR]     (default target/debug)
#
# Three lab hosts: PostgreSQL on h1, coordinator A (active) on h2,
# coordinator B (standby) on h3. h2 is partitioned (packets dropped, so TCP
# must time out); expected: A exits 75 about 5 s after the cut (its 4 s
# lease), PostgreSQL ends A's session about 8 s after A's last check, and B
# serves just after that, never before A stopped. Uses a private copy of
# ../shared/netns-lab.sh (namespaces weftpg-*, subnet 10.238.0.0/24) and
# removes everything it made when it ends.

set -euo pipefail

BIN=$(realpath "${1:-target/debug}")
LAB_SRC=$(dirname "$0")/../../../shared/netns-lab.sh
PG_BIN=${WEFT_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
WORK=$(mktemp -d /tmp/weft-pg-partition.XXXXXX)
chmod 755 "$WORK"
LAB="$WORK/lab.sh"
sed -e 's/^SW=fab-sw /SW=weftpg-sw /' -e 's/^HP=fab-h /HP=weftpg-h /' \
    -e 's/^NET=10.231.0 /NET=10.238.0 /' "$LAB_SRC" >"$LAB"
chmod +x "$LAB"

cleanup() {
    "$LAB" teardown >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$LAB" up 3 >/dev/null
mkdir -p "$WORK/pg" "$WORK/sock" "$WORK/a" "$WORK/b"
chown postgres "$WORK/pg" "$WORK/sock"
runuser -u postgres -- "$PG_BIN/initdb" -D "$WORK/pg/data" -A trust -U postgres >/dev/null
echo "host all all 10.238.0.0/24 trust" >>"$WORK/pg/data/pg_hba.conf"
"$LAB" exec 1 runuser -u postgres -- "$PG_BIN/postgres" -D "$WORK/pg/data" \
    -c listen_addresses=10.238.0.1 -k "$WORK/sock" -c fsync=off >"$WORK/pg.log" 2>&1 &
until grep -qs "ready to accept connections" "$WORK/pg.log"; do sleep 0.1; done

DB=postgresql://postgres@10.238.0.1:5432/postgres
coordinator() { # HOST NAME
    local status
    "$LAB" exec "$1" env RUST_LOG=info NO_COLOR=1 "$BIN/weft-coordinator" \
        --listen "10.238.0.$1:7070" --http-listen off --data-dir "$WORK/$2" \
        --database-url "$DB" >"$WORK/$2.log" 2>&1 && status=0 || status=$?
    echo "exit=$status at $(date -u +%T.%N)" >>"$WORK/$2.log"
}
coordinator 2 a &
until grep -qs "listening" "$WORK/a.log"; do sleep 0.1; done
coordinator 3 b &
until grep -qs "standby:" "$WORK/b.log"; do sleep 0.1; done

echo "cut:        $(date -u +%T.%N)  (h2, coordinator A, partitioned)"
"$LAB" partition 2 >/dev/null
until grep -qs "listening" "$WORK/b.log"; do sleep 0.1; done
until grep -qs "exit=" "$WORK/a.log"; do sleep 0.1; done
strip() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }
echo "A stopped:  $(strip "$WORK/a.log" | grep -o 'exit=.*')"
echo "A's reason: $(strip "$WORK/a.log" | grep -o 'reason=.*' | head -1)"
echo "PG ended:   $(grep 'could not receive data from client' "$WORK/pg.log" | cut -c12-23 | tr '\n' ' ')"
echo "B took:     $(strip "$WORK/b.log" | grep 'this coordinator takes over' | cut -c12-27)"
echo "B serves:   $(strip "$WORK/b.log" | grep 'listening' | cut -c12-27)"
"$LAB" heal >/dev/null
kill -TERM "$(ip netns pids weftpg-h3)" 2>/dev/null || true
until grep -qs "exit=" "$WORK/b.log"; do sleep 0.1; done
echo "B on SIGTERM: $(strip "$WORK/b.log" | grep -o 'exit=[0-9]*')"
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -m fast stop >/dev/null
