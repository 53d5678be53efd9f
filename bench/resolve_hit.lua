-- wrk: POST /v1/users/{id}/customer for already-linked users, picked at random.
-- Env: BENCH_USERS (how many seeded users), BENCH_ADMIN_KEY.
local users = tonumber(os.getenv("BENCH_USERS") or "1000")
local key = os.getenv("BENCH_ADMIN_KEY")

function setup(thread)
  thread:set("seed", math.random(1, 1e9))
end

function init(args)
  math.randomseed(seed)
end

request = function()
  local id = math.random(1, users)
  return wrk.format("POST", "/v1/users/bench-user-" .. id .. "/customer",
    { ["Authorization"] = "Bearer " .. key, ["Content-Length"] = "0" }, "")
end

-- Any non-200 answer fails the run: a fast error is not a resolve.
done = function(summary, latency, requests)
  local s = summary
  io.write(string.format("BENCH non2xx=%d errors_connect=%d errors_read=%d errors_timeout=%d\n",
    s.errors.status, s.errors.connect, s.errors.read, s.errors.timeout))
  io.write(string.format("BENCH requests=%d duration_us=%d rps=%.0f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f\n",
    s.requests, s.duration, s.requests / (s.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
