"""The load side of bench/app_events.sh: writes app events into the outbox and watches the
receiver.

  app_events_load.py DATABASE_URL insert N USERS
  app_events_load.py DATABASE_URL wait-for RECEIVER N
  app_events_load.py DATABASE_URL steady RECEIVER RATE SECONDS USERS ALREADY
"""
import json, sqlite3, statistics, subprocess, sys, time, urllib.request, uuid


def insert(url, count, users, tag):
    if url.startswith("postgres"):
        sql = f"""INSERT INTO app_events (id, type, event_key, data, created_at, next_attempt_at)
                  SELECT 'msg_{tag}_' || g, 'user.updated', 'bench-user-' || (g % {users}),
                         '{{"user_id": "bench-user-' || (g % {users}) || '"}}', now(), now()
                  FROM generate_series(1, {count}) AS g"""
        subprocess.run(["psql", "-qAt", url, "-c", sql], check=True, stdout=subprocess.DEVNULL)
    else:
        db = sqlite3.connect(url.removeprefix("sqlite://"), timeout=30)
        now = int(time.time() * 1000)
        rows = [(f"msg_{tag}_{g}", "user.updated", f"bench-user-{g % users}",
                 json.dumps({"user_id": f"bench-user-{g % users}"}), now, now)
                for g in range(1, count + 1)]
        db.executemany("INSERT INTO app_events (id, type, event_key, data, created_at, "
                       "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.commit()
        db.close()


def stats(receiver, lag=False):
    with urllib.request.urlopen(f"{receiver}/_stats{'?lag=1' if lag else ''}") as r:
        return json.load(r)


def wait_for(receiver, count, limit=600):
    deadline = time.time() + limit
    while time.time() < deadline:
        s = stats(receiver)
        if s["distinct"] >= count:
            assert s["unverified"] == 0, s
            return
        time.sleep(0.05)
    raise SystemExit(f"the receiver has {stats(receiver)['distinct']} of {count} after {limit} s")


def steady(url, receiver, rate, seconds, users, already):
    per_tick = max(1, rate // 10)
    ticks = seconds * 10
    start = time.time()
    for tick in range(ticks):
        insert(url, per_tick, users, f"s{tick}_{uuid.uuid4().hex[:6]}")
        pause = start + (tick + 1) / 10 - time.time()
        if pause > 0:
            time.sleep(pause)
    written = per_tick * ticks
    wait_for(receiver, already + written)
    lags = sorted(stats(receiver, lag=True)["lag_ms"][already:])
    q = statistics.quantiles(lags, n=100)
    print(f"latency at {written / (time.time() - start):,.0f} events/s offered for {seconds} s "
          f"({written} events): commit -> delivery p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms, "
          f"max {lags[-1]:.0f} ms")


if __name__ == "__main__":
    url, command, *args = sys.argv[1:]
    if command == "insert":
        insert(url, int(args[0]), int(args[1]), "t")
    elif command == "wait-for":
        wait_for(args[0], int(args[1]))
    else:
        steady(url, args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]))
