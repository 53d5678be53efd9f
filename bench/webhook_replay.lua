-- wrk: POSTs pre-signed deliveries from BENCH_EVENTS (lines "signature<TAB>body"); thread k
-- of n sends lines k, k+n, k+2n, … so no event is sent twice. Every line is used at most once:
-- when a thread runs out it sends an already-sent event (counted as a duplicate).
local path = os.getenv("BENCH_EVENTS")
local threads = {}
local counter = 0

function setup(thread)
  thread:set("index", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local stride = tonumber(os.getenv("BENCH_THREADS") or "2")
  requests = {}
  local n = 0
  for line in io.lines(path) do
    if n % stride == index then
      local tab = line:find("\t", 1, true)
      local signature = line:sub(1, tab - 1)
      local body = line:sub(tab + 1)
      table.insert(requests, wrk.format("POST", "/api/webhooks/stripe",
        { ["Content-Type"] = "application/json", ["Stripe-Signature"] = signature }, body))
    end
    n = n + 1
  end
  position = 0
  duplicates = 0
end

request = function()
  position = position + 1
  if position > #requests then
    duplicates = duplicates + 1
    return requests[#requests]
  end
  return requests[position]
end

done = function(summary, latency, requests)
  local dup = 0
  for _, t in ipairs(threads) do dup = dup + t:get("duplicates") end
  local s = summary
  io.write(string.format("BENCH non2xx=%d errors_connect=%d errors_read=%d errors_timeout=%d duplicates=%d\n",
    s.errors.status, s.errors.connect, s.errors.read, s.errors.timeout, dup))
  io.write(string.format("BENCH requests=%d duration_us=%d rps=%.0f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f\n",
    s.requests, s.duration, s.requests / (s.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
